"""Example-level differential privacy in one oracle's inner loop: DP-SGD (Abadi et al., 2016) and its accountant.

Each step draws a Poisson sample of the oracle's examples (pre-training: the fixed windows of n_ctx + 1 tokens at
stride n_ctx; fine-tuning: labeled examples), each with probability q = expected batch / examples; takes every
drawn example's gradient, clips it to L2 norm C = max_grad_norm, sums, adds N(0, (sigma C)^2) to every coordinate
and divides by the expected batch. The optimizer (AdamW) steps on that as usual: what follows the noise is
post-processing and costs no privacy. An RDP accountant turns (q, sigma, steps) into the (epsilon, delta) spent.

Per-example gradients come from torch.func (vmap of grad over functional_call), not from Opacus's
GradSampleModule: tried on dgpt's GPT, Opacus's module hooks see neither the tied LM head's use of the token
embedding (the fused L1 multiplies by the weight itself, outside any module) nor a batch dimension in the position
embedding's lookup (positions are [T], taken for T examples), so both per-example gradients came out wrong. The
accountant is `dp-accounting`'s RDP accountant (checked against Opacus's in the tests).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad_and_value, vmap

from dgpt.config import PrivacyConfig
from dgpt.errors import DgptError


def _accounting():
    """dp-accounting, imported on first use: it takes about a second to import, which only a DP run should pay (a
    Flower SuperNode starts a new process for every message)."""
    import dp_accounting  # noqa: PLC0415

    return dp_accounting


def _orders(dp_accounting) -> list[int]:
    """RDP orders: dp-accounting's default orders that are integers. At integer orders every implementation computes
    the same closed form (Opacus's agrees to float rounding, tested); fractional ones differ between libraries by up
    to a few tenths of a percent of epsilon, and leaving them out only loosens the bound (a few percent at most)."""
    return [int(a) for a in dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS if float(a).is_integer()]


def _accountant(history: Sequence[Sequence[float]]):
    dp_accounting = _accounting()
    accountant = dp_accounting.rdp.RdpAccountant(orders=_orders(dp_accounting))
    for sigma, q, steps in history:
        gaussian = dp_accounting.GaussianDpEvent(float(sigma))
        accountant.compose(dp_accounting.PoissonSampledDpEvent(float(q), gaussian), int(steps))
    return accountant


def epsilon_spent(history: Sequence[Sequence[float]], delta: float) -> float:
    """Epsilon at `delta` after the steps of `history`: [(noise multiplier, sample rate, steps), ...] (RDP)."""
    return float(_accountant(history).get_epsilon(delta)) if history else 0.0


def noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier whose `steps` steps at `sample_rate` spend `target_epsilon` (never above it). The search's
    tolerance is on sigma: epsilon can fall steeply with sigma at small sampling rates (at q ~ 0.001, 8.0 -> 6.9 within
    0.007 of sigma), so it is tight."""
    dp_accounting = _accounting()
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: dp_accounting.rdp.RdpAccountant(orders=_orders(dp_accounting)),
        lambda sigma: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma)), steps),
        target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-6))


class _Call(nn.Module):
    """Lets functional_call run any loss of `model`, not only its forward: the loss closes over `model`, whose
    parameters functional_call swaps in place for the call."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *example: torch.Tensor) -> torch.Tensor:
        return self.loss(*(t.unsqueeze(0) for t in example))  # a batch of one


@dataclass(frozen=True)
class Mechanism:
    noise_multiplier: float  # sigma
    max_grad_norm: float  # C
    sample_rate: float  # q
    expected_batch: float  # q x examples: the divisor of every step's noisy sum


class PrivateGradients:
    """One oracle's DP-SGD gradients and its accountant's state (the steps taken at each (sigma, q))."""

    def __init__(self, mechanism: Mechanism, delta: float):
        self.mechanism, self.delta = mechanism, delta
        self.history: list[list[float]] = []  # [noise multiplier, sample rate, steps], composed by the accountant

    @classmethod
    def plan(cls, cfg: PrivacyConfig, examples: int, expected_batch: int, planned_steps: int, name: str) -> PrivateGradients:
        """q from the expected batch; sigma as configured, or the one that spends target_epsilon in planned_steps."""
        if expected_batch > examples:
            raise DgptError(f"oracle '{name}': [privacy] samples batches of {expected_batch} expected examples from "
                            f"only {examples}; lower the batch size or give the oracle more data")
        q = expected_batch / examples
        sigma = cfg.noise_multiplier or noise_for(cfg.target_epsilon, cfg.delta, q, planned_steps)
        return cls(Mechanism(sigma, cfg.max_grad_norm, q, expected_batch), cfg.delta)

    def epsilon(self) -> float:
        return epsilon_spent(self.history, self.delta)

    def gradients(self, model: nn.Module, loss: Callable[..., torch.Tensor], batch: Sequence[torch.Tensor] | None,
                  chunk: int) -> float:
        """Set every trainable parameter's .grad to the step's noisy clipped mean; returns the examples' mean loss
        (NaN when the Poisson draw was empty). Examples go through vmap `chunk` at a time (memory: chunk x params)."""
        m = self.mechanism
        call = _Call(model, loss)
        named = {n: p for n, p in call.named_parameters() if p.requires_grad}
        sums = {n: torch.zeros_like(p) for n, p in named.items()}
        total, count = 0.0, 0
        per_example = vmap(grad_and_value(lambda params, *ex: functional_call(call, params, ex)),
                           in_dims=(None, *[0] * len(batch or ())), randomness="different")
        for part in zip(*(t.split(chunk) for t in batch)) if batch is not None else ():
            with warnings.catch_warnings():  # torch says when vmap loops over an op it has no batching rule for
                warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
                grads, losses = per_example({n: p.detach() for n, p in named.items()}, *part)
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
            scale = (m.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # each example's gradient to norm <= C
            for n, g in grads.items():
                sums[n] += torch.einsum("b,b...->...", scale.to(g.dtype), g)
            total, count = total + float(losses.sum()), count + len(losses)
        for n, p in named.items():
            noise = torch.randn(p.shape, device=p.device, dtype=p.dtype) * (m.noise_multiplier * m.max_grad_norm)
            p.grad = (sums[n] + noise) / m.expected_batch
        self._count_step()
        return total / count if count else math.nan

    def _count_step(self) -> None:
        m = self.mechanism
        if self.history and self.history[-1][:2] == [m.noise_multiplier, m.sample_rate]:
            self.history[-1][2] += 1
        else:
            self.history.append([m.noise_multiplier, m.sample_rate, 1])

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history], "delta": self.delta}

    def load_state_dict(self, state: dict) -> None:
        self.history = [[float(s), float(q), int(n)] for s, q, n in state["history"]]
