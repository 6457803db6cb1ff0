"""The DUPT benchmark's report: each arm's final numbers, the table, the verdicts on the targets and the controls,
and the loss-vs-tokens and loss-vs-bytes plots (dupt.md, dupt_runs.json and the PNGs, or the same under --stem).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from federated_runs import POISON_SCALE, POISONED, SHORT, VOCAB, global_loss  # noqa: E402

from dgpt.federation.accounting import human_bytes  # noqa: E402


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

