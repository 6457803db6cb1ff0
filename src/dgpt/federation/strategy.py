"""The Strategy: every decision of a round, in one object that every runtime calls.

Which oracles take part, what is done with what they sent (decoded, checked for shape and finiteness,
clipped, combined by the aggregation rule), how far to move (FedExP), the outer optimizer step, and the
bytes counted. It sees only tensors the aggregator received, never what a peer says about itself, and
knows nothing of processes, sockets or files: sim, torchrun and a Flower server drive the same object.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field

import torch

from dgpt.config import FederationConfig
from dgpt.federation.accounting import ByteLedger
from dgpt.federation.aggregate import (
    agreement,
    bucket_means,
    cap_shares,
    clip_to_norm,
    combine,
    coordinate_median,
    extrapolation,
    is_finite,
    normalise,
)
from dgpt.federation.codec import Codec, Payload
from dgpt.federation.outer import OuterOptimizer

ROBUST_MIN = 3  # accepted updates a robust rule needs to be more than a mean


@dataclass
class RoundResult:
    """What the aggregator made of one round's payloads."""

    participants: list[str]  # oracles whose payload arrived
    accepted: list[str]
    rejected: dict[str, str]  # oracle -> why its payload was left out
    norms: dict[str, float]  # ||Delta_j|| of each accepted update as received (before clipping)
    bytes_received: dict[str, int]  # nbytes of each payload
    update: torch.Tensor | None = None  # the combined pseudo-gradient; None when nothing was accepted
    agreement: float | None = None  # ||update|| / sum_j w_j ||Delta_j||
    scale: float | None = None  # the extrapolation factor the outer step applies to `update`
    deltas: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the accepted updates, decoded
    skipped: str = ""  # why no update was made this round ("" when one was)
    carried: list[str] = field(default_factory=list)  # accepted oracles whose update arrived in an earlier, skipped round


class Strategy:
    def __init__(self, fed: FederationConfig, codec: Codec, weights: dict[str, float], theta: torch.Tensor, seed: int):
        """`weights`: every oracle's unnormalised mean weight (config order); `theta`: the initial global parameters."""
        self.fed, self.codec, self.weights = fed, codec, dict(weights)
        self.names = list(weights)
        self.outer = OuterOptimizer(theta, fed.outer_lr, fed.outer_momentum, fed.nesterov)
        self.bytes = ByteLedger(param_bytes=4 * codec.numel)
        self.drops = torch.Generator().manual_seed(seed + 17)  # the same draws in every process
        self.dealing = torch.Generator().manual_seed(seed + 29)  # the round's bucket order, the same in every process
        self.order = {name: i for i, name in enumerate(self.names)}
        self.held: dict[str, torch.Tensor] = {}  # the accepted updates of a skipped round, combined with the next

    @property
    def theta(self) -> torch.Tensor:
        return self.outer.theta.detach()

    def sample(self) -> list[str]:
        """The oracles asked to take part in the next round: each misses it with probability `drop_prob`. Also deals
        the round's bucket order (`bucket_size`), so that every coalition the ledger values is bucketed alike."""
        draws = torch.rand(len(self.names), generator=self.drops).tolist()
        dealt = torch.randperm(len(self.names), generator=self.dealing).tolist()
        self.order = {self.names[i]: rank for rank, i in enumerate(dealt)}
        return [name for name, draw in zip(self.names, draws) if draw >= self.fed.drop_prob]

    def aggregate(self, received: dict[str, Payload]) -> RoundResult:
        """Check, decode, clip and combine the payloads, with the updates held from a skipped round that their oracles
        did not replace (changes no state: `apply` commits a result)."""
        arrived = [n for n in self.names if n in received]
        result = RoundResult(arrived, [], {}, {}, {n: received[n].nbytes for n in arrived})
        held = {n: d for n, d in self.held.items() if n not in received}  # a newer update replaces the held one
        deltas = dict(held)
        for name in arrived:
            delta, problem = self._decode(received[name])
            if problem:
                result.rejected[name] = problem
            else:
                deltas[name] = delta
        norms = {n: float(d.norm()) for n, d in deltas.items()}
        for name, problem in self._out_of_line(deltas, norms).items():
            result.rejected[name] = problem
            del deltas[name], norms[name]
        result.accepted, result.norms = list(deltas), norms
        result.deltas, result.carried = deltas, [n for n in held if n in deltas]
        result.skipped = self._too_few(len(deltas)) if deltas else "no update arrived or was accepted: Theta did not move"
        if deltas and not result.skipped:
            result.update, result.agreement, result.scale = self.combine(deltas)
        return result

    def aggregate_sum(self, update: torch.Tensor | None, arrived: list[str], bytes_received: dict[str, int],
                      problem: str = "") -> RoundResult:
        """A round whose updates arrived already combined (secure aggregation: the aggregator holds only their weighted
        mean, none of them): the mean checked for shape and finiteness, nothing decoded, clipped or valued one by one.
        `problem`: why the mean cannot be used (every update of `arrived` is in it, so none can be left out)."""
        result = RoundResult(list(arrived), [], {}, {}, dict(bytes_received))
        if not problem and (update is None or update.dtype != torch.float32 or update.shape != (self.codec.numel,)):
            problem = "no mean of the updates arrived" if update is None else (
                f"the mean is {update.dtype} {tuple(update.shape)} where float32 ({self.codec.numel},) was expected")
        problem = problem or ("" if is_finite(update) else "NaN/Inf in the mean of the updates")
        if problem:
            result.rejected = {n: f"the round's masked sum was not used: {problem}" for n in arrived}
            result.skipped = f"{problem}: Theta did not move"
        else:
            result.accepted, result.update, result.scale = list(arrived), update, 1.0
        return result

    def shares(self, names: list[str]) -> dict[str, float]:
        """Each of `names`' weight in the mean of their updates (normalised, capped at `max_weight_share`)."""
        return cap_shares(normalise(self.weights, names), self.fed.max_weight_share)

    def _out_of_line(self, deltas: dict[str, torch.Tensor], norms: dict[str, float]) -> dict[str, str]:
        """Updates left out before the rule combines the rest, and why: a norm over `norm_filter` times the round's
        median norm, or a direction at a cosine under `min_cosine` with the coordinate-wise median of the updates
        that passed the norm test. A coordinate-wise rule bounds what an outlier moves, not the bias it leaves (an
        update reversed is cut at one end of every coordinate, an honest one at the other); left out, it costs what a
        silent oracle does. The norm test sees a blown-up update, the direction test a reversed one of honest length.
        Both need 3 updates, as the robust rules do (of two, neither is out of line)."""
        if len(norms) < ROBUST_MIN:
            return {}
        out, k, middle = {}, self.fed.norm_filter, statistics.median(norms.values())
        if k > 0 and middle > 0:
            out = {n: f"norm {v:.3g} is {v / middle:.1f}x the round's median norm {middle:.3g} (norm_filter {k:g})"
                   for n, v in norms.items() if v > k * middle}
        kept = [n for n in norms if n not in out]
        if self.fed.min_cosine > -1 and len(kept) >= ROBUST_MIN:
            centre = coordinate_median([deltas[n] for n in kept])
            length = float(centre.norm())
            for n in kept:
                cosine = float(deltas[n] @ centre) / (norms[n] * length) if norms[n] * length > 0 else 0.0
                if cosine < self.fed.min_cosine:
                    out[n] = f"cosine {cosine:.2f} with the round's coordinate-wise median is under min_cosine {self.fed.min_cosine:g}"
        return out

    def _too_few(self, accepted: int) -> str:
        """A robust rule over fewer than 3 updates is a plain mean: one poisoned update would pass. Such rounds are
        skipped; Theta does not move, so their accepted updates stay valid pseudo-gradients and are held for the next."""
        if self.fed.aggregator == "mean" or accepted >= ROBUST_MIN:
            return ""
        return (f"{self.fed.aggregator} needs at least {ROBUST_MIN} accepted updates, got {accepted}: no update this "
                "round (the accepted ones are held for the next)")

    def combine(self, deltas: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, float]:
        """(update, agreement, extrapolation factor) of accepted pseudo-gradients: clipped, bucketed (robust rules), then
        the aggregation rule."""
        fed = self.fed
        names = list(deltas) if fed.aggregator == "mean" else sorted(deltas, key=self.order.__getitem__)
        norms = {n: float(d.norm()) for n, d in deltas.items()}
        w = self.shares(names)
        clipped = [clip_to_norm(deltas[n], fed.clip_norm) for n in names]
        if fed.aggregator != "mean":  # the coordinate-wise median ranks updates: it gains from bucketing by default
            clipped = bucket_means(clipped, fed.bucket_size or (2 if fed.aggregator == "median" else 1), ROBUST_MIN)
        update = combine(fed.aggregator, clipped, [w[n] for n in names], fed.trim_fraction)
        agree = agreement(update, norms, w, fed.aggregator, fed.clip_norm)
        scale = extrapolation(fed.extrapolation, update, norms, w, fed.aggregator, fed.clip_norm)
        return update, agree, min(scale, fed.fedexp_max)

    def preview(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """Theta after a round in which only `deltas` had arrived, from the same outer state, committing nothing
        (what the contribution ledger values coalitions with). No update leaves Theta where it is, as `apply` does."""
        if not deltas or self._too_few(len(deltas)):
            return self.theta.clone()
        update, _, scale = self.combine(deltas)
        trial = OuterOptimizer(self.theta, self.fed.outer_lr, self.fed.outer_momentum, self.fed.nesterov)
        trial.sgd.load_state_dict(copy.deepcopy(self.outer.sgd.state_dict()))
        return trial.step(update * scale).clone()

    def apply(self, result: RoundResult, inner_steps: int) -> torch.Tensor:
        """Commit a round: the outer step along the (extrapolated) update, and its bytes. Returns the new Theta."""
        if result.update is not None:
            self.outer.step(result.update * result.scale)
        self.held = dict(result.deltas) if result.skipped else {}
        self.bytes.record_round(result.participants, result.bytes_received, inner_steps)
        return self.theta

    def _decode(self, payload: Payload) -> tuple[torch.Tensor | None, str]:
        expected = self.codec.empty()
        for got, want, what in ((payload.values, expected.values, "values"), (payload.scales, expected.scales, "scales")):
            if got.dtype != want.dtype or got.shape != want.shape:
                return None, f"{what} of {got.dtype} {tuple(got.shape)} where {want.dtype} {tuple(want.shape)} was expected"
        delta = self.codec.decode(payload)
        return (delta, "") if is_finite(delta) else (None, "NaN/Inf in its pseudo-gradient")

    def state_dict(self) -> dict:
        """Everything but Theta itself (the round checkpoint's weights hold it)."""
        return {"outer": self.outer.sgd.state_dict(), "bytes": self.bytes.state_dict(), "drops": self.drops.get_state(),
                "dealing": self.dealing.get_state(), "held": dict(self.held)}

    def load_state_dict(self, state: dict, theta: torch.Tensor) -> None:
        self.outer.load_state_dict({"theta": theta, "sgd": state["outer"]})
        self.bytes.load_state_dict(state["bytes"])
        self.drops.set_state(state["drops"])
        if "dealing" in state:  # checkpoints written before bucketing keep the initial order and hold nothing
            self.dealing.set_state(state["dealing"])
            self.held = dict(state["held"])
