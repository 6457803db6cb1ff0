"""The `sim` runtime: every oracle in this one process, trained one after another from the same Theta."""

from __future__ import annotations

from typing import Callable

import torch

from dgpt.config import Config
from dgpt.federation.codec import Codec, Payload
from dgpt.runtimes.federated import pretraining_work, train_federated
from dgpt.runtimes.summary import RunSummary


class SimTransport:
    """In-process transport: a payload arrives as it was sent. `tamper(oracle, delta) -> delta` stands in for a
    faulty or malicious oracle (tests and the robustness benchmark use it): it alters what that oracle sends, and
    that oracle's statement signs the altered payload, as a lying oracle would."""

    name = "sim"
    is_leader = True
    prepares_data = True

    def __init__(self, tamper: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        self.tamper = tamper

    def gather_scalars(self, local: dict[str, float]) -> dict[str, float]:
        return dict(local)

    def gather_texts(self, local: dict[str, str]) -> dict[str, str]:
        return dict(local)

    def sent(self, name: str, payload: Payload, codec: Codec) -> Payload:
        return payload if self.tamper is None else codec.encode(self.tamper(name, codec.decode(payload)))

    def exchange(self, sent: dict[str, Payload], participants: list[str], codec: Codec) -> dict[str, Payload]:
        return dict(sent)

    def barrier(self) -> None:
        pass

    def each_filesystem(self, write: Callable[[], None], written: Callable[[], bool]) -> None:
        write()


def pretrain_sim(config: Config, *, stop_after_round: int | None = None, tamper=None, work=pretraining_work) -> RunSummary:
    """Every oracle in this process; `work` picks what is trained (`dgpt.runtimes.finetune.finetune_work`)."""
    return train_federated(config, SimTransport(tamper), config.oracle_names(), stop_after_round=stop_after_round, work=work)
