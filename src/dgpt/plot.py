"""`dgpt plot RUN_DIR`: PNG curves from a run's `metrics.jsonl`, written to RUN_DIR/plots/ (or `--out DIR`).

    central runs      training loss vs step; validation loss per oracle (and global) vs step and vs tokens trained
    federated runs    validation loss per oracle and global vs round, vs tokens trained, vs bytes communicated
                      (log x); training loss per oracle vs round; the agreement of the oracles' pseudo-gradients vs
                      round (when some round aggregated two or more); the FedExP factor vs round, when it lengthened
                      any update; each oracle's cumulative contribution vs round, from a ledger that verifies
    fine-tuning runs  as federated runs, the losses labeled as what they are (training: L3 = L2 + λ·L1, validation:
                      L2), and every score per oracle (accuracy, F1, ...) vs round

What each run draws is a list of `Chart`s (what to draw, labels and units included), rendered by `draw`;
`dgpt.plot_compare` overlays several runs the same way. matplotlib is optional (`pip install 'dgpt[plot]'`) and
imported only to draw, with the Agg backend.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dgpt.audit import verify_ledger
from dgpt.config import load_config
from dgpt.errors import DgptError
from dgpt.fileio import atomic_path
from dgpt.rundir import RunDir
from dgpt.train.metrics import read_metrics

logger = logging.getLogger(__name__)
Series = dict[str, list[tuple[float, float]]]  # label -> [(x, y), ...]

STEP, ROUND = "optimizer step", "round"
TOKENS = "tokens trained (all oracles together)"
BYTES = "bytes communicated (uploads + downloads, log scale)"
L1 = "L1: language-model loss (nats/token)"
L2 = "L2: task loss (nats/example; squared error for regression)"


@dataclass
class Chart:
    """One PNG: its file stem, title, axis labels (with units) and the curves."""

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: Series = field(default_factory=lambda: defaultdict(list))
    logx: bool = False

    def add(self, label: str, x, y) -> None:
        if _number(x) and _number(y) and (x > 0 or not self.logx):  # log x: x = 0 cannot be drawn
            self.series[label].append((float(x), float(y)))


@dataclass
class RunView:
    """A run's metrics rows and what kind of run wrote them."""

    root: Path
    rows: list[dict]
    kind: str  # "central" | "federated" | "finetune"
    lambda_lm: float | None = None  # fine-tuning's λ (None: not recorded)

    def train_label(self) -> str:
        if self.kind != "finetune":
            return "training " + L1
        lam = "λ" if self.lambda_lm is None else f"{self.lambda_lm:g}"
        return f"training loss L3 = L2 + {lam}·L1 (nats)"

    def valid_label(self) -> str:
        return "validation " + (L2 if self.kind == "finetune" else L1)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def read_run(run_dir: str | Path) -> RunView:
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise DgptError(f"{run.metrics}: not found; is {run.root} a run directory that has trained?")
    rows = read_metrics(run.metrics)
    if not rows:
        raise DgptError(f"{run.metrics}: no metrics rows to plot")
    if not any("round" in r for r in rows):
        return RunView(run.root, rows, "central")
    try:
        config = load_config(run.config) if run.config.is_file() else None
    except DgptError:
        config = None
    tasks = config is not None and bool(config.oracles) and all(o.task is not None for o in config.oracles)
    if tasks or any(scores(r) for r in rows):
        return RunView(run.root, rows, "finetune", config.finetune.lambda_lm if config is not None else None)
    return RunView(run.root, rows, "federated")


def scores(row: dict) -> dict[str, dict[str, float]]:
    """{oracle: {score: value}} from a row: `metrics` dict, per-oracle `accuracy`, or an `accuracy` dict."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    metrics = row.get("metrics")
    for oracle, values in metrics.items() if isinstance(metrics, dict) else ():
        if isinstance(values, dict):
            out[oracle].update({k: v for k, v in values.items() if _number(v)})
    accuracy = row.get("accuracy")
    if isinstance(accuracy, dict):
        for oracle, value in accuracy.items():
            if _number(value):
                out[oracle]["accuracy"] = value
    elif _number(accuracy):
        out[row.get("oracle", "global")]["accuracy"] = accuracy
    return dict(out)


def validations(view: RunView) -> list[dict]:
    """The rows that carry a validation: central `valid` rows, federated `round` rows with a loss."""
    kind = "valid" if view.kind == "central" else "round"
    return [r for r in view.rows if r.get("kind") == kind and _number(r.get("loss"))]


def _central_charts(view: RunView) -> list[Chart]:
    train = Chart("train_loss", "Training loss (one trainer, every oracle's tokens pooled)", STEP, view.train_label())
    by_step = Chart("valid_loss", "Validation loss per oracle and global (token-weighted)", STEP, view.valid_label())
    by_tokens = Chart("valid_loss_vs_tokens", "Validation loss per oracle vs tokens trained", TOKENS, view.valid_label())
    for r in view.rows:
        if r.get("kind") == "train":
            train.add("train", r.get("step"), r.get("loss"))
    for r in validations(view):
        for chart, x in ((by_step, r.get("step")), (by_tokens, r.get("tokens"))):
            chart.add("global", x, r.get("loss"))
            for oracle, loss in (r.get("oracles") or {}).items():
                chart.add(oracle, x, loss)
    return [train, by_step, by_tokens]


def _federated_charts(view: RunView) -> list[Chart]:
    valid = view.valid_label()
    by_axis = {"round": Chart("valid_loss", "Validation loss per oracle and global (weighted mean) vs round", ROUND, valid),
               "tokens": Chart("valid_loss_vs_tokens", "Validation loss per oracle vs tokens trained", TOKENS, valid),
               "bytes_total": Chart("valid_loss_vs_bytes", "Validation loss per oracle vs bytes communicated", BYTES, valid,
                                    logx=True)}
    train = Chart("train_loss", "Training loss per oracle (mean over each round's inner steps)", ROUND, view.train_label())
    agreement = Chart("agreement", "Agreement of the oracles' pseudo-gradients (1: all moved alike)", ROUND,
                      "||Σ w_j Δ_j|| / Σ w_j ||Δ_j|| (1 = aligned, 0 = cancelling)")
    factor = Chart("outer_scale", "FedExP extrapolation (1: plain mean)", ROUND, "factor on the aggregated update")
    score_charts: dict[str, Chart] = {}
    several = False  # whether any round aggregated two or more updates (one oracle's agreement is always 1)
    for r in view.rows:
        rnd = r.get("round", r.get("step"))
        if r.get("kind") == "round":
            several |= len(r["accepted"] if "accepted" in r else r.get("oracles") or ()) >= 2
            agreement.add("agreement", rnd, r.get("agreement"))
            factor.add("FedExP factor", rnd, r.get("outer_scale"))
            for axis, chart in by_axis.items():
                chart.add("global", r.get(axis), r.get("loss"))
                for oracle, loss in (r.get("oracles") or {}).items():
                    chart.add(oracle, r.get(axis), loss)
        elif r.get("kind") == "oracle":
            train.add(r.get("oracle", "?"), rnd, r.get("train_loss"))
        for oracle, values in scores(r).items():
            for name, value in values.items():
                chart = score_charts.setdefault(name, Chart(name, f"Validation {name} per oracle", ROUND, f"{name} (validation set)"))
                chart.add(oracle, rnd, value)
    charts = [*by_axis.values(), train] + [agreement] * several
    if any(y > 1 for _, y in factor.series["FedExP factor"]):
        charts.append(factor)
    return charts + [score_charts[name] for name in sorted(score_charts)] + _contribution_chart(view.root)


def _contribution_chart(root: Path) -> list[Chart]:
    """Cumulative contribution per oracle vs round, from a ledger that verifies and holds values (none otherwise)."""
    if not RunDir(root).ledger.is_file():
        return []
    try:
        summary = verify_ledger(root)
    except DgptError as e:
        logger.warning(f"no contribution plot: {e}")
        return []
    if not any(value for points in summary.curve.values() for _, value in points):
        return []  # ledger.method = "off": records without values
    chart = Chart("contribution", "Contribution per oracle (Shapley values, summed over rounds)", ROUND,
                  "cumulative contribution (validation loss reduction, nats)")
    for name, points in summary.curve.items():
        for rnd, value in points:
            chart.add(name, rnd, value)
    return [chart]


def run_charts(view: RunView) -> list[Chart]:
    """Every chart one run's metrics can fill (empty ones included; `draw` skips them)."""
    return _central_charts(view) if view.kind == "central" else _federated_charts(view)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DgptError("matplotlib is not installed: pip install 'dgpt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(charts: list[Chart], out: Path, emphasise: str | None = "global") -> list[Path]:
    """Write each chart that has points to out/NAME.png (the `emphasise` curve black and thick); return the paths."""
    plt = _pyplot()
    written = []
    for chart in charts:
        series = {k: v for k, v in chart.series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in sorted(series.items(), key=lambda kv: (kv[0] != emphasise, kv[0])):
            xs, ys = zip(*sorted(points))
            style = dict(color="black", linewidth=2.2) if label == emphasise else {}
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label, **style)
        if chart.logx:
            ax.set_xscale("log")
        ax.set(xlabel=chart.xlabel, ylabel=chart.ylabel, title=chart.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{chart.name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(path)
    return written


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write one run's PNGs into `out` (default: the run's plots folder) and return their paths."""
    view = read_run(run_dir)
    paths = draw(run_charts(view), Path(out) if out is not None else RunDir(run_dir).plots)
    if not paths:
        raise DgptError(f"{RunDir(run_dir).metrics}: no loss or score rows that can be plotted")
    return paths
