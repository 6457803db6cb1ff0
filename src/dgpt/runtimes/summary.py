"""The closing summary of a training run, the same for every runtime (central, sim, torchrun) and for
pre-training and fine-tuning alike: the final validation, overall and per oracle, the tokens trained, the
bytes communicated and the time taken."""

from __future__ import annotations

from dataclasses import dataclass, field

from dgpt.federation.accounting import human_bytes
from dgpt.train.evaluate import perplexity


@dataclass
class RunSummary:
    runtime: str  # central | sim | torchrun
    unit: str  # what the run counts: "step" (central) or "round"
    done: int  # the step or round training reached
    total: int  # steps or rounds the schedule has
    validated: int  # the step or round of the last validation (below)
    loss: float  # global validation loss: the oracles' weighted by their training tokens (examples); NaN: none
    oracles: dict[str, dict[str, float]]  # per oracle: "loss" first, then (fine-tuning) its task's scores
    tokens: int  # trained, by every oracle together, over the whole run
    bytes_total: int  # communicated over the whole run (0 for central: the data were pooled)
    dp_bytes: int  # what synchronous data parallel would have communicated
    seconds: float  # this command's training time (from the first validation; preparing data not included)
    language_model: bool = True  # pre-training: the loss is L1 (perplexity shown); fine-tuning: L2
    epsilon: dict[str, float] = field(default_factory=dict)  # DP-SGD: each oracle's epsilon spent ({}: no [privacy])
    delta: float = 0.0  # ... at this delta

    def lines(self) -> list[str]:
        loss = f"final global validation loss {self.loss:.4f}"
        loss += f" (perplexity {perplexity(self.loss):.2f})" if self.language_model else " (L2)"
        where = f"{self.unit} {self.validated} of {self.total}"
        if self.done != self.validated:
            where += f", trained to {self.unit} {self.done}"
        scores = {n: with_perplexity(m) if self.language_model else m for n, m in self.oracles.items()}
        moved = ("no communication (central: the oracles' data pooled)" if self.runtime == "central" else
                 f"{human_bytes(self.bytes_total)} communicated (synchronous data parallel: {human_bytes(self.dp_bytes)})")
        return [f"{loss} at {where} ({self.runtime})", *score_lines(scores),
                f"trained {self.tokens:,} tokens in {self.seconds:.1f} s; {moved}", *self.privacy_lines()]

    def privacy_lines(self) -> list[str]:
        if not self.epsilon:
            return []
        spent = ", ".join(f"{n} {e:.2f}" for n, e in self.epsilon.items())
        return [f"differential privacy (DP-SGD, per example): epsilon spent at delta {self.delta:g}: {spent}"]


def with_perplexity(scores: dict[str, float]) -> dict[str, float]:
    """A language-model loss's scores with its perplexity after the loss."""
    return {"loss": scores["loss"], "perplexity": perplexity(scores["loss"]), **scores}


def score_lines(scores: dict[str, dict[str, float]], extra: dict[str, str] | None = None) -> list[str]:
    """One line per oracle: its name, its scores in order, and `extra[name]` (e.g. how much was scored)."""
    width = max((len(n) for n in scores), default=0)
    lines = []
    for name, metrics in scores.items():
        cells = [f"{k} {v:.{2 if k == 'perplexity' else 4}f}" for k, v in metrics.items()]
        lines.append(f"  {name:<{width}}  " + "  ".join(cells + ([extra[name]] if extra and name in extra else [])))
    return lines
