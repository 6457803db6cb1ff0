"""Robustness benchmark: one poisoned oracle against every aggregation setting, in sim and under torchrun.

Run (from the project root, venv active; ~40 min on 2 free CPU cores with --jobs 2, ~16 min with --quick):

    python benchmarks/poison.py [--rounds 15] [--inner-steps 10] [--jobs 2] [--quick] [--no-torchrun]
    python benchmarks/poison.py --replot          # rewrite poison.md from poison_runs.json

An interrupted run picks up where it stopped: runs under --runs that reached their last round are reused.

Six non-IID oracles (the four domains of ../shared/data/pretrain, the Python docs and Topical-Chat split in halves)
pre-train the pre-LN tiny body with the FedAvg outer step. One of them, half of Topical-Chat (the largest share of
the tokens, ~20%), is hostile and sends a different pseudo-gradient from the one it trained:
  x1000   its update scaled by 1000 (a blow-up, or an attacker that wants to dominate)
  x-10    its update reversed and scaled by 10 (an attacker pushing the model back up the loss)
  x-1     its update reversed at its honest length (the same push, invisible to any test of length)
  xnan    NaN: rejected by every rule, so the oracle is simply left out. Its ratio is what losing the oracle's
          (honest) data costs: the floor no defence can beat, since a defence can at best ignore the attacker
Every combination of aggregation rule {mean, trimmed mean (0.25), coordinate median, geometric median} x for the
robust rules the filter {off, on: norm_filter 3 (updates over 3x the round's median norm left out) and min_cosine 0
(updates pointing away from the round's coordinate-wise median left out)} x clipping {off, clip_norm} x oracle drops {0, 0.5} x
outer extrapolation {none, FedExP} runs clean and under each attack, with the same seed, so the
same oracles are drawn each round. The robust rules run as configured by default: the median with bucket_size 2 (the
accepted updates dealt at random into pairs whose means it combines), and a skipped round's accepted updates held for
the next; two ablation rows turn the median's bucketing off (bucket_size 1). The score is the final validation loss on the five honest
oracles' validation sets (token-weighted); the target is that the robust rules (trimmed mean, median, geometric
median) end within 2% of their own clean run in every combination. The plain mean is there to show what the attack
does without a defence.

Under torchrun the hostile oracle is a rank that lies: it runs dgpt through tests/torchrun_probe.py, which makes
that rank multiply what it sends (by 1000, -10, -1 or NaN). Every receiving rank checks the bytes it got, so the run must
equal the sim run with the same tamper; the table gives both losses side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_MININTERVAL", "30")

import torch  # noqa: E402

from _timing import SETTLE_S, machine_load, settled_load  # noqa: E402
from federated_runs import DATA, fresh_run_dir, global_loss, messages_as  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.config import config_from_dict, dump_config  # noqa: E402
from dgpt.runtimes.sim import pretrain_sim  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "torchrun_probe.py"
# Six oracles: the four domains, the two largest split in halves (alternate documents), so that trimmed mean (one cut
# from each end) and median differ and a round that lost half its oracles still has three updates.
SPLIT = {"dialogue_topical_chat": ("dialogue_a", "dialogue_b"), "technical_python_docs": ("pydocs_a", "pydocs_b")}
ORACLES = ["literature_shakespeare", "encyclopedia_wikitext2", "pydocs_a", "pydocs_b", "dialogue_a", "dialogue_b"]
SHORT = {"literature_shakespeare": "shakesp.", "encyclopedia_wikitext2": "wiki", "pydocs_a": "pydocs_a",
         "pydocs_b": "pydocs_b", "dialogue_a": "dialogue_a", "dialogue_b": "dialogue_b"}
POISONED = "dialogue_a"
ATTACKS = {"clean": None, "x1000": 1000.0, "x-10": -10.0, "x-1": -1.0, "xnan": float("nan")}
RULES = {"mean": {"aggregator": "mean"}, "trimmed": {"aggregator": "trimmed_mean", "trim_fraction": 0.25},
         "median": {"aggregator": "median"}, "geomed": {"aggregator": "geometric_median"}}
ROBUST = ("trimmed", "median", "geomed")
TARGET = 1.02
FILTER = {"norm_filter": 3.0, "min_cosine": 0.0}  # the "filter" rows: out of line in length or direction
FULL = dict(model={"preset": "tiny", "n_layer": 1, "d_model": 64, "n_head": 2, "d_ff": 256, "n_ctx": 32, "ln": "pre"},
            batch=8, eval_windows=32, lr=2e-3)
QUICK = dict(model=FULL["model"], batch=4, eval_windows=8, lr=2e-3)


ABLATION = {"bucket1": {"bucket_size": 1}}  # rows that turn one default of the robust rules off


def settings(clip_norm: float) -> list[dict]:
    """Every combination of rule x filter (robust rules: FILTER) x clip x drops x extrapolation, as a name and its
    federation overrides; then the ablation rows (median, filter off and on, nothing else)."""
    grid = []
    for (rule, agg), filt, clip, drop, fedexp in itertools.product(RULES.items(), (False, True), (0.0, clip_norm),
                                                                   (0.0, 0.5), (False, True)):
        if filt and rule not in ROBUST:
            continue
        name = f"{rule}{' filter' if filt else ''}{' clip' if clip else ''}{' drop' if drop else ''}{' fedexp' if fedexp else ''}"
        grid.append({"name": name, "rule": rule, "fed": {**agg, **(FILTER if filt else {}), "clip_norm": clip, "drop_prob": drop,
                                                          "extrapolation": "fedexp" if fedexp else "none"}})
    for (label, change), filt in itertools.product(ABLATION.items(), (False, True)):
        grid.append({"name": f"median{' filter' if filt else ''} {label}", "rule": "median", "ablation": True,
                     "fed": {**RULES["median"], **(FILTER if filt else {}), **change}})
    return grid


def write_corpora(corpora: Path) -> None:
    """The halves of the split domains, under the runs directory (derived at run time, never committed)."""
    for domain, halves in SPLIT.items():
        for split in ("train", "valid"):
            docs = (DATA / domain / f"{split}.txt").read_text(encoding="utf-8").split("\n\n")
            for i, half in enumerate(halves):
                path = corpora / half / f"{split}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("\n\n".join(docs[i::2]), encoding="utf-8")


def corpus(name: str, corpora: Path) -> Path:
    return corpora / name if name not in ORACLES[:2] else DATA / name


def raw_config(run_dir: Path, setup: dict, rounds: int, inner_steps: int, fed: dict, runtime: str = "sim") -> dict:
    lr, corpora = setup["lr"], run_dir.parent / "_corpora"
    return {
        "run_dir": str(run_dir), "seed": 1337, "model": setup["model"], "tokenizer": {"vocab_size": 4096},
        "oracles": [{"name": n, "train": [str(corpus(n, corpora) / "train.txt")], "valid": [str(corpus(n, corpora) / "valid.txt")]}
                    for n in ORACLES],
        "pretrain": {"steps": rounds * inner_steps, "batch_size": setup["batch"], "lr": lr, "min_lr": lr / 10,
                     "warmup_steps": inner_steps, "eval_windows": setup["eval_windows"], "log_interval": 10**9,
                     "checkpoint_interval": 10**9, "keep_checkpoints": 1, "device": "cpu",
                     "dtype": "float32"},  # the same numbers on every CPU (auto picks bf16 where it is native)
        "federation": {"runtime": runtime, "rounds": rounds, "inner_steps": inner_steps, "outer_lr": 1.0,
                       "outer_momentum": 0.0, "eval_interval": rounds, "checkpoint_interval": 10**9, **fed},
        "ledger": {"method": "off"},
    }


def final_loss(run_dir: Path, weights: dict[str, int]) -> dict:
    """The last evaluated round: honest global loss, rounds skipped and updates rejected over the run."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "round"]
    last = [r for r in rows if "oracles" in r][-1]
    return {"loss": global_loss(last["oracles"], weights), "skipped": sum(1 for r in rows if r.get("skipped")),
            "rejected": sum(len(r.get("rejected", [])) for r in rows),
            "hostile_rounds": sum(1 for r in rows if POISONED in r.get("participants", []))}


def finished(run_dir: Path, rounds: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(r["kind"] == "round" and r["round"] == rounds for r in read_metrics(path))


def tamper_for(factor: float | None):
    if factor is None:
        return None
    return lambda name, delta: delta * factor if name == POISONED else delta


def run_sim(job: tuple) -> dict:
    """One (setting, attack) pair in the sim runtime, in a worker process with one torch thread."""
    torch.set_num_threads(1)
    setting, attack, factor, runs, setup, rounds, inner_steps, weights = job
    name = f"{setting['name']} {attack}".replace(" ", "_").replace("-", "m")
    t0 = time.perf_counter()
    if not finished(runs / name, rounds):  # an interrupted benchmark reuses the runs it finished
        run_dir = fresh_run_dir(runs, name)
        config = config_from_dict(raw_config(run_dir, setup, rounds, inner_steps, setting["fed"]))
        with messages_as(run_dir.name):
            pretrain_sim(config, tamper=tamper_for(factor))
    result = final_loss(runs / name, weights)
    print(f"=== {setting['name']} / {attack}: loss {result['loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"setting": setting["name"], "rule": setting["rule"], "ablation": setting.get("ablation", False), "attack": attack,
            **result}


def run_torchrun(runs: Path, setup: dict, rounds: int, inner_steps: int, fed: dict, name: str, factor: str,
                 weights: dict[str, int]) -> dict:
    """The same run under torchrun, one rank per oracle, the hostile oracle's rank lying through the probe."""
    run_dir = runs / f"torchrun {name} x{factor}".replace(" ", "_")
    if finished(run_dir, rounds):
        return {"setting": name, "attack": f"x{factor}", **final_loss(run_dir, weights)}
    run_dir = fresh_run_dir(runs, run_dir.name)
    config = config_from_dict(raw_config(run_dir, setup, rounds, inner_steps, fed, runtime="torchrun"))
    path = run_dir / "config.toml"
    path.write_text(dump_config(config))
    rank = ORACLES.index(POISONED)
    env = {**os.environ, "DGPT_PROBE_LIE": f"{rank}:{factor}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(ORACLES)}",
           str(PROBE), str(run_dir / "calls"), "pretrain", str(path), "-q"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 and not finished(run_dir, rounds):
        raise SystemExit(f"torchrun {name} x{factor} failed:\n{done.stderr[-3000:]}")
    aborted = [line for line in done.stderr.splitlines() if "terminate called" in line or "exitcode  : -" in line]
    result = {**final_loss(run_dir, weights), "exit": done.returncode, "exit_lines": aborted[:3]}
    print(f"=== torchrun {name} / x{factor}: loss {result['loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"setting": name, "attack": f"x{factor}", **result}


TORCHRUN_CASES = [("median", "1000"), ("trimmed", "1000"), ("median fedexp", "1000"), ("trimmed filter", "-10"),
                  ("geomed filter", "-1"), ("geomed filter drop", "-1"), ("mean", "nan")]


def report(data: dict) -> str:
    by = {(r["setting"], r["attack"]): r for r in data["sim"]}
    names = list(dict.fromkeys(r["setting"] for r in data["sim"]))
    attacks = [a for a in ATTACKS if a != "clean"]
    lines = [
        "# Robustness: one poisoned oracle against every aggregation setting", "",
        f"Six oracles ({', '.join(SHORT[n] for n in ORACLES)}), {data['rounds']} rounds x H={data['inner_steps']}, "
        f"FedAvg outer step, model {data['model']}; `{SHORT[POISONED]}` ({data['poisoned_share']:.0%} of the tokens) "
        f"is hostile. clip = clip_norm {data['clip_norm']:g} (honest updates' norms: {data['honest_norms']}); drop = "
        f"drop_prob 0.5 (the same draws in every run); filter = {', '.join(f'{k} {v:g}' for k, v in FILTER.items())}. Loss = final validation loss on the five honest oracles, "
        "token-weighted. With drop, a robust rule skips rounds with fewer than 3 updates (counted) and holds their accepted updates for the next round. Ratio = attacked / clean of the same setting; **bold** where a robust rule misses the 2% target.",
        "", "| setting | clean | " + " | ".join(f"{a} | ratio" for a in attacks) + " | rounds skipped | rounds the hostile oracle took part |",
        "|---|---|" + "---|---|" * len(attacks) + "---|---|"]
    for name in names:
        clean = by[(name, "clean")]
        cells = [f"{clean['loss']:.4f}"]
        for attack in attacks:
            r = by[(name, attack)]
            ratio = r["loss"] / clean["loss"]
            text = f"{ratio:.3f}" if ratio < 100 else f"{ratio:.3g}"
            cells += [f"{r['loss']:.4g}", f"**{text}**" if r["rule"] in ROBUST and not ratio <= TARGET else text]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {clean['skipped']} | {clean['hostile_rounds']} |")
    lines += ["", *verdict(by, names), "", "Floors (the xnan ratio: what leaving the hostile oracle out costs, the best any "
              "defence that ignores it can do): " + "; ".join(f"{rule} {min(fl):.3f}-{max(fl):.3f}"
                                                           for rule, fl in floors(by, names).items()) + ".", "",
              *summary(by, names, attacks), ""]
    if data.get("torchrun"):
        lines += ["## torchrun with a lying rank", "",
                  f"The rank of `{SHORT[POISONED]}` multiplies what it sends; every rank checks what it received.", "",
                  "| setting | attack | torchrun loss | sim loss (same tamper) | equal | updates rejected | torchrun exit status |",
                  "|---|---|---|---|---|---|---|"]
        for r in data["torchrun"]:
            sim = data["torchrun_sim"][f"{r['setting']} {r['attack']}"]
            lines.append(f"| {r['setting']} | {r['attack']} | {r['loss']:.6f} | {sim['loss']:.6f} | "
                         f"{'yes' if abs(r['loss'] - sim['loss']) <= 1e-4 * abs(sim['loss']) else 'NO'} | {r['rejected']} | "
                         f"{r.get('exit', 0)}{' (a rank aborted at exit, after the last round)' if r.get('exit') else ''} |")
        lines.append("")
    lines += [f"Load: {data['uptime_before']} (before), {data['uptime_after']} ({data['settle_s']} s after). Wall time {data['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def verdict(by: dict, names: list[str]) -> list[str]:
    """The target, per group of cells: the robust rules (as configured by default) under the blow-up and NaN attacks,
    with the filter under every attack, without it under a reversed update; and what turning bucketing off does."""
    def over(settings: list[str], attacks: tuple[str, ...]) -> tuple[list[str], int]:
        cells = [(n, a) for n in settings for a in attacks]
        return [f"{n} / {a}" for n, a in cells if not by[(n, a)]["loss"] <= TARGET * by[(n, "clean")]["loss"]], len(cells)

    def said(missed: list[str], count: int) -> str:
        return f"met in all {count} cells." if not missed else f"**missed** in {len(missed)} of {count}: {', '.join(missed)}."

    robust = [n for n in names if by[(n, "clean")]["rule"] in ROBUST and not by[(n, "clean")].get("ablation")]
    filtered = [n for n in robust if " filter" in n]
    bare = [n for n in robust if " filter" not in n]
    ablation = [n for n in names if by[(n, "clean")].get("ablation")]
    reversed_, reversed_count = over(bare, ("x-10", "x-1"))
    lines = ["**Target**: every robust rule within 2% of its clean run in every combination of clip, drops and FedExP.",
             "", "- Under x1000 and NaN, with the filter or without: " + said(*over(robust, ("x1000", "xnan"))),
             "- With the filter, under every attack: " + said(*over(filtered, ("x1000", "x-10", "x-1", "xnan"))),
             f"- Without the filter, under a reversed update (x-10, x-1): within 2% in {reversed_count - len(reversed_)} of "
             f"{reversed_count} cells. A rule that ranks or weighs updates bounds how far one inside the honest range "
             "pulls, not the bias it leaves; leaving it out takes the test of direction (`min_cosine`) the filter adds."
             + (f" Over 2% in: {', '.join(reversed_)}." if reversed_ else "")]
    if ablation:
        lines.append(f"- Ablation, bucketing off (`{'`, `'.join(ablation)}`): clean loss "
                     + ", ".join(f"{by[(n, 'clean')]['loss']:.4f}" for n in ablation) + " against "
                     + ", ".join(f"{by[(n.rsplit(' ', 1)[0], 'clean')]['loss']:.4f}" for n in ablation)
                     + " with bucketing; under x1000 and NaN " + said(*over(ablation, ("x1000", "xnan"))))
    return lines


def summary(by: dict, names: list[str], attacks: list[str]) -> list[str]:
    """Per robust rule, with and without the filter: the worst attacked / clean ratio, the cells over 2%, the floor,
    and how many honest updates the filter left out of the clean runs (its false alarms)."""
    lines = ["| rule | filter | worst attacked / clean | cells over 2% | floor (xnan / clean) | honest updates the filter left out (clean runs) |",
             "|---|---|---|---|---|---|"]
    for rule, filtered in itertools.product(ROBUST, (False, True)):
        mine = [n for n in names if by[(n, "clean")]["rule"] == rule and (" filter" in n) == filtered
                and not by[(n, "clean")].get("ablation")]
        ratios = [by[(n, a)]["loss"] / by[(n, "clean")]["loss"] for n in mine for a in attacks]
        floor = [by[(n, "xnan")]["loss"] / by[(n, "clean")]["loss"] for n in mine]
        false_alarms = sum(by[(n, "clean")]["rejected"] for n in mine) if filtered else "-"
        lines.append(f"| {rule} | {'on' if filtered else 'off'} | {max(ratios):.3f} | {sum(r > TARGET for r in ratios)} of "
                     f"{len(ratios)} | {min(floor):.3f}-{max(floor):.3f} | {false_alarms} |")
    return lines


def floors(by: dict, names: list[str]) -> dict[str, list[float]]:
    """Per robust rule, the xnan / clean ratios of its settings."""
    out: dict[str, list[float]] = {}
    for name in names:
        clean, left_out = by[(name, "clean")], by[(name, "xnan")]
        if clean["rule"] in ROBUST and not clean.get("ablation"):
            out.setdefault(clean["rule"], []).append(left_out["loss"] / clean["loss"])
    return out


def honest_norms(runs: Path, setup: dict, rounds: int, inner_steps: int) -> list[float]:
    """The honest updates' norms in a clean mean run (one round): clip_norm is set at twice their median."""
    run_dir = fresh_run_dir(runs, "norms")
    config = config_from_dict(raw_config(run_dir, setup, 1, inner_steps, {"aggregator": "mean"}))
    with messages_as("norms"):
        pretrain_sim(config)
    rounds = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return sorted(o["norm"] for r in rounds if r["kind"] == "round" for o in r["oracles"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 4, 8 validation windows, 4 rounds: a smoke test")
    parser.add_argument("--no-torchrun", action="store_true")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_poison"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    stem = "poison_quick" if args.quick else "poison"
    if args.replot:
        data = json.loads((args.out / f"{stem}_runs.json").read_text())
        (args.out / f"{stem}.md").write_text(report(data))
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing: this benchmark needs ../shared/data/pretrain")
    setup, rounds = (QUICK, 4) if args.quick else (FULL, args.rounds)
    uptime_before = machine_load()
    t0 = time.perf_counter()
    write_corpora(args.runs / "_corpora")
    with messages_as("prepare"):
        stats = api.prepare(config_from_dict(raw_config(args.runs / "_data", setup, rounds, args.inner_steps, {})))
    tokens = {n: stats[n]["train"]["tokens"] for n in ORACLES}
    weights = {n: t for n, t in tokens.items() if n != POISONED}
    norms = honest_norms(args.runs, setup, rounds, args.inner_steps)
    clip_norm = round(2 * norms[len(norms) // 2], 2)
    grid = settings(clip_norm)
    jobs = [(s, a, f, args.runs, setup, rounds, args.inner_steps, weights) for s in grid for a, f in ATTACKS.items()]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        sim = list(pool.map(run_sim, jobs))
    data = {"rounds": rounds, "inner_steps": args.inner_steps, "model": setup["model"], "clip_norm": clip_norm,
            "honest_norms": ", ".join(f"{n:.2f}" for n in norms), "poisoned_share": tokens[POISONED] / sum(tokens.values()),
            "sim": sim, "torchrun": [], "torchrun_sim": {}}
    if not args.no_torchrun:
        fed_of = {s["name"]: s["fed"] for s in grid}
        for name, factor in TORCHRUN_CASES:
            data["torchrun"].append(run_torchrun(args.runs, setup, rounds, args.inner_steps, fed_of[name], name, factor, weights))
            data["torchrun_sim"][f"{name} x{factor}"] = next(r for r in sim if r["setting"] == name and r["attack"] == f"x{factor}")
    data["seconds"] = time.perf_counter() - t0
    data["uptime_before"] = uptime_before
    data["uptime_after"], data["settle_s"] = settled_load(), SETTLE_S
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}_runs.json").write_text(json.dumps(data, indent=1) + "\n")
    text = report(data)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
