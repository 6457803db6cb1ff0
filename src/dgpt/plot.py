"""`dgpt plot RUN_DIR`: PNG curves from a run's `metrics.jsonl`, written to RUN_DIR/plots/.

    central runs      train loss vs step; validation loss per oracle (and global) vs step
    federated runs    validation loss per oracle and global vs round, vs tokens trained, vs bytes
                      communicated (log x); train loss per oracle vs round; the agreement of the oracles'
                      pseudo-gradients vs round; the FedExP factor vs round, when it lengthened any update;
                      each oracle's cumulative contribution vs round, from a ledger that verifies
    fine-tuning runs  every score per oracle (accuracy, F1, ...) vs round, from rows that carry
                      `metrics: {oracle: {name: value}}` or an `accuracy` field (per oracle or a dict)

matplotlib is optional (`pip install 'dgpt[plot]'`) and imported only here, with the Agg backend.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from dgpt.audit import verify_ledger
from dgpt.errors import DgptError
from dgpt.rundir import RunDir
from dgpt.train.metrics import read_metrics

logger = logging.getLogger(__name__)
Series = dict[str, list[tuple[float, float]]]  # label -> [(x, y), ...]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DgptError("matplotlib is not installed: pip install 'dgpt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read(run: RunDir) -> list[dict]:
    path = run.metrics
    if not path.is_file():
        raise DgptError(f"{path}: not found; is {run.root} a run directory that has trained?")
    rows = read_metrics(path)
    if not rows:
        raise DgptError(f"{path}: no metrics rows to plot")
    return rows


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _add(series: Series, label: str, x, y) -> None:
    if _number(x) and _number(y):
        series[label].append((float(x), float(y)))


def _plot(plt, series: Series, path: Path, xlabel: str, ylabel: str, title: str, logx: bool = False) -> Path | None:
    series = {k: [(x, y) for x, y in v if x > 0 or not logx] for k, v in series.items()}  # log x: drop x = 0
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items(), key=lambda kv: (kv[0] != "global", kv[0])):
        xs, ys = zip(*sorted(points))
        style = dict(color="black", linewidth=2.2) if label == "global" else {}
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label, **style)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scores(row: dict) -> dict[str, dict[str, float]]:
    """{oracle: {score: value}} from a row: `metrics` dict, per-oracle `accuracy`, or an `accuracy` dict."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    metrics = row.get("metrics")
    for oracle, scores in metrics.items() if isinstance(metrics, dict) else ():
        if isinstance(scores, dict):
            out[oracle].update({k: v for k, v in scores.items() if _number(v)})
    accuracy = row.get("accuracy")
    if isinstance(accuracy, dict):
        for oracle, value in accuracy.items():
            if _number(value):
                out[oracle]["accuracy"] = value
    elif _number(accuracy):
        out[row.get("oracle", "global")]["accuracy"] = accuracy
    return out


def _plot_contributions(plt, run: RunDir) -> Path | None:
    """Cumulative contribution per oracle vs round, from a ledger that verifies (none without one)."""
    if not run.ledger.is_file():
        return None
    try:
        summary = verify_ledger(run.root)
    except DgptError as e:
        logger.warning(f"no contribution plot: {e}")
        return None
    series: Series = defaultdict(list)
    for name, points in summary.curve.items():
        for rnd, value in points:
            _add(series, name, rnd, value)
    return _plot(plt, series, run.plots / "contribution.png", "round", "cumulative contribution (validation loss reduction)",
                 "Contribution per oracle (Shapley values, summed over rounds)")


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's PNGs into its plots folder and return their paths."""
    run = RunDir(run_dir)
    rows = _read(run)
    plt = _pyplot()
    out = run.plots
    federated = any("round" in r for r in rows)
    written: list[Path | None] = []
    if not federated:
        train, valid = defaultdict(list), defaultdict(list)
        for r in rows:
            if r.get("kind") == "train":
                _add(train, "train", r.get("step"), r.get("loss"))
            elif r.get("kind") == "valid":
                _add(valid, "global", r.get("step"), r.get("loss"))
                for oracle, loss in (r.get("oracles") or {}).items():
                    _add(valid, oracle, r.get("step"), loss)
        written += [_plot(plt, train, out / "train_loss.png", "step", "training loss", "Training loss"),
                    _plot(plt, valid, out / "valid_loss.png", "step", "validation loss", "Validation loss per oracle")]
    else:
        by_x = {axis: defaultdict(list) for axis in ("round", "tokens", "bytes_total")}
        train, agreement, factor = defaultdict(list), defaultdict(list), defaultdict(list)
        scores = defaultdict(lambda: defaultdict(list))
        for r in rows:
            rnd = r.get("round", r.get("step"))
            if r.get("kind") == "round":
                _add(agreement, "agreement", rnd, r.get("agreement"))
                _add(factor, "FedExP factor", rnd, r.get("outer_scale"))
                for axis, series in by_x.items():
                    _add(series, "global", r.get(axis), r.get("loss"))
                    for oracle, loss in (r.get("oracles") or {}).items():
                        _add(series, oracle, r.get(axis), loss)
            elif r.get("kind") == "oracle":
                _add(train, r.get("oracle", "?"), rnd, r.get("train_loss"))
            for oracle, values in _scores(r).items():
                for name, value in values.items():
                    _add(scores[name], oracle, rnd, value)
        labels = {"round": ("round", "", False), "tokens": ("tokens trained (all oracles)", "_vs_tokens", False),
                  "bytes_total": ("bytes communicated", "_vs_bytes", True)}
        for axis, (xlabel, suffix, logx) in labels.items():
            written.append(_plot(plt, by_x[axis], out / f"valid_loss{suffix}.png", xlabel, "validation loss",
                                 f"Validation loss per oracle vs {xlabel}", logx))
        written.append(_plot(plt, train, out / "train_loss.png", "round", "training loss (mean over inner steps)",
                             "Training loss per oracle"))
        written.append(_plot(plt, agreement, out / "agreement.png", "round", "||sum w_j Delta_j|| / sum w_j ||Delta_j||",
                             "Agreement of the oracles' pseudo-gradients (1: all moved alike)"))
        if any(y > 1 for _, y in factor["FedExP factor"]):
            written.append(_plot(plt, factor, out / "outer_scale.png", "round", "factor on the aggregated update",
                                 "FedExP extrapolation (1: plain mean)"))
        for name, series in sorted(scores.items()):
            written.append(_plot(plt, series, out / f"{name}.png", "round", name, f"{name} per oracle"))
        written.append(_plot_contributions(plt, run))
    paths = [p for p in written if p is not None]
    if not paths:
        raise DgptError(f"{run.metrics}: no loss or score rows that can be plotted")
    return paths
