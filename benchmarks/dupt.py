"""DUPT benchmark: centralised vs decentralised (DiLoCo) pre-training of one GPT-1 decoder, side by side.

Run (from the project root, venv active; ~20 min on 2 free CPU cores, far longer when they are shared; ~1 min
with --quick):

    python benchmarks/dupt.py [--steps 600] [--batch 8] [--quick] [--jobs 2] [--out benchmarks/results] [--runs runs/bench_dupt]
    python benchmarks/dupt.py --replot        # rewrite dupt.md and the plots from dupt_runs.json
    python benchmarks/dupt.py --arms central,H=50 --outer-lr 2 --outer-momentum 0 --runs /tmp/sweep  # a sweep: prints only
    python benchmarks/dupt.py --steps 2400 --arms "central,H=50,central batch 8,H=50 IID" --stem dupt_horizon_2400
    python benchmarks/dupt.py --ln pre --inner-lr 2e-3 --outer-lr 1 --outer-momentum 0 --arms "central,H=50,H=50 fedexp" --runs /tmp/s

Four non-IID oracles of unequal size (Shakespeare, WikiText-2, Python docs, Topical-Chat from
../shared/data/pretrain) pre-train one model. Every arm trains on the same number of tokens:
`--steps` optimizer steps of batch B per oracle (decentralised), or `--steps` steps of batch 4B on
the pooled data (centralised). Arms:
  central                 pooled data, global batch 4B                   (the baseline)
  H=1, 10, 50, 200        sim runtime, DiLoCo outer Nesterov SGD (lr 0.7, momentum 0.9)
  H=50 int8               int8 pseudo-gradients (per-tensor scales)
  H=50 drop 0.5           each oracle misses each round with probability 0.5 (fewer tokens trained)
  H=50 poison <agg>       one oracle sends -10 x its pseudo-gradient; mean, trimmed_mean (0.25), median
Controls say where the gap to central comes from:
  central batch 8         one trainer with one oracle's batch (a quarter of the tokens): what one oracle gets alone
  H=50 IID, H=1 IID       every oracle holds the pooled corpus: no non-IID data
  ... fedexp              the same arms with FedExP extrapolation of the aggregated update
Measured per arm: global validation loss (per-oracle losses weighted by training tokens, the same
weights for every arm) and its ratio to central, per-oracle validation losses, bytes moved (total and
sent by oracles) against what synchronous data parallel would move for the same steps, wall time.
Writes dupt.md, dupt_runs.json, dupt_loss_vs_tokens.png and dupt_loss_vs_bytes.png under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("TQDM_MININTERVAL", "30")  # keep the nohup log readable; read when tqdm is imported

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.config import config_from_dict  # noqa: E402
from dgpt.data.tokenizer import TextTokenizer  # noqa: E402
from dgpt.federation.accounting import human_bytes  # noqa: E402
from dgpt.logs import messages_to  # noqa: E402
from dgpt.model.gpt import GPT  # noqa: E402
from dgpt.runtimes.setup import model_config_for  # noqa: E402
from dgpt.runtimes.sim import pretrain_sim  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
ORACLES = ["literature_shakespeare", "encyclopedia_wikitext2", "technical_python_docs", "dialogue_topical_chat"]
LARGE = DATA.parent / "pretrain_large"
DATASETS = {  # --data: oracle -> folder of its train.txt / valid.txt
    "small": {n: DATA / n for n in ORACLES},
    "large": {"literature_gutenberg": LARGE / "literature_gutenberg", "encyclopedia_wikitext2": DATA / "encyclopedia_wikitext2",
              "technical_linux_kernel_docs": LARGE / "technical_linux_kernel_docs",
              "dialogue_topical_chat": DATA / "dialogue_topical_chat"},
}
SHORT = {"literature_shakespeare": "shakesp.", "encyclopedia_wikitext2": "wiki", "technical_python_docs": "pydocs",
         "dialogue_topical_chat": "dialogue"}
POISONED = "dialogue_topical_chat"  # the largest oracle: the heaviest weight under the token-weighted mean
POISON_SCALE = -10.0
VOCAB = 4096
FULL = dict(model={"preset": "tiny", "n_layer": 2, "d_model": 128, "n_head": 4, "d_ff": 512, "n_ctx": 64},
            batch=8, eval_windows=48, evals=12)
QUICK = dict(model={"preset": "tiny", "n_layer": 1, "d_model": 64, "n_head": 2, "d_ff": 256, "n_ctx": 32},
             batch=4, eval_windows=8, evals=4)

# name, kind, federation overrides, poisoned?
ARMS = [
    ("central", "central", {}, False),
    ("H=1", "sim", {"inner_steps": 1}, False),
    ("H=10", "sim", {"inner_steps": 10}, False),
    ("H=50", "sim", {"inner_steps": 50}, False),
    ("H=200", "sim", {"inner_steps": 200}, False),
    ("H=50 int8", "sim", {"inner_steps": 50, "compression": "int8"}, False),
    ("H=50 drop 0.5", "sim", {"inner_steps": 50, "drop_prob": 0.5}, False),
    ("H=50 poison mean", "sim", {"inner_steps": 50, "aggregator": "mean"}, True),
    ("H=50 poison trimmed", "sim", {"inner_steps": 50, "aggregator": "trimmed_mean", "trim_fraction": 0.25}, True),
    ("H=50 poison median", "sim", {"inner_steps": 50, "aggregator": "median"}, True),
    ("central batch 8", "central_one_batch", {}, False),
    ("H=50 IID", "sim_iid", {"inner_steps": 50}, False),
    ("H=1 IID", "sim_iid", {"inner_steps": 1}, False),
    ("H=1 fedexp", "sim", {"inner_steps": 1, "extrapolation": "fedexp"}, False),
    ("H=50 fedexp", "sim", {"inner_steps": 50, "extrapolation": "fedexp"}, False),
    ("H=50 fedexp int8", "sim", {"inner_steps": 50, "extrapolation": "fedexp", "compression": "int8"}, False),
    ("H=50 IID fedexp", "sim_iid", {"inner_steps": 50, "extrapolation": "fedexp"}, False),
    ("H=1 IID fedexp", "sim_iid", {"inner_steps": 1, "extrapolation": "fedexp"}, False),
]


def base_config(run_dir: Path, setup: dict, steps: int, batch: int, fed: dict, eval_interval: int) -> dict:
    """One arm's config; the decentralised arms' inner AdamW may have its own lr (`--inner-lr`)."""
    lr = setup["inner_lr"] if fed.get("runtime") == "sim" else setup["lr"]
    return {
        "run_dir": str(run_dir), "seed": setup.get("seed", 1337), "model": setup["model"], "tokenizer": {"vocab_size": VOCAB},
        "oracles": [{"name": n, "train": [str(d / "train.txt")], "valid": [str(d / "valid.txt")]}
                    for n, d in DATASETS[setup.get("data", "small")].items()],
        "pretrain": {"steps": steps, "batch_size": batch, "lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 20),
                     "eval_interval": eval_interval, "eval_windows": setup["eval_windows"], "log_interval": 10**9,
                     "checkpoint_interval": 10**9, "keep_checkpoints": 1,
                     "device": setup.get("device", "cpu"), "dtype": setup.get("dtype", "float32")},
        "federation": {"outer_lr": setup["outer_lr"], "outer_momentum": setup["outer_momentum"], "nesterov": True,
                       "checkpoint_interval": 10**9, **fed},
        "ledger": {"method": "off"},  # the arms compare training, not contributions (benchmarks/ledger.py does those)
    }


def fresh_run_dir(runs: Path, name: str) -> Path:
    """An empty run dir holding a copy of the shared tokenizer and shards (prepare verifies and reuses them)."""
    run_dir = runs / name.replace(" ", "_").replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    shared = runs / "_data"
    shutil.copytree(shared / "data", run_dir / "data")
    for f in ("tokenizer.json", "tokenizer.fingerprint.json"):
        shutil.copy2(shared / f, run_dir / f)
    return run_dir


@contextmanager
def messages_as(label: str):
    """dgpt's messages printed as `  [label] message` while the block runs."""
    with messages_to(logging.StreamHandler(sys.stdout), fmt=f"  [{label}] %(message)s"):
        yield


def run_central(run_dir: Path, setup: dict, steps: int, fed: dict, poisoned: bool, oracles_per_batch: int = 4) -> list[dict]:
    """Pooled data, global batch = 4 x the per-oracle batch (the control: 1 x), `steps` steps."""
    config = config_from_dict(base_config(run_dir, setup, steps, oracles_per_batch * setup["batch"], {"runtime": "central"},
                                          max(1, steps // setup["evals"])))
    with messages_as("central"):
        api.pretrain(config)
    return [{"tokens": r["tokens"], "oracles": r["oracles"], "step": r["step"]}
            for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "valid"]


def run_sim(run_dir: Path, setup: dict, steps: int, fed: dict, poisoned: bool, iid: bool = False) -> list[dict]:
    """The sim runtime with `steps` inner steps per oracle in total: steps / H rounds. `iid`: every oracle
    trains on the pooled corpus (and keeps its own validation set), with the shared tokenizer."""
    rounds = steps // fed["inner_steps"]
    fed = {"runtime": "sim", "rounds": rounds, "eval_interval": max(1, rounds // setup["evals"]), **fed}
    raw = base_config(run_dir, setup, steps, setup["batch"], fed, 1)
    if iid:
        pooled = [o["train"][0] for o in raw["oracles"]]
        raw["oracles"] = [{**o, "train": pooled} for o in raw["oracles"]]
        raw["tokenizer"] = {"vocab_size": VOCAB, "path": str(run_dir / "tokenizer.json")}
    config = config_from_dict(raw)
    tamper = (lambda name, delta: delta * POISON_SCALE if name == POISONED else delta) if poisoned else None
    with messages_as(run_dir.name):
        pretrain_sim(config, tamper=tamper)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "round"]
    keys = ("round", "tokens", "oracles", "bytes_total", "bytes_sent", "dp_bytes", "agreement", "outer_scale")
    return [{k: r.get(k, 0) for k in keys} for r in rows if "oracles" in r]


RUNNERS = {"central": run_central, "central_one_batch": partial(run_central, oracles_per_batch=1), "sim": run_sim,
           "sim_iid": partial(run_sim, iid=True)}


def run_arm(arm: tuple, runs: Path, setup: dict, steps: int) -> tuple[list[dict], float]:
    """One arm in a worker process (one torch thread: much faster than two when the cores are shared)."""
    torch.set_num_threads(1)
    name, kind, fed, poisoned = arm
    print(f"=== {name}: start", flush=True)
    t0 = time.perf_counter()
    curve = RUNNERS[kind](fresh_run_dir(runs, name), setup, steps, fed, poisoned)
    seconds = time.perf_counter() - t0
    print(f"=== {name}: done in {seconds:.0f} s", flush=True)
    return curve, seconds


def global_loss(oracles: dict[str, float], weights: dict[str, int]) -> float:
    """Token-weighted mean of per-oracle losses over the oracles in `weights`."""
    return sum(oracles[n] * weights[n] for n in weights) / sum(weights.values())


def summarise(name: str, curve: list[dict], weights: dict, dp_per_step: int, seconds: float) -> dict:
    """Final numbers of one arm; a central arm gets the bytes data parallel across the 4 oracles would move
    (dp_per_step; 0 for the one-batch control, which stands for one oracle alone)."""
    for row in curve:
        row["loss"] = global_loss(row["oracles"], weights)
        if "step" in row:  # central: no communication of its own; DP-equivalent bytes at this step
            row["bytes_total"] = row["dp_bytes"] = dp_per_step * row["step"]
            row["bytes_sent"] = row["dp_bytes"] // 2
    last = curve[-1]
    agreement = [row["agreement"] for row in curve if row.get("agreement")]
    return {"name": name, "loss": last["loss"], "oracles": last["oracles"], "tokens": last["tokens"],
            "bytes_total": last["bytes_total"], "bytes_sent": last["bytes_sent"], "dp_bytes": last["dp_bytes"],
            "agreement": (agreement[0], agreement[-1]) if agreement else None, "seconds": round(seconds, 1), "curve": curve}


def table(results: list[dict]) -> str:
    central = results[0]["loss"]
    names = list(results[0]["oracles"])
    head = ["arm", "tokens", "global loss", "vs central"] + [SHORT.get(n, n) for n in names] + \
        ["agreement first / last round", "bytes total", "sent by oracles", "DP bytes", "DP / total", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        comm, alone = r["name"] == "central", r["dp_bytes"] == 0
        cells = [r["name"], f"{r['tokens'] / 1e6:.2f}M", f"{r['loss']:.4f}", f"{100 * r['loss'] / central:.1f}%"]
        cells += [f"{r['oracles'][n]:.3f}" for n in names]
        cells.append("%.2f / %.2f" % tuple(r["agreement"]) if r.get("agreement") else "-")
        if alone:
            cells += ["-", "-", "-", "-"]
        else:
            cells += ["(DP) " + human_bytes(r["bytes_total"]) if comm else human_bytes(r["bytes_total"]),
                      "(DP) " + human_bytes(r["bytes_sent"]) if comm else human_bytes(r["bytes_sent"]),
                      human_bytes(r["dp_bytes"]), "1x" if comm else f"{r['dp_bytes'] / r['bytes_total']:.1f}x"]
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outer_name(setup: dict) -> str:
    if setup["outer_momentum"] == 0:
        return f"SGD lr {setup['outer_lr']:g} without momentum" + (" (FedAvg)" if setup["outer_lr"] == 1 else "")
    return f"Nesterov SGD lr {setup['outer_lr']:g} / momentum {setup['outer_momentum']:g}"


def target_status(aggregator: str, gap: float) -> str:
    """Target 2 for a robust aggregator (a gap in %); the plain mean is only the reference."""
    return "reference: the non-robust mean" if aggregator == "mean" else "met" if gap <= 3 else "not met"


def verdict(results: list[dict], setup: dict, weights: dict, steps: int) -> str:
    """The targets and what the controls say, for the arms that were run."""
    by = {r["name"]: r for r in results}
    central, h50 = by["central"], by["H=50"]
    gap = 100 * (h50["loss"] / central["loss"] - 1)
    factor = h50["dp_bytes"] / h50["bytes_total"]
    ok1 = gap <= 3 and factor >= 50
    lines = [f"**Target 1** — at H = 50 the final global validation loss is within 3% of centralised while sending "
             f">= 50x fewer bytes than synchronous data parallel: loss {h50['loss']:.4f} vs {central['loss']:.4f} "
             f"({gap:+.1f}%), {factor:.1f}x fewer bytes -> **{'met' if ok1 else 'not met'}**"
             + ("." if ok1 else f" (loss gap exceeds 3% by {gap - 3:.1f} points)." if factor >= 50 else ".")]
    if "H=1" in by and not ok1 and (h1_gap := 100 * (by["H=1"]["loss"] / central["loss"] - 1)) > 3:
        lines.append(f"Even H = 1, which communicates after every step, ends {h1_gap:+.1f}% from central, so the gap "
                     f"is not caused by communicating rarely: each oracle's AdamW normalises its own small-batch "
                     f"gradients and keeps its own moments, and the outer step ({outer_name(setup)}) combines the "
                     f"resulting updates, which is not one AdamW step on the pooled batch; at this short horizon "
                     f"({steps} steps) that difference dominates.")
    if "central batch 8" in by and "H=50 IID" in by:
        lines.append(controls(by, setup, weights))
    if pairs := [(name, by[name], by[name + " fedexp"]) for name in ("H=1", "H=50", "H=1 IID", "H=50 IID")
                 if name in by and name + " fedexp" in by]:
        lines.append(extrapolation_note(pairs, central))
    if "H=50 poison mean" not in by:
        return "\n\n".join(lines)
    honest = {n: w for n, w in weights.items() if n != POISONED}
    lines.append(f"Target 2 is read on two losses: the global one (all four domains, the attacker's included: a robust "
                 f"rule that discards the attacker's updates cannot learn its domain, so no rule can keep this one "
                 f"within 3% when the attacker holds {weights[POISONED] / sum(weights.values()):.0%} of the tokens), and "
                 f"the honest oracles' token-weighted loss on their own validation data (what the three honest "
                 f"participants get; the usual measure for Byzantine-robust federated training).")
    for agg in ("trimmed", "median", "mean"):
        p = by[f"H=50 poison {agg}"]
        d = 100 * (p["loss"] / h50["loss"] - 1)
        ph, ch = global_loss(p["oracles"], honest), global_loss(h50["oracles"], honest)
        dh = 100 * (ph / ch - 1)

        lines.append(f"**Target 2 ({agg})** — poisoned run ({POISONED} sends {POISON_SCALE:g} x Delta) within 3% of "
                     f"clean H=50: global {p['loss']:.4f} vs {h50['loss']:.4f} ({d:+.1f}%) -> **{target_status(agg, d)}**; honest "
                     f"oracles {ph:.4f} vs {ch:.4f} ({dh:+.1f}%) -> **{target_status(agg, dh)}**.")
    drop = by["H=50 drop 0.5"]
    lines.append(f"Dropping each oracle with probability 0.5 trained {drop['tokens'] / h50['tokens']:.0%} of the tokens "
                 f"of the clean H=50 arm ({drop['tokens']:,} vs {h50['tokens']:,}); its loss is "
                 f"{100 * (drop['loss'] / h50['loss'] - 1):+.1f}% vs clean H=50.")
    return "\n\n".join(lines)


def extrapolation_note(pairs: list[tuple[str, dict, dict]], central: dict) -> str:
    """Each arm without and with FedExP extrapolation, as a gap to central, the mean factor it applied, and what
    the H = 1 and H = 50 pairs say together."""
    def gap(r: dict) -> float:
        return 100 * (r["loss"] / central["loss"] - 1)

    cells = [f"{name}: {plain['loss']:.4f} ({gap(plain):+.1f}%) -> {fedexp['loss']:.4f} ({gap(fedexp):+.1f}%), mean "
             f"factor at the validated rounds {mean_scale(fedexp):.2f}" for name, plain, fedexp in pairs]
    text = "**FedExP extrapolation** (loss vs central, plain mean -> FedExP): " + "; ".join(cells) + "."
    by = {name: (plain, fedexp) for name, plain, fedexp in pairs}
    if "H=1" in by and "H=50 IID" in by and gap(by["H=1"][1]) <= 3 < gap(by["H=50 IID"][1]):
        iid = by["H=50 IID"][1]
        text += (f" With FedExP, H = 1 ends {gap(by['H=1'][1]):+.1f}% from central: the shortfall of averaging every "
                 f"oracle's AdamW step is that their mean is short when they disagree, and the extrapolation restores its "
                 f"length when it sees each step. At H = 50 each oracle's update sums 50 steps, in which the small-batch "
                 f"noise averages out, so the IID oracles' updates agree (first / last round {iid['agreement'][0]:.2f} / "
                 f"{iid['agreement'][1]:.2f}) and FedExP finds nothing to lengthen (mean factor {mean_scale(iid):.2f}); "
                 f"what is missing there is that each oracle's 50 small-batch steps advance like one small-batch "
                 f"learner's, and the pseudo-gradients alone do not say how much farther a pooled-batch learner would "
                 f"have gone.")
    return text


def mean_scale(result: dict) -> float:
    scales = [row["outer_scale"] for row in result["curve"] if row.get("outer_scale")]
    return sum(scales) / len(scales) if scales else 1.0


def controls(by: dict, setup: dict, weights: dict) -> str:
    """Where the H = 50 arms sit between one oracle alone and central: the share of central's gain they recover."""
    alone, central, iid, h50 = by["central batch 8"], by["central"], by["H=50 IID"], by["H=50"]
    gain = alone["loss"] - central["loss"]  # what central's 4x batch buys over one oracle's batch

    def recovered(r: dict) -> float:
        return 100 * (alone["loss"] - r["loss"]) / gain if gain > 0 else float("nan")

    share = sum(w * w for w in weights.values()) ** 0.5 / sum(weights.values())
    text = (f"**Controls.** One oracle's batch alone (central, batch {setup['batch']}, a quarter of the tokens) ends at "
            f"{alone['loss']:.4f}; H = 50 with IID oracles (each holds the pooled corpus) at {iid['loss']:.4f}. Of what "
            f"central's 4x batch gains over one oracle alone, H = 50 recovers {recovered(iid):.0f}% with IID oracles and "
            f"{recovered(h50):.0f}% with the four non-IID ones")
    if recovered(iid) < 0:
        gain_outer = setup["outer_lr"] / (1 - setup["outer_momentum"])
        text += (f". With IID oracles this outer step ends above one oracle alone: it multiplies a steady direction by "
                 f"lr / (1 - momentum) = {gain_outer:.1f}, more than the IID oracles' updates stand")
    elif recovered(iid) < 50:
        text += (", so most of the gap to central is there without any non-IID split: averaging four oracles' "
                 "H-step AdamW trajectories is worth far less than one AdamW step on the pooled batch at this horizon")
    text += (f". Agreement of the pseudo-gradients (||sum_j w_j Delta_j|| / sum_j w_j ||Delta_j||, logged every round; "
             f"1 when every oracle moved the same way, {share:.2f} for orthogonal updates with these token weights), "
             f"first / last round: non-IID {h50['agreement'][0]:.2f} / {h50['agreement'][1]:.2f}, IID "
             f"{iid['agreement'][0]:.2f} / {iid['agreement'][1]:.2f}.")
    return text


STYLES = {  # arms that overlap get hollow markers or a different line so that both stay visible
    "central": dict(color="black", lw=2.4, marker="s"),
    "H=50 int8": dict(ls="-.", marker="o", mfc="none", ms=7),
    "H=50 poison mean": dict(ls="--", marker="x"),
    "H=50 poison trimmed": dict(ls="--", marker="^", ms=5),
    "H=50 poison median": dict(ls=":", marker="^", mfc="none", ms=9, lw=2),
    "central batch 8": dict(color="dimgray", ls="--", marker="s", ms=4),
    "H=50 IID": dict(color="saddlebrown", ls="-.", marker="D", ms=4),
}


def plot(results: list[dict], out: Path, stem: str, outer: str) -> None:
    top = results[0]["curve"][0]["loss"] + 0.05  # every arm starts from the same initial model
    bottom = min(row["loss"] for r in results for row in r["curve"]) - 0.1
    for key, xlabel, fname, log in [("tokens", "training tokens, all oracles", f"{stem}_loss_vs_tokens.png", False),
                                    ("bytes_total", "bytes communicated, uploads + downloads (central: what synchronous "
                                     "data parallel would move)", f"{stem}_loss_vs_bytes.png", True)]:
        fig, ax = plt.subplots(figsize=(10, 6))
        for i, r in enumerate(results):
            pts = [(row[key] / (1 if log else 1e6), row["loss"]) for row in r["curve"] if not log or row[key] > 0]
            if not pts:  # the one-batch control communicates nothing
                continue
            label = r["name"] + (f" (final {r['loss']:.1f}, off scale)" if r["loss"] > top else "")
            style = {"color": plt.cm.tab10(i % 10), "lw": 1.5, "marker": "o", "ms": 4, **STYLES.get(r["name"], {})}
            ax.plot(*zip(*pts), label=label, **style)
        ax.set_xscale("log" if log else "linear")
        ax.set_ylim(bottom, top)
        ax.set(xlabel=xlabel if log else xlabel + " (millions)", ylabel="global validation loss (nats / token)",
               title=f"DUPT, 4 oracles (non-IID but for the IID arms), equal training tokens, outer {outer}:\n"
                     f"validation loss vs {'bytes' if log else 'tokens'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8.5, ncol=2, loc="lower left")  # the empty corner below the plateau
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def lrs(setup: dict) -> str:
    lr, inner = setup.get("lr", 1e-3), setup.get("inner_lr", 1e-3)  # runs recorded before --lr existed used 1e-3
    return f"{lr:g}" if lr == inner else f"{lr:g} (central arms) / {inner:g} (decentralised arms' inner steps)"


def write_outputs(run: dict, out: Path) -> None:
    """dupt.md, dupt_runs.json and the two plots from one run's results; prints the markdown."""
    setup, steps, results = run["setup"], run["steps"], run["arms"]
    md = (f"# DUPT benchmark: centralised vs decentralised pre-training\n\n"
          f"`python benchmarks/dupt.py {run.get('command', f'--steps {steps}')}`: model "
          f"{json.dumps(setup['model'])} ({run['params']:,} parameters, vocab {VOCAB}); {steps} inner steps x batch "
          f"{setup['batch']} per oracle (central: {steps} steps x batch {4 * setup['batch']}); AdamW lr {lrs(setup)} "
          f"(warmup {max(1, steps // 20)}, cosine to a tenth), outer {outer_name(setup)} for every H. "
          f"Global loss = per-oracle validation losses ({setup['eval_windows']} windows of {setup['model']['n_ctx']} "
          f"tokens each) weighted by training tokens {run['weights']}, the same weights for every arm. Bytes: total = "
          f"oracle uploads + downloads (the fp32 global model each round); DP = what synchronous data parallel would "
          f"move for the same steps (one fp32 gradient up and down per participant per step), so DP / total is H for "
          f"fp32 pseudo-gradients by construction. With 4 oracles, trimmed_mean(0.25) and median are the same rule "
          f"(the mean of the two middle values per coordinate). Wall time: {run.get('jobs', 2)} arm(s) at a time, one "
          f"torch thread each, on 2 cores shared with other jobs (noisy). Epochs each oracle made over its training "
          f"tokens: {run.get('epochs', '-')}.\n\n{table(results)}\n\n{verdict(results, setup, run['weights'], steps)}\n")
    stem = run.get("stem", "dupt")
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}_runs.json").write_text(json.dumps(run, indent=1))
    plot(results, out, stem, outer_name(setup))
    print(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="inner steps per oracle in total (a multiple of 200)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (~1 minute): 200 steps at most")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once (one process, one thread each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_dupt"), help="run directories (scratch)")
    parser.add_argument("--replot", action="store_true", help="only rewrite STEM.md and the plots from STEM_runs.json")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="outer SGD learning rate (DiLoCo: 0.7)")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="outer Nesterov momentum (DiLoCo: 0.9)")
    parser.add_argument("--arms", help="comma-separated subset of the arms (central and H=50 among them); prints only, "
                        "unless --stem names a report for it")
    parser.add_argument("--ln", choices=("pre", "post"), default="post", help="layer-norm placement (GPT-1: post)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr (cosine to a tenth)")
    parser.add_argument("--inner-lr", type=float, help="peak lr of the decentralised arms' inner AdamW (default: --lr)")
    parser.add_argument("--batch", type=int, help="windows per oracle step (default 8; central: 4x)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", help="pretrain.dtype of every arm: float32, bfloat16, auto")
    parser.add_argument("--preset", help="a dgpt model preset (its own shape) instead of the benchmark's tiny model")
    parser.add_argument("--data", choices=sorted(DATASETS), default="small", help="small: the four shared corpora; "
                        "large: Gutenberg and Linux docs (pretrain_large) with WikiText-2 and Topical-Chat")
    parser.add_argument("--stem", help="output file names: STEM.md, STEM_runs.json, STEM_loss_vs_*.png (default: dupt)")
    args = parser.parse_args()
    if args.replot:
        return write_outputs(json.loads((args.out / f"{args.stem or 'dupt'}_runs.json").read_text()), args.out)
    setup, steps = (QUICK, min(200, args.steps)) if args.quick else (FULL, args.steps)
    model = {"preset": args.preset} if args.preset else setup["model"]
    setup = {**setup, "model": {**model, "ln": args.ln}, "device": args.device, "dtype": args.dtype, "data": args.data, "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum,
             "batch": args.batch or setup["batch"], "lr": args.lr, "inner_lr": args.inner_lr or args.lr}
    arms = [a for a in ARMS if not args.arms or a[0] in args.arms.split(",")]
    horizon = max(a[2].get("inner_steps", 1) for a in arms)
    if steps % horizon:
        parser.error(f"--steps must be a multiple of {horizon} (the largest H)")
    args.out.mkdir(parents=True, exist_ok=True)

    shared = config_from_dict(base_config(args.runs / "_data", setup, steps, setup["batch"], {}, 1))
    with messages_as("prepare"):
        stats = api.prepare(shared)
    weights = {n: stats[n]["train"]["tokens"] for n in DATASETS[args.data]}
    vocab = TextTokenizer.load(args.runs / "_data" / "tokenizer.json").vocab_size
    model_config = model_config_for(shared, vocab)
    params = GPT(model_config).num_params()
    epochs = {n: round(steps * setup["batch"] * model_config.n_ctx / t, 2) for n, t in weights.items()}
    print(f"epochs per oracle over its training tokens: {epochs}")
    dp_per_step = 2 * 4 * params * len(weights)  # each of 4 oracles sends and receives one fp32 gradient per step
    print(f"model {params:,} parameters; {steps} steps x {setup['batch']} windows x {setup['model']['n_ctx']} tokens "
          f"per oracle; oracle training tokens {weights}")

    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_arm, arm, args.runs, setup, steps) for arm in arms]
        results = []
        for arm, future in zip(arms, futures):
            curve, seconds = future.result()
            results.append(summarise(arm[0], curve, weights, 0 if arm[1] == "central_one_batch" else dp_per_step, seconds))
            print(f"{arm[0]}: global loss {results[-1]['loss']:.4f}", flush=True)
    if len(arms) < len(ARMS) and not args.stem:
        return
    write_outputs({"stem": args.stem or "dupt", "command": " ".join(shlex.quote(a) for a in sys.argv[1:]), "steps": steps, "quick": args.quick, "jobs": args.jobs, "setup": setup, "params": params, "epochs": epochs,
                   "weights": weights, "arms": results}, args.out)


if __name__ == "__main__":
    main()
