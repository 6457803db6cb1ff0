"""Bytes on the wire, per oracle and in total, next to what synchronous data parallel would send."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ByteLedger:
    param_bytes: int  # one fp32 copy of the parameters (what is broadcast, and one DP gradient)
    sent: dict[str, int] = field(default_factory=dict)  # oracle -> bytes it uploaded
    received: dict[str, int] = field(default_factory=dict)  # oracle -> bytes it downloaded
    dp_bytes: int = 0  # what synchronous data parallel would have moved for the same steps

    def record_round(self, participants: list[str], sent: dict[str, int], inner_steps: int) -> None:
        for name in participants:
            self.received[name] = self.received.get(name, 0) + self.param_bytes
            self.sent[name] = self.sent.get(name, 0) + sent.get(name, 0)
        # data parallel: every participant sends and receives one gradient per step
        self.dp_bytes += 2 * self.param_bytes * inner_steps * len(participants)

    @property
    def total(self) -> int:
        return sum(self.sent.values()) + sum(self.received.values())

    def state_dict(self) -> dict:
        return {"sent": dict(self.sent), "received": dict(self.received), "dp_bytes": self.dp_bytes}

    def load_state_dict(self, state: dict) -> None:
        self.sent, self.received, self.dp_bytes = dict(state["sent"]), dict(state["received"]), state["dp_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
