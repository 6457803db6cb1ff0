"""Robust aggregation: the rules, the filters, bucketing, rounds with too few updates, and claimed sizes, against
updates that are poisoned, huge, reversed or non-IID."""

import copy
import statistics

import pytest
import torch
from conftest import rounds, strategy, tiny_config

from dgpt.config import FederationConfig
from dgpt.federation.aggregate import bucket_means, cap_shares, coordinate_median, geometric_median, trimmed_mean
from dgpt.federation.codec import Codec
from dgpt.federation.strategy import Strategy
from dgpt.runtimes.sim import pretrain_sim


@pytest.mark.parametrize("rule", ["median", "geometric_median"])
def test_robust_aggregator_end_to_end_with_poisoned_oracle(tmp_path, rule):
    poison = lambda name, d: -10 * d if name == "gamma" else d  # noqa: E731
    fed = {"rounds": 3, "inner_steps": 2, "aggregator": rule}
    robust = tiny_config(tmp_path / "robust", federation=fed)
    pretrain_sim(robust, tamper=poison)
    naive = tiny_config(tmp_path / "naive", federation={**fed, "aggregator": "mean"})
    pretrain_sim(naive, tamper=poison)
    assert rounds(robust)[-1]["loss"] < rounds(naive)[-1]["loss"]
    # agreement is measured on what the aggregator received (the tampered update): a mean never exceeds 1
    assert all(0 < r["agreement"] <= 1 + 1e-6 for r in rounds(naive)[1:])


def distance_sum(z, points):
    return float(sum((z - x).norm() for x in points))


def test_geometric_median_minimises_the_sum_of_distances():
    """Weiszfeld's fixed point against the definition: the unit vectors from z to the updates cancel (first-order
    optimality away from the data), no nearby point, update, mean or coordinate-wise median has a smaller sum of
    distances, and the closed forms hold (a collinear odd set: the middle point; a square: its centre; a majority of
    equal updates: that update)."""
    torch.manual_seed(0)
    points = [torch.randn(32) + 3 * torch.randn(1) for _ in range(7)]
    z = geometric_median(points)
    pull = sum((x - z) / (x - z).norm() for x in points)
    assert float(pull.norm()) < 1e-3 * len(points)
    best = distance_sum(z, points)
    rivals = [*points, torch.stack(points).mean(0), coordinate_median(points)]
    rivals += [z + 1e-2 * torch.randn(32) for _ in range(20)]
    assert all(best <= distance_sum(r, points) + 1e-6 for r in rivals)
    line = [torch.tensor([t, 2 * t]) for t in (0.0, 1.0, 5.0, 6.0, 40.0)]
    torch.testing.assert_close(geometric_median(line), torch.tensor([5.0, 10.0]), atol=1e-4, rtol=0)
    square = [torch.tensor(c) for c in ([0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0])]
    torch.testing.assert_close(geometric_median(square), torch.tensor([1.0, 1.0]))
    majority = [torch.ones(8)] * 3 + [torch.randn(8) * 100, torch.randn(8) * 100]
    torch.testing.assert_close(geometric_median(majority), torch.ones(8), atol=1e-4, rtol=0)


def test_geometric_median_moves_a_bounded_amount_whatever_an_outlier_sends():
    """An outlier pulls with a unit force: scaling it from 10 to 1e6 barely moves the result, which stays among the
    honest updates; and honest updates spread symmetrically about a centre are averaged (no per-coordinate ranking),
    so their geometric median is their mean."""
    torch.manual_seed(1)
    honest = [torch.randn(256) * 0.1 + 1.0 for _ in range(5)]
    radius = max(float((x - 1.0).norm()) for x in honest)
    shifted = [geometric_median(honest + [-scale * honest[0]]) for scale in (10.0, 1e3, 1e6)]
    assert all(float((z - 1.0).norm()) < radius for z in shifted)
    assert float((shifted[1] - shifted[2]).norm()) < 0.01 * radius
    centre, spread = torch.randn(64), torch.randn(3, 64)
    symmetric = [centre + spread[i] for i in range(3)] + [centre - spread[i] for i in range(3)]
    torch.testing.assert_close(geometric_median(symmetric), centre, atol=1e-4, rtol=0)


def test_trimmed_mean_cuts_at_least_one_from_each_end_with_three_updates():
    values = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([100.0])]
    assert trimmed_mean(values, 0.2).item() == 2.0  # int(0.2 * 3) = 0, yet the outlier is cut
    assert trimmed_mean(values, 0.0).item() == pytest.approx(103 / 3)


def test_claimed_sizes_buy_at_most_the_weight_cap():
    assert cap_shares({"a": 0.8, "b": 0.15, "c": 0.05}, 0.5) == pytest.approx({"a": 0.5, "b": 0.375, "c": 0.125})
    assert cap_shares({"a": 0.9, "b": 0.1}, 0.4) == {"a": 0.5, "b": 0.5}  # 2 x 0.4 < 1: equal shares
    liar = {"liar": 1e12, "b": 1000.0, "c": 1000.0}  # a rank claiming a trillion training tokens
    s = Strategy(FederationConfig(outer_lr=1.0, outer_momentum=0.0, max_weight_share=0.5), Codec("none", [2]), liar, torch.zeros(2), 0)
    sent = {"liar": torch.tensor([100.0, 0.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([0.0, 1.0])}
    result = s.aggregate({n: s.codec.encode(d) for n, d in sent.items()})
    torch.testing.assert_close(result.update, torch.tensor([50.0, 0.5]))


def test_robust_rules_skip_rounds_with_fewer_than_three_updates_and_hold_them_for_the_next():
    s = strategy(dict.fromkeys("abc", 1.0), 4, aggregator="median")
    result = s.aggregate({n: s.codec.encode(torch.ones(4) * (i + 1)) for i, n in enumerate("ab")})
    assert result.update is None and result.accepted == ["a", "b"]
    assert result.skipped == "median needs at least 3 accepted updates, got 2: no update this round (the accepted ones are held for the next)"
    assert torch.equal(s.apply(result, 1), torch.zeros(4))  # Theta did not move: the held updates are still valid
    resumed = strategy(dict.fromkeys("abc", 1.0), 4, aggregator="median")
    resumed.load_state_dict(copy.deepcopy(s.state_dict()), s.theta)  # a round checkpoint keeps what is held
    for t in (s, resumed):
        # b's newer update replaces its held one; a's held update counts with c's
        nxt = t.aggregate({"b": t.codec.encode(torch.ones(4) * 5), "c": t.codec.encode(torch.ones(4) * 3)})
        assert nxt.accepted == ["a", "b", "c"] and nxt.carried == ["a"] and not nxt.skipped
        torch.testing.assert_close(nxt.update, torch.full((4,), 3.0))  # median(1, 5, 3)
        t.apply(nxt, 1)
        assert t.held == {}
    lone = s.aggregate({"a": s.codec.encode(torch.full((4,), float("nan")))})  # a bad newer update: nothing held survives
    assert lone.accepted == [] and list(lone.rejected) == ["a"]


def test_bucket_means_keep_at_least_three_buckets_and_every_process_deals_alike():
    values = [torch.tensor([float(i)]) for i in range(6)]
    assert [b.item() for b in bucket_means(values, 2, 3)] == [1.5, 2.5, 3.5]  # dealt in order: (0, 3), (1, 4), (2, 5)
    assert [b.item() for b in bucket_means(values[:4], 2, 3)] == [1.5, 1.0, 2.0]  # 4 updates: (0, 3), (1), (2)
    assert bucket_means(values[:3], 2, 3) == values[:3] and len(bucket_means(values[:3], 5, 3)) == 3  # 3: no bucketing
    assert len(bucket_means(values + values, 2, 3)) == 6 and len(bucket_means(values, 1, 3)) == 6
    one, other = (strategy(dict.fromkeys("abcdef", 1.0), 4, aggregator="median") for _ in range(2))
    orders = []
    for _ in range(3):
        one.sample(), other.sample()
        assert one.order == other.order  # the same seed: every torchrun rank buckets the same oracles together
        orders.append(tuple(sorted(one.order, key=one.order.get)))
    assert len(set(orders)) == 3  # a new dealing each round


def test_bucketing_keeps_a_robust_rule_near_the_mean_of_non_iid_updates():
    """Six oracles from three domains (two each, as when a corpus is split), each domain moving its own coordinates (the
    embedding rows of its own tokens): the coordinate-wise median of six sees two values among four zeros and drops
    them; a median of bucket means (pairs) keeps them whenever the two oracles land in different buckets. One x1000
    update still spoils only its bucket."""
    torch.manual_seed(0)
    names, blocks = list("abcdef"), torch.arange(512).reshape(4, 128)  # block 0: every domain; 1-3: one domain each
    rules = {size: strategy(dict.fromkeys(names, 1.0), 512, aggregator="median", bucket_size=size) for size in (1, 2)}
    off_by = {size: [] for size in rules}
    for _ in range(20):  # rounds: a new dealing each
        deltas = {}
        for i, n in enumerate(names):
            d = torch.zeros(512)
            d[blocks[0]], d[blocks[1 + i // 2]] = 1.0, 3.0
            deltas[n] = d + 0.1 * torch.randn(512)
        mean = torch.stack(list(deltas.values())).mean(dim=0)
        for size, s in rules.items():
            s.sample()
            update = s.aggregate({n: s.codec.encode(d) for n, d in deltas.items()}).update
            off_by[size].append(float((update - mean).norm() / mean.norm()))
    assert statistics.mean(off_by[2]) < 0.7 * statistics.mean(off_by[1])
    s = rules[2]
    update = s.aggregate({n: s.codec.encode(1000 * d if n == "f" else d) for n, d in deltas.items()}).update
    assert float((update - mean).norm() / mean.norm()) < 1  # a plain mean: ~170


def test_fedexp_under_a_robust_rule_ignores_a_huge_update_and_is_capped():
    torch.manual_seed(0)
    honest = {n: torch.randn(64) * 0.1 + 1.0 for n in "abcd"}
    poisoned = {**honest, "e": torch.randn(64) * 1000.0}
    fed = {"aggregator": "median", "extrapolation": "fedexp", "outer_lr": 1.0, "outer_momentum": 0.0}
    s = strategy(dict.fromkeys("abcde", 1.0), 64, **fed)
    result = s.aggregate({n: s.codec.encode(d) for n, d in poisoned.items()})
    assert 1.0 <= result.scale < 1.5  # without the median cap on norms: ~1e5
    spread = strategy(dict.fromkeys("abcd", 1.0), 64, fedexp_max=1.5, extrapolation="fedexp")
    orthogonal = {n: torch.eye(64)[i] for i, n in enumerate("abcd")}  # FedExP alone would take 2
    assert spread.aggregate({n: spread.codec.encode(d) for n, d in orthogonal.items()}).scale == 1.5


def filtered_round(fed: dict, honest: dict, attacked: dict, off: dict) -> tuple:
    """The attacked round under `fed`, checked to equal the round in which the attacker sent nothing; returns it
    and the attacked round with the filter `off`."""
    s = strategy(dict.fromkeys(attacked, 1.0), 256, **fed)
    result = s.aggregate({n: s.codec.encode(d) for n, d in attacked.items()})
    assert result.accepted == list(honest) and list(result.rejected) == ["f"]
    silent = strategy(dict.fromkeys(attacked, 1.0), 256, **fed).aggregate({n: s.codec.encode(d) for n, d in honest.items()})
    torch.testing.assert_close(result.update, silent.update)
    unfiltered = strategy(dict.fromkeys(attacked, 1.0), 256, **{**fed, **off})
    return result, unfiltered.aggregate({n: unfiltered.codec.encode(d) for n, d in attacked.items()})


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "geometric_median"])
def test_norm_filter_leaves_out_updates_far_above_the_rounds_median_norm(rule):
    """A reversed x10 update passes a coordinate-wise rule biased (cut at one end of each coordinate, an honest
    value at the other); norm_filter leaves it out, so the round equals one in which that oracle sent nothing."""
    torch.manual_seed(0)
    honest = {n: torch.randn(256) * 0.1 + 1.0 for n in "abcde"}
    attacked = {**honest, "f": -10 * honest["a"]}
    fed = {"aggregator": rule, "outer_lr": 1.0, "outer_momentum": 0.0, "norm_filter": 3.0}
    result, off = filtered_round(fed, honest, attacked, {"norm_filter": 0.0})
    assert result.rejected["f"].startswith("norm ") and "x the round's median norm" in result.rejected["f"]
    assert off.accepted == list("abcdef")
    # honest spread passes: norms within 3x of the median are kept, and of two updates neither is out of line
    s = strategy(dict.fromkeys("abcdef", 1.0), 256, **fed)
    spread = {n: honest[n] * (1 + i) for i, n in enumerate("abc")}
    assert s.aggregate({n: s.codec.encode(d) for n, d in spread.items()}).accepted == list("abc")
    assert s.aggregate({"a": s.codec.encode(honest["a"]), "f": s.codec.encode(attacked["f"])}).rejected == {}


@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "geometric_median"])
def test_min_cosine_leaves_out_an_update_reversed_at_honest_length(rule):
    """A reversed update of honest length passes any test of length; min_cosine 0 leaves out what points away from
    the round's coordinate-wise median, and keeps honest updates that differ (non-IID) but share a direction."""
    torch.manual_seed(0)
    shared = torch.randn(256)
    honest = {n: shared + 1.5 * torch.randn(256) for n in "abcde"}  # cosines with each other ~0.3
    attacked = {**honest, "f": -honest["a"]}
    fed = {"aggregator": rule, "outer_lr": 1.0, "outer_momentum": 0.0, "norm_filter": 3.0, "min_cosine": 0.0}
    result, norm_only = filtered_round(fed, honest, attacked, {"min_cosine": -1.0})
    assert result.rejected["f"].startswith("cosine -0.") and "under min_cosine 0" in result.rejected["f"]
    assert norm_only.rejected == {}
