"""Combining the oracles' pseudo-gradients Delta_j = Theta - Theta_j into one update."""

from __future__ import annotations

import math
import statistics

import torch

from dgpt.errors import DgptError


def is_finite(delta: torch.Tensor) -> bool:
    return bool(torch.isfinite(delta).all())


def clip_to_norm(delta: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale delta down to L2 norm max_norm (0 = no clipping); limits what one oracle can move."""
    if max_norm <= 0:
        return delta
    norm = float(delta.norm())
    return delta * (max_norm / norm) if norm > max_norm else delta


def mean_weights(rule: str, tokens: dict[str, int], given: dict[str, float | None]) -> dict[str, float]:
    """Unnormalised weight per oracle: its training tokens (FedAvg), 1, or the configured weight."""
    if rule == "tokens":
        return {name: float(n) for name, n in tokens.items()}
    if rule == "uniform":
        return {name: 1.0 for name in tokens}
    return {name: float(given[name]) for name in tokens}


def normalise(weights: dict[str, float], names: list[str]) -> dict[str, float]:
    total = sum(weights[n] for n in names)
    if total <= 0:
        raise DgptError(f"oracle weights of {', '.join(names)} sum to {total}; weights must be positive")
    return {n: weights[n] / total for n in names}


def cap_shares(shares: dict[str, float], cap: float) -> dict[str, float]:
    """Normalised shares of at most `cap` each, the excess spread over the others in proportion to their shares:
    however large a size an oracle claims, it buys at most `cap` of the mean (equal shares when k * cap <= 1)."""
    if cap >= 1:
        return shares
    if len(shares) * cap <= 1:
        return {n: 1.0 / len(shares) for n in shares}
    free, capped = dict(shares), set()
    while over := [n for n, s in free.items() if s > cap]:
        capped.update(over)
        rest = {n: s for n, s in free.items() if n not in capped}
        left, total = 1.0 - cap * len(capped), sum(rest.values())
        free = {n: s * left / total for n, s in rest.items()}
    return {n: cap if n in capped else free[n] for n in shares}


def weighted_mean(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out.add_(d, alpha=w)
    return out


def coordinate_median(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per-coordinate median (the mean of the two middle values for an even count)."""
    stacked = torch.stack(deltas)
    k = len(deltas)
    ordered = stacked.sort(dim=0).values
    return 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])


def geometric_median(deltas: list[torch.Tensor], tol: float = 1e-6, max_iter: int = 100) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the updates (RFA: Pillutla, Kakade & Harchaoui,
    IEEE TSP 2022), by Weiszfeld's iteration from the coordinate-wise median.

    Each iterate is a weighted mean with weights 1 / distance: an update far from the rest pulls with a unit
    force whatever its length, so an outlier moves the result a bounded amount, while updates that spread
    about their centre (non-IID oracles) are averaged rather than ranked per coordinate, so leaving one of
    them out costs about what it does under the mean. Distances are floored at `tol` times the updates' median
    norm so that an iterate landing on an update stays finite.
    """
    stacked = torch.stack(deltas)
    floor = tol * float(stacked.norm(dim=1).median()) + 1e-30
    z = coordinate_median(deltas)
    for _ in range(max_iter):
        w = 1.0 / (stacked - z).norm(dim=1).clamp_min(floor)
        new = (w[:, None] * stacked).sum(dim=0) / w.sum()
        moved = float((new - z).norm())
        z = new
        if moved <= tol * (float(z.norm()) + floor):
            break
    return z


def trimmed_mean(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Per-coordinate mean after dropping the `fraction` largest and smallest values.

    With three or more updates at least one is cut from each end whenever fraction > 0, so that a
    round that lost oracles does not silently become a plain mean.
    """
    k = len(deltas)
    cut = int(fraction * k)
    if fraction > 0 and cut == 0 and k >= 3:
        cut = 1
    ordered = torch.stack(deltas).sort(dim=0).values
    return ordered[cut : k - cut].mean(dim=0)


def bucket_means(deltas: list[torch.Tensor], size: int, least: int) -> list[torch.Tensor]:
    """The updates dealt in order into buckets of about `size` and averaged per bucket, for a robust rule to combine
    (bucketing: Karimireddy, He & Jaggi, ICLR 2022), keeping at least `least` buckets (one per update if fewer).

    A coordinate-wise rule over a few non-IID updates ranks domains rather than averaging them: the median of six
    oracles' updates drops what only two of them learned. Bucket means spread less, so the rule's result stays near
    their mean, while an outlier still spoils one bucket of the `least` or more that the rule outvotes.
    """
    k = len(deltas)
    count = max(min(k, least), math.ceil(k / size))
    if count >= k:
        return deltas
    return [torch.stack(deltas[i::count]).mean(dim=0) for i in range(count)]


def combine(rule: str, deltas: list[torch.Tensor], weights: list[float], trim_fraction: float) -> torch.Tensor:
    """Aggregate accepted pseudo-gradients; `weights` (normalised) are used by `mean` only.

    The robust rules count every oracle once on purpose: token counts are reported by the oracles
    themselves, so a rule that trusted them would let one attacker claim the majority of the weight.
    """
    if not deltas:
        raise DgptError("no pseudo-gradient to aggregate this round")
    if rule == "mean":
        return weighted_mean(deltas, weights)
    if rule == "median":
        return coordinate_median(deltas)
    if rule == "trimmed_mean":
        return trimmed_mean(deltas, trim_fraction)
    if rule == "geometric_median":
        return geometric_median(deltas)
    raise DgptError(f"unknown aggregator {rule!r}; expected mean, median, trimmed_mean or geometric_median")


def _received(norms: dict[str, float], weights: dict[str, float], rule: str, clip_norm: float) -> list[tuple[float, float]]:
    """(w_j, ||Delta_j|| as the rule combined it) per accepted oracle: the normalised mean weights (`mean`) or 1/k
    (the robust rules, which count every oracle once), and the norm after clipping."""
    names = list(norms)
    w = normalise(weights, names) if rule == "mean" else {n: 1.0 / len(names) for n in names}
    return [(w[n], min(norms[n], clip_norm) if clip_norm > 0 else norms[n]) for n in names]


def agreement(update: torch.Tensor, norms: dict[str, float], weights: dict[str, float], rule: str, clip_norm: float) -> float:
    """How much of the oracles' movement survives aggregation: ||update|| / sum_j w_j ||Delta_j||.

    `norms` are the accepted oracles' pseudo-gradient norms, w_j their weights (see `_received`). 1 when every
    oracle moved the same way; about sqrt(sum_j w_j^2) (1/sqrt(k) for k equal weights) when their pseudo-gradients
    are orthogonal; 0 when they cancel (a weighted mean never exceeds 1; a coordinate-wise rule can). A low value
    says each round keeps only a fraction of what the oracles' inner steps learned.
    """
    moved = sum(w * norm for w, norm in _received(norms, weights, rule, clip_norm))
    return float(update.norm()) / moved if moved > 0 else 1.0


def extrapolation(
    kind: str, update: torch.Tensor, norms: dict[str, float], weights: dict[str, float], rule: str, clip_norm: float
) -> float:
    """The factor applied to the aggregated update before the outer step: 1, or FedExP's
    max(1, sum_j w_j ||Delta_j||^2 / (2 ||update||^2)) (Jhunjhunwala, Wang & Joshi, ICLR 2023).

    Oracles that moved alike get 1 (plain averaging); updates that partly cancel (non-IID oracles pulling toward
    their own domains, or small-batch noise at small H) leave a short mean, which FedExP lengthens: k orthogonal
    updates of equal norm and weight get k / 2. It needs only the norms every runtime already gathers. Under a
    robust rule the norms count at most as their median: one huge update, which the rule left out, cannot lengthen
    the step.
    """
    if kind == "none":
        return 1.0
    if kind != "fedexp":
        raise DgptError(f"unknown extrapolation {kind!r}; expected none or fedexp")
    received = _received(norms, weights, rule, clip_norm)
    if rule != "mean":  # the robust rules ignored an outlier: its norm must not lengthen their step either
        middle = statistics.median(norm for _, norm in received)
        received = [(w, min(norm, middle)) for w, norm in received]
    spread = sum(w * norm * norm for w, norm in received)
    length = float(update.norm()) ** 2
    return max(1.0, spread / (2 * length)) if length > 0 else 1.0
