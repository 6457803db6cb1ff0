"""What the leader of a federated run writes about it: `metrics.jsonl` rows, the progress bar's figures, and the
closing line on communication."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dgpt.config import Config
from dgpt.federation.accounting import human_bytes
from dgpt.federation.strategy import RoundResult, Strategy
from dgpt.rundir import RunDir
from dgpt.train.evaluate import weighted_loss
from dgpt.train.metrics import MetricsLog

logger = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """One round as every process saw it."""

    number: int
    result: RoundResult
    train_loss: dict[str, float]  # participants' mean inner-step loss
    valid: dict[str, float]  # validation loss per oracle ({} when the round was not validated)
    scores: dict[str, dict[str, float]]  # other validation metrics per oracle (fine-tuning)
    tokens: int = 0  # trained by every oracle so far
    seconds: float = 0.0
    epsilon: dict[str, float] = field(default_factory=dict)  # DP-SGD: each oracle's epsilon spent so far ({}: off)

    def postfix(self) -> dict[str, str]:
        """The progress figures: the participants' mean training loss; when validated, each oracle's validation loss
        and the update's agreement."""
        train = {"train": f"{sum(self.train_loss.values()) / len(self.train_loss):.4f}"} if self.train_loss else {}
        if not self.valid:
            return train
        agree = self.result.agreement
        return {**train, **{n[:12]: f"{v:.4f}" for n, v in self.valid.items()},
                "agreement": f"{agree:.2f}" if agree is not None else "-"}


class RoundReport:
    def __init__(self, config: Config, run_dir: RunDir, work, start: int):
        self.sizes, self.unit = work.sizes, work.unit
        self.delta, self.epsilon = config.privacy.delta, {}
        self.metrics = MetricsLog(run_dir.metrics, start if start else None, key="round", tensorboard=config.log.tensorboard)
        shared = sum(p.numel() for p in work.params)
        logger.info(f"model: {shared:,} shared parameters; oracles: "
                    + ", ".join(f"{n} ({int(size):,} {self.unit})" for n, size in self.sizes.items()))

    def _evaluated(self, valid: dict[str, float], scores: dict) -> dict:
        row = {"loss": weighted_loss(valid, self.sizes), "oracles": valid} if valid else {}
        return {**row, "metrics": scores} if scores else row

    def started(self, start: int, valid: dict[str, float], scores: dict) -> None:
        if start == 0:
            self.metrics.log(round=0, kind="round", tokens=0, **self._evaluated(valid, scores), bytes_total=0, dp_bytes=0)

    def round(self, record: RoundRecord, strategy: Strategy) -> None:
        """A `round` row (global validation loss when validated; the update's agreement and the extrapolation factor)
        and one `oracle` row per oracle."""
        result, sent = record.result, strategy.bytes
        self.epsilon = record.epsilon or self.epsilon
        self.metrics.log(
            round=record.number, kind="round", **self._evaluated(record.valid, record.scores), participants=result.participants,
            accepted=result.accepted, rejected=list(result.rejected), agreement=result.agreement, outer_scale=result.scale,
            bytes_total=sent.total, bytes_sent=sum(sent.sent.values()), dp_bytes=sent.dp_bytes, seconds=record.seconds,
            tokens=record.tokens, **({"skipped": result.skipped} if result.skipped else {}),
            **({"carried": result.carried} if result.carried else {}),
            **({"privacy_epsilon": record.epsilon, "privacy_delta": self.delta} if record.epsilon else {}),
        )
        for name in self.sizes:
            self.metrics.log(
                round=record.number, kind="oracle", oracle=name, valid_loss=record.valid.get(name),
                train_loss=record.train_loss.get(name), bytes_sent=result.bytes_received.get(name, 0),
                participated=name in result.participants, accepted=name in result.accepted,
                **({"rejected": result.rejected[name]} if name in result.rejected else {}),
                **({"privacy_epsilon": record.epsilon[name]} if name in record.epsilon else {}),
            )

    def finished(self, strategy: Strategy) -> None:
        self.metrics.close()
        sent = strategy.bytes
        logger.info(
            f"communication: {human_bytes(sent.total)} moved in total ({human_bytes(sum(sent.sent.values()))} sent by "
            f"oracles); synchronous data parallel would have moved {human_bytes(sent.dp_bytes)} "
            f"({sent.dp_bytes / max(sent.total, 1):.0f}x more)"
        )
        if self.epsilon:
            logger.info(f"privacy: epsilon spent at delta {self.delta:g}: "
                        + ", ".join(f"{n} {e:.2f}" for n, e in self.epsilon.items()))
