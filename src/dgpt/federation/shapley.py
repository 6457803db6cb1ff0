"""Shapley values of the oracles in one round, from the value of each coalition of their updates.

v(S) is what the round would have gained had only coalition S's updates arrived; an oracle's Shapley value is
its marginal gain v(S + j) - v(S) averaged over every order in which the oracles could have joined. Exact for a
handful of oracles (2^k coalitions); above that, estimated from random orders, with its standard error.
(Federated Shapley values per round: Wang et al., arXiv 2009.06192; GTG-Shapley, arXiv 2109.02053.)
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Callable

import torch

Coalition = frozenset


class CachedValue:
    """v(S), each coalition evaluated once; `evaluations` counts the coalitions that cost an evaluation."""

    def __init__(self, value: Callable[[Coalition], float]):
        self.value, self.cache = value, {Coalition(): 0.0}

    def __call__(self, coalition: Coalition) -> float:
        if coalition not in self.cache:
            self.cache[coalition] = self.value(coalition)
        return self.cache[coalition]

    @property
    def evaluations(self) -> int:
        return len(self.cache) - 1


def exact_shapley(names: list[str], v: CachedValue) -> dict[str, float]:
    """phi_j = sum over S not holding j of |S|! (k - |S| - 1)! / k! * (v(S + j) - v(S))."""
    k, phi = len(names), dict.fromkeys(names, 0.0)
    for size in range(k):
        weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
        for members in combinations(names, size):
            base = Coalition(members)
            for j in names:
                if j not in base:
                    phi[j] += weight * (v(base | {j}) - v(base))
    return phi


def sampled_shapley(names: list[str], v: CachedValue, orders: int, generator: torch.Generator) -> tuple[dict, dict]:
    """(mean marginal gain, its standard error) per oracle over `orders` random joining orders."""
    gains: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(orders):
        joined: Coalition = Coalition()
        for i in torch.randperm(len(names), generator=generator).tolist():
            grown = joined | {names[i]}
            gains[names[i]].append(v(grown) - v(joined))
            joined = grown
    mean = {n: sum(g) / len(g) for n, g in gains.items()}
    spread = {n: math.sqrt(sum((x - mean[n]) ** 2 for x in g) / (len(g) - 1) / len(g)) if len(g) > 1 else float("nan")
              for n, g in gains.items()}
    return mean, spread
