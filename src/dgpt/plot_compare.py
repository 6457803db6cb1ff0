"""`dgpt plot RUN RUN ... --out DIR`: several runs overlaid, one curve per run, named by its directory.

    valid_loss_vs_tokens.png           every run's global validation loss vs tokens trained (central runs included:
                                       the like-for-like axis between a federated run and its central baseline)
    valid_loss_vs_rounds.png           the federated and fine-tuning runs' global validation loss vs round
    valid_loss_vs_bytes.png            the same vs bytes communicated (log x; central runs communicate nothing)
    valid_loss_vs_tokens_ORACLE.png    one oracle's validation loss in every run that has it, vs tokens trained
    SCORE.png                          fine-tuning runs: each run's and oracle's score (accuracy, F1, ...) vs round

The overlays go to the folder `--out` names, never into a run: several runs have no one plots/ folder that
belongs to all of them. Pre-training (L1) and fine-tuning (L2) losses are not comparable, so a comparison
holds runs of one kind.
"""

from __future__ import annotations

from pathlib import Path

from dgpt.errors import DgptError
from dgpt.plot import BYTES, ROUND, TOKENS, Chart, RunView, draw, read_run, scores, validations


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name; where another run's shares it, as much of the path above as tells them apart."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    if len(set(parts)) < len(parts):
        raise DgptError("the same run is given twice: " + ", ".join(str(d) for d in run_dirs))

    def name(i: int) -> str:
        mine = parts[i]
        depth = next(d for d in range(1, len(mine) + 1) if all(p[-d:] != mine[-d:] for j, p in enumerate(parts) if j != i))
        return "/".join(mine[-depth:])

    return [name(i) for i in range(len(parts))]


def overlay_charts(views: dict[str, RunView]) -> list[Chart]:
    """The comparison charts of runs of one kind, each run's curves labeled with its name."""
    if len({view.kind == "finetune" for view in views.values()}) > 1:
        finetuning = ", ".join(name for name, view in views.items() if view.kind == "finetune")
        raise DgptError(f"cannot overlay fine-tuning runs ({finetuning}) with pre-training runs: their validation losses "
                        "are different quantities (L2 vs L1); compare runs of one kind")
    label = next(iter(views.values())).valid_label()
    central = any(view.kind == "central" for view in views.values())
    only = " (federated runs; central runs have none)" if central else ""
    tokens = Chart("valid_loss_vs_tokens", "Global validation loss vs tokens trained", TOKENS, label)
    rounds = Chart("valid_loss_vs_rounds", "Global validation loss vs round" + only, ROUND, label)
    sent = Chart("valid_loss_vs_bytes", "Global validation loss vs bytes communicated" + only, BYTES, label, logx=True)
    per_oracle: dict[str, Chart] = {}
    per_score: dict[str, Chart] = {}
    for name, view in views.items():
        for r in validations(view):
            tokens.add(name, r.get("tokens"), r["loss"])
            if view.kind != "central":
                rounds.add(name, r.get("round"), r["loss"])
                sent.add(name, r.get("bytes_total"), r["loss"])
            for oracle, loss in (r.get("oracles") or {}).items():
                chart = per_oracle.setdefault(oracle, Chart(f"valid_loss_vs_tokens_{oracle}",
                                                            f"Validation loss of oracle {oracle} vs tokens trained", TOKENS, label))
                chart.add(name, r.get("tokens"), loss)
        for r in view.rows:
            for oracle, values in scores(r).items():
                for score, value in values.items():
                    chart = per_score.setdefault(score, Chart(score, f"Validation {score} per run and oracle", ROUND,
                                                              f"{score} (validation set)"))
                    chart.add(f"{name}: {oracle}", r.get("round"), value)
    return [tokens, rounds, sent] + [per_oracle[o] for o in sorted(per_oracle)] + [per_score[s] for s in sorted(per_score)]


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Overlay the runs' curves into `out`; return the PNGs written."""
    dirs = [Path(d) for d in run_dirs]
    views = {name: read_run(d) for name, d in zip(run_names(dirs), dirs)}
    paths = draw(overlay_charts(views), Path(out), emphasise=None)
    if not paths:
        raise DgptError(f"{', '.join(map(str, dirs))}: no validation rows that can be overlaid")
    return paths
