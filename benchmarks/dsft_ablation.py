"""A small version of GPT-1's Table 5 ablation for DSFT, on ../shared/data.

One federation of four oracles with different task types: SST-2 split across two oracles
(classification), RTE on a third (entailment), COPA on a fourth (multiple choice). Validation accuracy of
    (a) fine-tuned from a DUPT checkpoint (pre-trained through the sim runtime on the four corpora of
        ../shared/data/pretrain), auxiliary LM objective lambda = 0.5
    (b) the same with lambda = 0
    (c) the same fine-tuning from scratch (no pre-training; same tokenizer and architecture)
    (d) the majority class of each training set
Writes benchmarks/results/dsft_ablation.md. Run from the repository root:

    python benchmarks/dsft_ablation.py            # about 55 minutes on a 2-core CPU (40 of them pre-training)

The SST-2 halves are written to --work-dir (outside the project by default); nothing from
../shared/data is copied into the project.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from dgpt import api
from dgpt.config import config_from_dict
from dgpt.fileio import write_text
from dgpt.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULT = ROOT / "benchmarks" / "results" / "dsft_ablation.md"
CORPORA = ("literature_shakespeare", "encyclopedia_wikitext2", "technical_python_docs", "dialogue_topical_chat")
# pre-LN: at this budget (a few hundred steps) the post-LN GPT-1 stack stays on the unigram plateau (~6.7 nats)
MODEL = {"preset": "tiny", "n_layer": 4, "n_head": 4, "d_model": 128, "d_ff": 512, "n_ctx": 128, "ln": "pre"}
VARIANTS = {"a": ("pre-trained, lambda 0.5", True, 0.5), "b": ("pre-trained, lambda 0", True, 0.0), "c": ("from scratch, lambda 0.5", False, 0.5)}


def quiet(_msg: str) -> None:
    pass


def split_sst(work: Path) -> tuple[Path, Path]:
    """Alternate rows of SST-2's training set to two oracles (in the work directory, not the project)."""
    lines = (SHARED / "tasks" / "sst2" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    halves = (work / "tasks" / "sst2_a.jsonl", work / "tasks" / "sst2_b.jsonl")
    for i, path in enumerate(halves):
        write_text(path, "".join(lines[i::2]))
    return halves


def pretrain_config(work: Path, args) -> dict:
    oracles = [
        {"name": name, "train": [str(SHARED / "pretrain" / name / "train.txt")], "valid": [str(SHARED / "pretrain" / name / "valid.txt")]}
        for name in CORPORA
    ]
    return {
        "run_dir": str(work / "pretrain"), "seed": 1337, "model": MODEL, "tokenizer": {"vocab_size": args.vocab},
        "oracles": oracles,
        "pretrain": {"batch_size": 16, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 30, "eval_windows": 32, "checkpoint_interval": 1000},
        "federation": {"runtime": "sim", "rounds": args.pretrain_rounds, "inner_steps": args.pretrain_inner_steps, **outer(args)},
    }


def finetune_config(work: Path, variant: str, sst: tuple[Path, Path], args) -> dict:
    _, pretrained, lam = VARIANTS[variant]
    tasks = SHARED / "tasks"
    sst_valid = [str(tasks / "sst2" / "validation.jsonl")]
    oracles = [
        {"name": "sst2_a", "task": {"type": "classification", "train": [str(sst[0])], "valid": sst_valid}},
        {"name": "sst2_b", "task": {"type": "classification", "train": [str(sst[1])], "valid": sst_valid}},
        {"name": "rte", "task": {"type": "entailment", "train": [str(tasks / "rte" / "train.jsonl")], "valid": [str(tasks / "rte" / "validation.jsonl")]}},
        {"name": "copa", "task": {
            "type": "multiple_choice", "train": [str(tasks / "copa" / "train.jsonl"), str(tasks / "copa" / "train_mirrored_extra.jsonl")],
            "valid": [str(tasks / "copa" / "validation.jsonl")]}},
    ]
    finetune = {"lr": args.lr, "epochs": args.epochs, "inner_steps": args.inner_steps, "lambda_lm": lam}
    start = {"finetune": {**finetune, "init_from": str(work / "pretrain")}} if pretrained else {
        "finetune": finetune, "model": MODEL, "tokenizer": {"path": str(work / "pretrain" / "tokenizer.json")}}
    return {"run_dir": str(work / f"finetune_{variant}"), "seed": 2024, "oracles": oracles,
            "federation": {"runtime": "sim", **outer(args)}, **start}


def outer(args) -> dict:
    return {"outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum}


def outer_name(args) -> str:
    if args.outer_momentum == 0:
        return f"SGD lr {args.outer_lr:g} without momentum" + (" (FedAvg)" if args.outer_lr == 1 else "")
    return f"Nesterov SGD lr {args.outer_lr:g} / momentum {args.outer_momentum:g}"


def majority(train: list[Path], valid: Path) -> float:
    counts = Counter(json.loads(line)["label"] for path in train for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    label = counts.most_common(1)[0][0]
    truth = [json.loads(line)["label"] for line in valid.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(t == label for t in truth) / len(truth)


def evaluated_rounds(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "round" and "metrics" in r]


def best_and_last(run_dir: Path) -> dict[str, tuple[float, float]]:
    """Per oracle: (accuracy after the last round, best accuracy over the rounds)."""
    rows = evaluated_rounds(run_dir)
    return {
        name: (rows[-1]["metrics"][name]["accuracy"], max(r["metrics"][name]["accuracy"] for r in rows[1:]))
        for name in rows[-1]["metrics"]
    }


def run_variant(raw: dict, threads: int) -> tuple[dict, float]:
    """One fine-tuning variant in a worker process: its accuracies and wall-clock seconds."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    config = config_from_dict(raw, "<benchmark>")
    api.finetune(config, log=quiet)
    return best_and_last(config.run_path), time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="/tmp/dgpt_dsft_ablation", help="runs and the SST-2 halves (outside the project)")
    parser.add_argument("--out", type=Path, default=RESULT, help="the markdown report")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--pretrain-rounds", type=int, default=30)
    parser.add_argument("--pretrain-inner-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=float, default=3.0, help="GPT-1: 3")
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="per process; 1 is much faster on a shared, busy 2-core machine")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning variants trained at once (one process each)")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="outer SGD lr (1 with momentum 0 = FedAvg)")
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="outer Nesterov momentum (DiLoCo: 0.9)")
    args = parser.parse_args()
    if not (SHARED / "tasks").is_dir() or not (SHARED / "pretrain").is_dir():
        print(f"shared data not found at {SHARED}; nothing to do", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    sst = split_sst(work)
    seconds = {}
    t0 = time.perf_counter()
    pre = config_from_dict(pretrain_config(work, args), "<benchmark>")
    api.prepare(pre, log=quiet)
    pre_result = api.pretrain(pre, log=quiet)  # resumes (or reuses) a finished run in the same work dir
    seconds["pretrain"] = time.perf_counter() - t0
    accuracy = {}
    raw = {v: finetune_config(work, v, sst, args) for v in VARIANTS}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {v: pool.submit(run_variant, raw[v], args.threads) for v in VARIANTS}
        for variant, future in futures.items():
            accuracy[variant], seconds[variant] = future.result()
            print(f"({variant}) {VARIANTS[variant][0]}: {accuracy[variant]} in {seconds[variant]:.0f} s", flush=True)
    config = config_from_dict(raw["c"], "<benchmark>")  # the fine-tuning settings every variant shares
    tasks = SHARED / "tasks"
    accuracy["d"] = {
        "sst2_a": (majority([sst[0]], tasks / "sst2" / "validation.jsonl"),) * 2,
        "sst2_b": (majority([sst[1]], tasks / "sst2" / "validation.jsonl"),) * 2,
        "rte": (majority([tasks / "rte" / "train.jsonl"], tasks / "rte" / "validation.jsonl"),) * 2,
        "copa": (majority([tasks / "copa" / "train.jsonl", tasks / "copa" / "train_mirrored_extra.jsonl"], tasks / "copa" / "validation.jsonl"),) * 2,
    }
    rounds = evaluated_rounds(config.run_path)[-1]["round"]
    write_text(args.out, report(accuracy, seconds, pre_result, config, rounds, args))
    print(f"wrote {args.out}")
    return 0


def report(accuracy: dict, seconds: dict, pre_result: dict, config, rounds: int, args) -> str:
    names = {"sst2_a": "SST-2 (oracle sst2_a, 5,000 train)", "sst2_b": "SST-2 (oracle sst2_b, 5,000 train)",
             "rte": "RTE (oracle rte, 2,490 train)", "copa": "COPA (oracle copa, 800 train incl. mirrored)"}
    head = "| task (validation accuracy, %) | (a) pre-trained, λ=0.5 | (b) pre-trained, λ=0 | (c) from scratch | (d) majority class |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for oracle, label in names.items():
        cells = [f"{100 * accuracy[v][oracle][0]:.1f}" for v in "abcd"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    best = ["", "Best accuracy over the rounds (the table above is after the last round):", "", head, "|---|---:|---:|---:|---:|"]
    for oracle, label in names.items():
        best.append(f"| {label} | " + " | ".join(f"{100 * accuracy[v][oracle][1]:.1f}" for v in "abcd") + " |")
    sst = {v: (accuracy[v]["sst2_a"][0] + accuracy[v]["sst2_b"][0]) / 2 for v in "abc"}
    verdict = "met" if sst["a"] > sst["c"] else "NOT met"
    ft = config.finetune
    return "\n".join([
        "# DSFT ablation (a small GPT-1 Table 5)",
        "",
        f"Produced by `python benchmarks/dsft_ablation.py --pretrain-rounds {args.pretrain_rounds} --epochs {args.epochs:g} "
        f"--lr {args.lr:g}` (see its docstring). One federation, sim runtime, four",
        "oracles with different task types: SST-2's 10,000 training examples split across two oracles (alternate",
        "rows), RTE on a third, COPA (multiple choice) on a fourth. Each oracle keeps its own head; the body is",
        "aggregated every round. Validation sets are the official dev sets in `../shared/data/tasks`.",
        "",
        *lines,
        *best,
        "",
        f"Target: pre-trained (a) beats from scratch (c) on SST-2 — **{verdict}** "
        f"(mean of the two SST-2 oracles: {100 * sst['a']:.1f}% vs {100 * sst['c']:.1f}%; λ=0: {100 * sst['b']:.1f}%).",
        "",
        "Settings:",
        f"- model: {MODEL['n_layer']} layers, d_model {MODEL['d_model']}, {MODEL['n_head']} heads, d_ff {MODEL['d_ff']}, "
        f"n_ctx {MODEL['n_ctx']}, {MODEL['ln']}-LN; byte-level BPE with {args.vocab} tokens trained on the pre-training corpora.",
        f"- pre-training (DUPT, sim): 4 oracles ({', '.join(CORPORA)}), {args.pretrain_rounds} rounds x "
        f"{args.pretrain_inner_steps} inner steps x 16 windows of 128 tokens, outer {outer_name(args)}; "
        f"final global validation loss {pre_result['global']:.3f}.",
        f"- fine-tuning (DSFT, sim): lr {ft.lr} (GPT-1: 6.25e-5, for a far larger, longer pre-trained model), batch {ft.batch_size}, "
        f"{ft.epochs:g} epochs of the largest oracle = {rounds} rounds x {ft.inner_steps} inner steps, "
        f"linear warmup {ft.warmup:.1%} then linear decay, classifier dropout {ft.classifier_dropout}, max_len {MODEL['n_ctx']}, "
        f"outer {outer_name(args)}. (c) uses the same tokenizer and architecture with random weights.",
        "- (d) predicts each training set's most frequent label (COPA: the most frequent correct choice index).",
        "",
        f"Wall-clock ({args.threads} thread(s) per process, {args.jobs} fine-tuning variant(s) at once, on a 2-core CPU shared with other jobs): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ".",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
