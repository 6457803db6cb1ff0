"""The `sim` runtime: every oracle in this one process, trained one after another from the same Theta."""

from __future__ import annotations

from typing import Callable

import torch

from dgpt.config import Config, FederationConfig
from dgpt.federation.aggregate import aggregate_round
from dgpt.runtimes.federated import LocalUpdate, RoundOutcome, pretraining_work, train_federated


class SimTransport:
    """In-process transport. `tamper(oracle, delta) -> delta` stands in for a faulty or malicious oracle
    (tests and the robustness benchmark use it); it alters what that oracle sends."""

    is_leader = True
    prepares_data = True

    def __init__(self, tamper: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        self.tamper = tamper

    def gather_scalars(self, local: dict[str, float]) -> dict[str, float]:
        return dict(local)

    def aggregate(
        self, updates: dict[str, LocalUpdate], fed: FederationConfig, weights: dict[str, float], numel: int
    ) -> RoundOutcome:
        deltas = {name: self.tamper(name, u.delta) if self.tamper else u.delta for name, u in updates.items()}
        update, accepted, rejected = aggregate_round(deltas, fed.aggregator, weights, fed.trim_fraction, fed.clip_norm)
        return RoundOutcome(
            update, accepted, rejected,
            {n: u.bytes_sent for n, u in updates.items()}, {n: u.train_loss for n, u in updates.items()},
            {n: float(deltas[n].norm()) for n in accepted},
        )

    def barrier(self) -> None:
        pass

    def each_filesystem(self, write: Callable[[], None], written: Callable[[], bool]) -> None:
        write()


def pretrain_sim(
    config: Config, *, stop_after_round: int | None = None, log: Callable[[str], None] = print, tamper=None, work=pretraining_work
) -> dict:
    """Every oracle in this process; `work` picks what is trained (`dgpt.runtimes.finetune.finetune_work`)."""
    transport = SimTransport(tamper)
    return train_federated(config, transport, config.oracle_names(), stop_after_round=stop_after_round, log=log, work=work)
