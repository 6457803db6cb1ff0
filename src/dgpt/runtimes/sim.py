"""The `sim` runtime: every oracle in this one process, trained one after another from the same Theta."""

from __future__ import annotations

from typing import Callable

from dgpt.config import Config, FederationConfig
from dgpt.federation.aggregate import aggregate_round
from dgpt.runtimes.federated import LocalUpdate, RoundOutcome, train_federated


class SimTransport:
    is_leader = True
    prepares_data = True

    def gather_scalars(self, local: dict[str, float]) -> dict[str, float]:
        return dict(local)

    def aggregate(
        self, updates: dict[str, LocalUpdate], fed: FederationConfig, weights: dict[str, float], numel: int
    ) -> RoundOutcome:
        deltas = {name: u.delta for name, u in updates.items()}
        update, accepted, rejected = aggregate_round(deltas, fed.aggregator, weights, fed.trim_fraction, fed.clip_norm)
        return RoundOutcome(
            update, accepted, rejected,
            {n: u.bytes_sent for n, u in updates.items()}, {n: u.train_loss for n, u in updates.items()},
        )

    def barrier(self) -> None:
        pass


def pretrain_sim(config: Config, *, stop_after_round: int | None = None, log: Callable[[str], None] = print) -> dict:
    return train_federated(config, SimTransport(), config.oracle_names(), stop_after_round=stop_after_round, log=log)
