"""A small version of GPT-1's Table 5 ablation for DSFT, on ../shared/data.

One federation of four oracles with different task types: SST-2 split across two oracles
(classification), RTE on a third (entailment), COPA on a fourth (multiple choice). Validation accuracy of
    (a) fine-tuned from a DUPT checkpoint (pre-trained through the sim runtime on the four corpora of
        ../shared/data/pretrain), auxiliary LM objective lambda = 0.5
    (b) the same with lambda = 0
    (c) the same fine-tuning from scratch (no pre-training; same tokenizer and architecture)
    (d) the majority class of each training set
Writes benchmarks/results/dsft_ablation.md. Run from the repository root:

    python benchmarks/dsft_ablation.py   # about 2.5 hours on a 2-core CPU: 35 min pre-training, 12 + 3 fine-tuning runs

Each variant is fine-tuned at every learning rate of --lrs (with the first of --seeds) and reported at the one
that gives it the best mean SST-2 accuracy, the same rule for every variant (a pre-trained body and a random
one want different step sizes; one shared lr would pick the winner); then each variant's chosen lr runs again
with the other --seeds, which the choice did not see, and the target is judged on the mean over the seeds.

The SST-2 halves are written to --work-dir (outside the project by default); nothing from
../shared/data is copied into the project.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import matplotlib
import torch

from dgpt import api
from dgpt.config import config_from_dict
from dgpt.fileio import write_text
from dgpt.train.metrics import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULT = ROOT / "benchmarks" / "results" / "dsft_ablation.md"
CORPORA = ("literature_shakespeare", "encyclopedia_wikitext2", "technical_python_docs", "dialogue_topical_chat")
# pre-LN: at this budget (a few hundred steps) the post-LN GPT-1 stack stays on the unigram plateau (~6.7 nats)
MODEL = {"preset": "tiny", "n_layer": 4, "n_head": 4, "d_model": 128, "d_ff": 512, "n_ctx": 128, "ln": "pre"}
VARIANTS = {"a": ("pre-trained, lambda 0.5", True, 0.5), "b": ("pre-trained, lambda 0", True, 0.0), "c": ("from scratch, lambda 0.5", False, 0.5)}


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
        "pretrain": {"batch_size": 16, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 30, "eval_windows": 32},
        "federation": {"runtime": "sim", "rounds": args.pretrain_rounds, "inner_steps": args.pretrain_inner_steps,
                       "outer_lr": args.pretrain_outer_lr, "outer_momentum": args.pretrain_outer_momentum, "checkpoint_interval": 1000},
        "ledger": {"method": "off"},
    }


def finetune_config(work: Path, variant: str, lr: float, seed: int, sst: tuple[Path, Path], args) -> dict:
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
    finetune = {"lr": lr, "epochs": args.epochs, "inner_steps": args.inner_steps, "lambda_lm": lam}
    start = {"finetune": {**finetune, "init_from": str(work / "pretrain")}} if pretrained else {
        "finetune": finetune, "model": MODEL, "tokenizer": {"path": str(work / "pretrain" / "tokenizer.json")}}
    suffix = "" if seed == args.seeds[0] else f"_seed{seed}"
    return {"run_dir": str(work / f"finetune_{variant}_lr{lr:g}{suffix}"), "seed": seed, "oracles": oracles,
            "federation": {"runtime": "sim", **outer(args)}, "ledger": {"method": "off"}, **start}


def outer(args) -> dict:
    return {"outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum}


def outer_name(lr: float, momentum: float) -> str:
    if momentum == 0:
        return f"SGD lr {lr:g} without momentum" + (" (FedAvg)" if lr == 1 else "")
    return f"Nesterov SGD lr {lr:g} / momentum {momentum:g}"


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


def sst_curve(run_dir: Path) -> list[float]:
    """Mean SST-2 accuracy of the two SST-2 oracles after every round (round 0: before fine-tuning)."""
    return [(r["metrics"]["sst2_a"]["accuracy"] + r["metrics"]["sst2_b"]["accuracy"]) / 2 for r in evaluated_rounds(run_dir)]


def plot_curves(curves: dict, chosen: dict, epochs_per_round: float, path: Path) -> None:
    """SST-2 accuracy against epochs for every run: each variant's chosen lr drawn solid, the others faint."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {v: plt.cm.tab10(i) for i, v in enumerate(VARIANTS)}
    for (v, lr), curve in curves.items():
        best = lr == chosen[v]
        ax.plot([k * epochs_per_round for k in range(len(curve))], [100 * a for a in curve], color=colors[v],
                lw=2 if best else 1, alpha=1 if best else 0.3, marker="o" if best else None, ms=4,
                label=f"({v}) {VARIANTS[v][0].replace('lambda', 'λ')}, lr {lr:g}" if best else None)
    ax.set(xlabel="epochs of the largest oracle", ylabel="SST-2 validation accuracy, mean of the 2 oracles (%)",
           title="DSFT ablation: SST-2 accuracy during fine-tuning\n(solid: each variant's chosen lr; faint: the rest of the grid)")
    ax.set_ylim(45, None)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_seconds(run_dir: Path) -> float:
    """Wall-clock of a run's rounds, from its metrics (also right when a finished run is reused)."""
    return sum(r["seconds"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "round" and "seconds" in r)


def run_all(configs: dict, args) -> dict:
    """Fine-tune every config, args.jobs at a time: {key: (accuracies, seconds)}."""
    results = {}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {key: pool.submit(run_variant, raw, args.threads) for key, raw in configs.items()}
        for key, future in futures.items():
            results[key] = future.result()
            print(f"{key} {Path(configs[key]['run_dir']).name}: {results[key][0]} in {results[key][1]:.0f} s", flush=True)
    return results


def run_variant(raw: dict, threads: int) -> tuple[dict, float]:
    """One fine-tuning variant in a worker process: its accuracies and the seconds its rounds took."""
    torch.set_num_threads(threads)
    config = config_from_dict(raw, "<benchmark>")
    api.finetune(config)
    return best_and_last(config.run_path), training_seconds(config.run_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="/tmp/dgpt_dsft_ablation", help="runs and the SST-2 halves (outside the project)")
    parser.add_argument("--out", type=Path, default=RESULT, help="the markdown report")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--pretrain-rounds", type=int, default=50)
    parser.add_argument("--pretrain-inner-steps", type=int, default=30)
    parser.add_argument("--lrs", type=lambda text: [float(x) for x in text.split(",")], default=[5e-4, 1e-3, 2e-3, 4e-3],
                        help="fine-tuning learning rates, comma-separated: every variant runs at each, reported at its best")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[2024, 7],
                        help="fine-tuning seeds, comma-separated: the grid runs with the first, each variant's chosen lr with all")
    parser.add_argument("--epochs", type=float, default=3.0, help="GPT-1: 3")
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="per process; 1 is much faster on a shared, busy 2-core machine")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning variants trained at once (one process each)")
    parser.add_argument("--pretrain-outer-lr", type=float, default=1.0, help="pre-training's outer SGD lr")
    parser.add_argument("--pretrain-outer-momentum", type=float, default=0.0, help="pre-training's outer Nesterov momentum")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="fine-tuning's outer SGD lr (1 with momentum 0 = FedAvg)")
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="fine-tuning's outer Nesterov momentum (DiLoCo: 0.9)")
    args = parser.parse_args()
    if not (SHARED / "tasks").is_dir() or not (SHARED / "pretrain").is_dir():
        print(f"shared data not found at {SHARED}; nothing to do", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    sst = split_sst(work)
    pre = config_from_dict(pretrain_config(work, args), "<benchmark>")
    api.prepare(pre)
    pre_result = api.pretrain(pre)  # resumes (or reuses) a finished run in the same work dir
    pretrain_seconds = training_seconds(pre.run_path)
    grid = {(v, lr): finetune_config(work, v, lr, args.seeds[0], sst, args) for v in VARIANTS for lr in args.lrs}
    runs = run_all(grid, args)
    chosen = {v: max(args.lrs, key=lambda lr: sst_mean(runs[v, lr][0])) for v in VARIANTS}
    # the chosen lr of each variant again with fresh fine-tuning seeds: the choice was made on seeds[0]'s dev scores
    repeats = run_all({(v, seed): finetune_config(work, v, chosen[v], seed, sst, args) for v in VARIANTS for seed in args.seeds[1:]}, args)
    seeds = {v: [sst_mean(runs[v, chosen[v]][0])] + [sst_mean(repeats[v, seed][0]) for seed in args.seeds[1:]] for v in VARIANTS}
    accuracy = {v: runs[v, chosen[v]][0] for v in VARIANTS}
    config = config_from_dict(grid["c", args.lrs[0]], "<benchmark>")  # the fine-tuning settings every run shares but lr
    tasks = SHARED / "tasks"
    accuracy["d"] = {
        "sst2_a": (majority([sst[0]], tasks / "sst2" / "validation.jsonl"),) * 2,
        "sst2_b": (majority([sst[1]], tasks / "sst2" / "validation.jsonl"),) * 2,
        "rte": (majority([tasks / "rte" / "train.jsonl"], tasks / "rte" / "validation.jsonl"),) * 2,
        "copa": (majority([tasks / "copa" / "train.jsonl", tasks / "copa" / "train_mirrored_extra.jsonl"], tasks / "copa" / "validation.jsonl"),) * 2,
    }
    rounds = evaluated_rounds(config.run_path)[-1]["round"]
    curves = {key: sst_curve(Path(raw["run_dir"])) for key, raw in grid.items()}
    plot_curves(curves, chosen, args.epochs / rounds, args.out.with_name(args.out.stem + "_sst2_by_round.png"))
    write_text(args.out, report(accuracy, runs, curves, chosen, seeds, pretrain_seconds, pre_result, config, rounds, args))
    print(f"wrote {args.out}")
    return 0


def sst_mean(accuracy: dict) -> float:
    """Mean accuracy of the two SST-2 oracles after the last round: the number the target compares."""
    return (accuracy["sst2_a"][0] + accuracy["sst2_b"][0]) / 2


def grid_table(runs: dict, chosen: dict, args) -> list[str]:
    """SST-2 mean accuracy of every (variant, lr) run; the chosen lr of each variant in bold."""
    lines = ["| SST-2 mean accuracy, % | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |", "|---|" + "---:|" * len(args.lrs)]
    for v, (name, _, _) in VARIANTS.items():
        cells = [f"{100 * sst_mean(runs[v, lr][0]):.1f}" for lr in args.lrs]
        cells = [f"**{c}**" if lr == chosen[v] else c for c, lr in zip(cells, args.lrs)]
        lines.append(f"| ({v}) {name.replace('lambda', 'λ')} | " + " | ".join(cells) + " |")
    return lines


def curve_table(curves: dict, chosen: dict, epochs_per_round: float) -> list[str]:
    """SST-2 mean accuracy after every round at each variant's chosen lr: where pre-training shows early."""
    length = len(next(iter(curves.values())))
    lines = ["| SST-2 mean accuracy, % | " + " | ".join(f"{k * epochs_per_round:.1f}" for k in range(length)) + " |",
             "|---|" + "---:|" * length]
    for v in VARIANTS:
        lines.append(f"| ({v}) lr {chosen[v]:g} | " + " | ".join(f"{100 * a:.1f}" for a in curves[v, chosen[v]]) + " |")
    return lines


def seed_table(seeds: dict, chosen: dict, args) -> list[str]:
    """SST-2 mean accuracy at each variant's chosen lr for every fine-tuning seed, and their mean."""
    lines = ["| SST-2 mean accuracy, % | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |", "|---|" + "---:|" * (len(args.seeds) + 1)]
    for v, values in seeds.items():
        lines.append(f"| ({v}) {VARIANTS[v][0].replace('lambda', 'λ')}, lr {chosen[v]:g} | " + " | ".join(f"{100 * a:.1f}" for a in values) + f" | {100 * sum(values) / len(values):.1f} |")
    return lines


def report(accuracy: dict, runs: dict, curves: dict, chosen: dict, seeds: dict, pretrain_seconds: float, pre_result, config, rounds: int, args) -> str:
    names = {"sst2_a": "SST-2 (oracle sst2_a, 5,000 train)", "sst2_b": "SST-2 (oracle sst2_b, 5,000 train)",
             "rte": "RTE (oracle rte, 2,490 train)", "copa": "COPA (oracle copa, 800 train incl. mirrored)"}
    head = "| task (validation accuracy, %) | (a) pre-trained, λ=0.5 | (b) pre-trained, λ=0 | (c) from scratch | (d) majority class |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for oracle, label in names.items():
        cells = [f"{100 * accuracy[v][oracle][0]:.1f}" for v in "abcd"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    best = ["", "Best accuracy over the rounds, same runs (the table above is after the last round):", "", head, "|---|---:|---:|---:|---:|"]
    for oracle, label in names.items():
        best.append(f"| {label} | " + " | ".join(f"{100 * accuracy[v][oracle][1]:.1f}" for v in "abcd") + " |")
    sst = {v: sum(values) / len(values) for v, values in seeds.items()}
    verdict = "met" if sst["a"] > sst["c"] else "NOT met"
    per_round = args.epochs / rounds
    plot_name = args.out.stem + "_sst2_by_round.png"
    pairs = [lr for lr in args.lrs if sst_mean(runs["a", lr][0]) > sst_mean(runs["c", lr][0])]
    at_equal_lr = f"(a) is ahead of (c) at {len(pairs)} of the {len(args.lrs)} learning rates of the grid (seed {args.seeds[0]})"
    ft = config.finetune
    return "\n".join([
        "# DSFT ablation (a small GPT-1 Table 5)",
        "",
        f"Produced by `python benchmarks/dsft_ablation.py {' '.join(sys.argv[1:])}` (see its docstring). One federation, sim runtime, four",
        "oracles with different task types: SST-2's 10,000 training examples split across two oracles (alternate",
        "rows), RTE on a third, COPA (multiple choice) on a fourth. Each oracle keeps its own head; the body is",
        "aggregated every round. Validation sets are the official dev sets in `../shared/data/tasks`.",
        "",
        "Every variant is fine-tuned at each learning rate of one grid, and reported at the learning rate that gives",
        "it the best mean SST-2 accuracy after the last round (the same rule for every variant; no other setting",
        "differs). The grid:",
        "",
        *grid_table(runs, chosen, args),
        "",
        "At each variant's chosen learning rate (" + ", ".join(f"({v}) {chosen[v]:g}" for v in VARIANTS) + "), after the last round:",
        "",
        *lines,
        *best,
        "",
        "During fine-tuning (columns: epochs of the largest oracle; one round each), at each variant's chosen lr:",
        "",
        *curve_table(curves, chosen, per_round),
        "",
        f"![SST-2 accuracy by round]({plot_name})",
        "",
        f"Each variant's chosen lr again with {len(args.seeds) - 1} more fine-tuning seed(s) (the lr was chosen on seed "
        f"{args.seeds[0]}'s scores, so the other seeds are a check the choice did not see):",
        "",
        *seed_table(seeds, chosen, args),
        "",
        f"Target: pre-trained (a) beats from scratch (c) on SST-2 — **{verdict}** "
        f"(mean over the seeds of the two SST-2 oracles' mean: {100 * sst['a']:.1f}% vs {100 * sst['c']:.1f}%; "
        f"λ=0: {100 * sst['b']:.1f}%); {at_equal_lr}.",
        "",
        "Settings:",
        f"- model: {MODEL['n_layer']} layers, d_model {MODEL['d_model']}, {MODEL['n_head']} heads, d_ff {MODEL['d_ff']}, "
        f"n_ctx {MODEL['n_ctx']}, {MODEL['ln']}-LN; byte-level BPE with {args.vocab} tokens trained on the pre-training corpora.",
        f"- pre-training (DUPT, sim): 4 oracles ({', '.join(CORPORA)}), {args.pretrain_rounds} rounds x "
        f"{args.pretrain_inner_steps} inner steps x 16 windows of 128 tokens, outer {outer_name(args.pretrain_outer_lr, args.pretrain_outer_momentum)}; "
        f"final global validation loss {pre_result.loss:.3f}.",
        f"- fine-tuning (DSFT, sim): lr grid {', '.join(f'{lr:g}' for lr in args.lrs)} (GPT-1: 6.25e-5, for a far larger, longer pre-trained model), batch {ft.batch_size}, "
        f"{ft.epochs:g} epochs of the largest oracle = {rounds} rounds x {ft.inner_steps} inner steps, "
        f"linear warmup {ft.warmup:.1%} then linear decay, classifier dropout {ft.classifier_dropout}, max_len {MODEL['n_ctx']}, "
        f"outer {outer_name(args.outer_lr, args.outer_momentum)}. (c) uses the same tokenizer and architecture with random weights.",
        "- (d) predicts each training set's most frequent label (COPA: the most frequent correct choice index).",
        "",
        f"Wall-clock of each run's rounds ({args.threads} thread(s) per process, on a 2-core CPU where other runs and jobs "
        f"ran beside it): pre-training {pretrain_seconds / 60:.1f} min; fine-tuning grid "
        + ", ".join(f"({v}, {lr:g}) {sec / 60:.1f}" for (v, lr), (_, sec) in runs.items()) + " min.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
