"""Contribution ledger benchmark: do the ledger's Shapley totals say who brought what?

Run (from the project root, venv active; ~1 hour on 2 free CPU cores with --jobs 2):

    python benchmarks/ledger.py [--rounds 20] [--inner-steps 10] [--seeds 1337 2024] [--jobs 2]
    python benchmarks/ledger.py --overhead      # alone on the machine: seconds the ledger adds to a round
    python benchmarks/ledger.py --signing       # alone on the machine: what signing costs per round (seconds, bytes)
    python benchmarks/ledger.py --signing --quick   # a smoke run of it: prints the table, writes nothing
    python benchmarks/ledger.py --replot        # rewrite ledger.md and the plot from ledger_runs.json

Five oracles pre-train one model (sim runtime, FedAvg, the pre-LN tiny body): the four domains of
../shared/data/pretrain and one more, in three variants:
  random   uniformly random tokens (decoded from random ids of the shared tokenizer)
  copy     an exact copy of the Shakespeare oracle's corpus
  small    5% of the Topical-Chat corpus
and a baseline of the four domains alone. Each variant's ledger totals (Shapley values summed over rounds) are
checked against leave-one-out retraining: the same run without oracle j, scored on all five oracles'
validation sets with the full run's token weights; L(without j) - L(all) is j's ground-truth value. Spearman's
rank correlation between the two is reported per variant and seed. The value of joining: each domain's own
validation loss in the baseline federation next to a model trained on that domain alone for as many steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_MININTERVAL", "30")  # keep the log readable; read when tqdm is imported

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.audit import verify_ledger  # noqa: E402
from dgpt.config import config_from_dict  # noqa: E402
from dgpt.data.tokenizer import TextTokenizer  # noqa: E402
from dgpt.rundir import RunDir, checkpoint_number  # noqa: E402
from dgpt.runtimes.setup import read_run  # noqa: E402
from dgpt.train.evaluate import Validator, weighted_loss  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402
from ledger_signing import signing_cost  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
DOMAINS = {"shakespeare": "literature_shakespeare", "wikitext": "encyclopedia_wikitext2",
           "python_docs": "technical_python_docs", "dialogue": "dialogue_topical_chat"}
EXTRA = {"random": "random_tokens", "copy": "shakespeare_copy", "small": "dialogue_5pct"}
MODEL = {"preset": "tiny", "n_layer": 2, "d_model": 128, "n_head": 4, "d_ff": 512, "n_ctx": 64, "ln": "pre"}
VOCAB, BATCH, EVAL_WINDOWS = 4096, 8, 16


def oracle(name: str, corpora: Path) -> dict:
    folder = DATA / DOMAINS[name] if name in DOMAINS else corpora / name
    return {"name": name, "train": [str(folder / "train.txt")], "valid": [str(folder / "valid.txt")]}


def config(run_dir: Path, names: list[str], corpora: Path, args, seed: int, ledger: dict | None = None, central: bool = False):
    fed = {"runtime": "central" if central else "sim", "rounds": args.rounds, "inner_steps": args.inner_steps,
           "outer_lr": 1.0, "outer_momentum": 0.0, "checkpoint_interval": 10**9}
    return config_from_dict({
        "run_dir": str(run_dir), "seed": seed, "model": MODEL, "oracles": [oracle(n, corpora) for n in names],
        "tokenizer": {"vocab_size": VOCAB, "path": str(corpora / "tokenizer.json")},
        "pretrain": {"batch_size": BATCH, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20, "eval_windows": EVAL_WINDOWS,
                     "steps": args.rounds * args.inner_steps, "eval_interval": 10**9, "checkpoint_interval": 10**9,
                     "keep_checkpoints": 1, "device": "cpu"},
        "federation": fed, "ledger": ledger or {"method": "off"},
    }, "<ledger benchmark>")


def make_corpora(corpora: Path, args) -> None:
    """The shared tokenizer (trained on the four domains) and the three extra oracles' corpora."""
    corpora.mkdir(parents=True, exist_ok=True)
    if not (corpora / "tokenizer.json").is_file():
        base = config(corpora / "_tok", list(DOMAINS), corpora, args, 0)
        base.tokenizer.path = ""
        api.prepare(base)
        shutil.copy2(corpora / "_tok" / "tokenizer.json", corpora / "tokenizer.json")
    tokenizer = TextTokenizer.load(corpora / "tokenizer.json")
    rng = random.Random(0)
    for split, docs in (("train", 400), ("valid", 40)):
        text = "\n\n".join(tokenizer.decode([rng.randrange(5, tokenizer.vocab_size) for _ in range(500)]).replace("\n\n", "\n")
                           for _ in range(docs))
        write(corpora / "random_tokens" / f"{split}.txt", text + "\n")
        write(corpora / "shakespeare_copy" / f"{split}.txt", (DATA / DOMAINS["shakespeare"] / f"{split}.txt").read_text())
        dialogue = (DATA / DOMAINS["dialogue"] / f"{split}.txt").read_text().split("\n\n")
        write(corpora / "dialogue_5pct" / f"{split}.txt", "\n\n".join(dialogue[: max(20, len(dialogue) // 20)]) + "\n")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def train(job: tuple) -> dict:
    """One run in its own process: a ledger run (totals, curve, seconds) or a retraining (its final model's path).
    A run whose final checkpoint exists is reused, so an interrupted benchmark picks up where it stopped."""
    kind, run_dir, names, corpora, args, seed, ledger = job
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    cfg = config(Path(run_dir), names, Path(corpora), args, seed, ledger, central=kind == "alone")
    last = RunDir(run_dir).latest_checkpoint()
    if kind == "overhead" or last is None or checkpoint_number(last) != args.rounds * (args.inner_steps if kind == "alone" else 1):
        shutil.rmtree(run_dir, ignore_errors=True)
        api.pretrain(cfg)
    out = {"kind": kind, "run_dir": str(run_dir), "names": names, "seed": seed}
    if ledger:
        summary = verify_ledger(run_dir)
        rows = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "round" and r["round"] > 0]
        ledger_rows = [json.loads(line) for line in (Path(run_dir) / "ledger.jsonl").read_text().splitlines()][1:]
        out.update(totals={n: t.value for n, t in summary.oracles.items()}, curve=summary.curve,
                   round_seconds=sum(r["seconds"] for r in rows), ledger_seconds=sum(r["cost"]["seconds"] for r in ledger_rows),
                   evaluations=sum(r["cost"]["evaluations"] for r in ledger_rows))
    return out


def score(run_dir: str, full_run: str, names: list[str], corpora: Path, args) -> dict[str, float]:
    """Validation loss per oracle of `run_dir`'s model on every oracle of the full run (its shards)."""
    setup = read_run(config(Path(full_run), names, corpora, args, 0))
    model, _ = api.load_pretrained(run_dir, "cpu")
    return Validator(setup.valid, model.config.n_ctx, EVAL_WINDOWS, BATCH)(model, torch.device("cpu"))


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for pos, i in enumerate(order):
            r[i] = pos + 1.0
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def jobs_for(args, runs: Path, corpora: Path) -> list[tuple]:
    exact = {"method": "shapley", "exact_max": 6}
    jobs = []
    for seed in args.seeds:
        jobs.append(("ledger", runs / f"base_s{seed}", list(DOMAINS), corpora, args, seed, exact))
        for variant, extra in EXTRA.items():
            names = [*DOMAINS, extra]
            jobs.append(("ledger", runs / f"{variant}_s{seed}", names, corpora, args, seed, exact))
            jobs += [("leave_out", runs / f"{variant}_s{seed}_without_{n}", [m for m in names if m != n], corpora, args, seed, None)
                     for n in names]
    jobs += [("alone", runs / f"alone_{n}_s{args.seeds[0]}", [n], corpora, args, args.seeds[0], None) for n in DOMAINS]
    return jobs


def analyse(results: list[dict], args, runs: Path, corpora: Path) -> dict:
    by_dir = {Path(r["run_dir"]).name: r for r in results}
    report = {"setup": {"rounds": args.rounds, "inner_steps": args.inner_steps, "seeds": args.seeds, "model": MODEL,
                        "command": " ".join(sys.argv[1:])}, "variants": []}
    for seed in args.seeds:
        base = by_dir[f"base_s{seed}"]
        for variant, extra in EXTRA.items():
            full = by_dir[f"{variant}_s{seed}"]
            names = full["names"]
            full_scores = score(full["run_dir"], full["run_dir"], names, corpora, args)
            weights = {n: float(sum(len(a) for a in read_run(config(Path(full["run_dir"]), names, corpora, args, 0)).train[n]))
                       for n in names}
            whole = weighted_loss(full_scores, weights)
            truth = {n: weighted_loss(score(by_dir[f"{variant}_s{seed}_without_{n}"]["run_dir"], full["run_dir"], names, corpora, args),
                                      weights) - whole for n in names}
            report["variants"].append({"variant": variant, "seed": seed, "extra": extra, "ledger": full["totals"],
                                       "leave_one_out": truth, "global_loss": whole, "base_ledger": base["totals"],
                                       "spearman": spearman([full["totals"][n] for n in names], [truth[n] for n in names]),
                                       "curve": full["curve"]})
    first = args.seeds[0]
    base_dir = by_dir[f"base_s{first}"]["run_dir"]
    joined = score(base_dir, base_dir, list(DOMAINS), corpora, args)
    report["joining"] = {n: {"federated": joined[n], "alone": score(by_dir[f"alone_{n}_s{first}"]["run_dir"], base_dir, list(DOMAINS),
                                                                    corpora, args)[n]} for n in DOMAINS}
    return report


def markdown(report: dict) -> str:
    s = report["setup"]
    lines = [f"# Contribution ledger: Shapley totals vs leave-one-out retraining\n",
             f"Produced by `python benchmarks/ledger.py {s['command']}` (the overhead by `--overhead`). Five oracles, sim runtime, FedAvg, "
             f"{s['rounds']} rounds of {s['inner_steps']} inner steps (batch {BATCH} x {MODEL['n_ctx']} tokens), pre-LN tiny body "
             f"(2 x 128), seeds {s['seeds']}. Values are nats of token-weighted global validation loss (all five oracles' "
             "validation sets); a total is the sum of the oracle's per-round exact Shapley values.\n"]
    for v in report["variants"]:
        names = list(v["ledger"])
        share = sum(v["ledger"].values())
        lines += [f"## {v['variant']} (seed {v['seed']}): extra oracle `{v['extra']}`; Spearman {v['spearman']:.2f}\n",
                  "| oracle | ledger total | share | leave-one-out value |", "|---|---|---|---|"]
        lines += [f"| {n} | {v['ledger'][n]:.4f} | {v['ledger'][n] / share:.1%} | {v['leave_one_out'][n]:.4f} |" for n in names]
        lines.append("")
    lines += ["## Checks\n"] + checks(report) + ["", "## The value of joining (baseline federation of the four domains)\n",
              "| oracle | own validation loss, federated | trained alone, same steps | gain from joining |", "|---|---|---|---|"]
    lines += [f"| {n} | {j['federated']:.3f} | {j['alone']:.3f} | {j['alone'] - j['federated']:+.3f} |" for n, j in report["joining"].items()]
    if "overhead" in report:
        lines += ["", "## Overhead (measured alone)\n", report["overhead"]]
    if "signing" in report:
        lines += ["", "## What signing costs (measured alone, `--signing`)\n", report["signing"]]
    return "\n".join(lines) + "\n"


def checks(report: dict) -> list[str]:
    out = []
    for v in report["variants"]:
        totals = v["ledger"]
        if v["variant"] == "random":
            lowest = min(totals, key=totals.get) == v["extra"]
            out.append(f"- random, seed {v['seed']}: the random-token oracle's total {totals[v['extra']]:+.4f} is "
                       f"{'the lowest' if lowest else 'NOT the lowest'}{' and at or below zero' if totals[v['extra']] <= 0 else ' but above zero'}.")
        if v["variant"] == "copy":
            pair, alone = totals["shakespeare"] + totals[v["extra"]], v["base_ledger"]["shakespeare"]
            out.append(f"- copy, seed {v['seed']}: Shakespeare and its copy get {totals['shakespeare']:.4f} and "
                       f"{totals[v['extra']]:.4f}, together {pair:.4f}; Shakespeare alone in the baseline federation gets {alone:.4f}.")
        out.append(f"- {v['variant']}, seed {v['seed']}: Spearman between ledger totals and leave-one-out values "
                   f"{v['spearman']:.2f} ({'>=' if v['spearman'] >= 0.8 else '<'} 0.8).")
    return out


def plot(report: dict, out: Path) -> None:
    chosen = [v for v in report["variants"] if v["seed"] == report["setup"]["seeds"][0]]
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4), sharey=True)
    for ax, v in zip(axes, chosen):
        for name, points in v["curve"].items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
        ax.set_title(f"{v['variant']}: + {v['extra']}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative contribution (nats)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ledger_contributions.png", dpi=120)


def overhead(args, runs: Path, corpora: Path) -> str:
    """Seconds per round with the ledger off and at exact_max 4 (sampled) and 6 (exact), one after another."""
    rows = []
    for label, ledger in (("off", {"method": "off"}), ("exact_max 4 (sampled)", {"method": "shapley", "exact_max": 4}),
                          ("exact_max 6 (exact)", {"method": "shapley", "exact_max": 6})):
        r = train(("overhead", runs / f"overhead_{ledger.get('exact_max', 0)}",
                   [*DOMAINS, EXTRA["small"]], corpora, args, args.seeds[0], ledger))
        rounds = [x for x in read_metrics(Path(r["run_dir"]) / "metrics.jsonl") if x["kind"] == "round" and x["round"] > 0]
        per_round = sum(x["seconds"] for x in rounds) / len(rounds)
        spent = r.get("ledger_seconds", 0.0) / len(rounds)
        rows.append(f"| {label} | {per_round:.2f} | {spent:.2f} | {spent / per_round:.0%} | {r.get('evaluations', 0) / len(rounds):.0f} |")
    return "\n".join(["| ledger | s per round | of which ledger | ledger share | validation passes per round |",
                      "|---|---|---|---|---|", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 2024])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_ledger"))
    parser.add_argument("--overhead", action="store_true", help="only measure the ledger's seconds per round (run alone)")
    parser.add_argument("--signing", action="store_true", help="only measure what signing costs per round (run alone)")
    parser.add_argument("--quick", action="store_true", help="with --signing: a smoke run that writes nothing")
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    corpora, saved = args.runs / "corpora", args.out / "ledger_runs.json"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.signing:
        with tempfile.TemporaryDirectory() as tmp:
            before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            table = signing_cost(Path(tmp), repeats=3 if args.quick else 200)
            after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(table)
        if args.quick:
            return
        report = json.loads(saved.read_text())
        report["signing"] = f"{table}\n\n`uptime` before: {before}; after: {after}"
    elif args.replot:
        report = json.loads(saved.read_text())
    elif args.overhead:
        report = json.loads(saved.read_text())
        make_corpora(corpora, args)
        before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        table = overhead(args, args.runs, corpora)
        after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        report["overhead"] = f"{table}\n\n`uptime` before: {before}; after: {after}"
    else:
        make_corpora(corpora, args)
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(train, jobs_for(args, args.runs, corpora)))
        report = analyse(results, args, args.runs, corpora)
    saved.write_text(json.dumps(report, indent=1))
    (args.out / "ledger.md").write_text(markdown(report))
    plot(report, args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
