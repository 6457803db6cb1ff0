"""Federation arithmetic and the sim runtime: FedAvg and data-parallel equivalences, robustness, resume."""

import copy
import io
import statistics

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from dgpt import api
from dgpt.config import FederationConfig
from dgpt.data.loader import WindowSampler
from dgpt.errors import DgptError
from dgpt.federation.aggregate import (
    agreement,
    clip_to_norm,
    coordinate_median,
    extrapolation,
    geometric_median,
    trimmed_mean,
)
from dgpt.federation.codec import Codec, Payload
from dgpt.federation.outer import OuterOptimizer
from dgpt.federation.strategy import Strategy
from dgpt.model.gpt import GPT
from dgpt.objectives import lm_loss
from dgpt.runtimes.federated import oracle_seed
from dgpt.runtimes.setup import read_run
from dgpt.runtimes.sim import pretrain_sim
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint, weights_of
from dgpt.train.local import InnerLoop, lr_at, make_optimizer
from dgpt.train.metrics import read_metrics

NO_DROPOUT = {"embd_dropout": 0.0, "attn_dropout": 0.0, "resid_dropout": 0.0}


def final_weights(config):
    return load_file(str(latest_checkpoint(config.run_path) / WEIGHTS))


def rounds(config, kind="round"):
    return [r for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == kind]


# --- pure federation arithmetic ---------------------------------------------------------------------


def strategy(weights, numel, kind="none", **fed):
    return Strategy(FederationConfig(**fed), Codec(kind, [numel]), weights, torch.zeros(numel), seed=0)


def aggregate_round(deltas, rule, weights, trim_fraction, clip_norm):
    """The Strategy's rule on fp32 payloads: (update, accepted, rejected)."""
    numel = next(iter(deltas.values())).numel()
    s = strategy(weights, numel, aggregator=rule, trim_fraction=trim_fraction, clip_norm=clip_norm)
    result = s.aggregate({name: s.codec.encode(d) for name, d in deltas.items()})
    return result.update, result.accepted, list(result.rejected)


def test_outer_sgd_lr1_no_momentum_is_fedavg():
    theta = torch.randn(10)
    locals_ = [theta - torch.randn(10) * 0.1 for _ in range(3)]
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    deltas = dict(zip("abc", (theta - t for t in locals_)))
    update, accepted, _ = aggregate_round(deltas, "mean", weights, 0.0, 0.0)
    new = OuterOptimizer(theta, lr=1.0, momentum=0.0, nesterov=True).step(update)
    expected = sum(w * t for w, t in zip(weights.values(), locals_)) / 8.0
    torch.testing.assert_close(new, expected)
    assert accepted == ["a", "b", "c"]


def test_outer_nesterov_momentum_accumulates():
    outer = OuterOptimizer(torch.zeros(1), lr=0.7, momentum=0.9, nesterov=True)
    outer.step(torch.ones(1))  # buf = 1; step = g + 0.9 buf = 1.9
    torch.testing.assert_close(outer.theta.detach(), torch.tensor([-0.7 * 1.9]))
    outer.step(torch.ones(1))  # buf = 1.9; step = 1 + 0.9 * 1.9 = 2.71
    torch.testing.assert_close(outer.theta.detach(), torch.tensor([-0.7 * 1.9 - 0.7 * 2.71]))


def test_agreement_of_aligned_orthogonal_and_opposite_updates():
    e = torch.eye(3)
    same = {"a": 1.0, "b": 1.0, "c": 1.0}
    norms = dict.fromkeys("abc", 1.0)
    assert agreement(e[0], norms, same, "mean", 0.0) == pytest.approx(1.0)  # all moved along e0
    mean = (e[0] + e[1] + e[2]) / 3  # three orthogonal unit updates, equal weights
    assert agreement(mean, norms, same, "mean", 0.0) == pytest.approx(3**-0.5)
    assert agreement(torch.zeros(3), {"a": 1.0, "b": 1.0}, same, "mean", 0.0) == 0.0  # opposite updates cancel
    weights = {"a": 3.0, "b": 1.0, "c": 0.0}  # mean weights count for `mean`, not for the robust rules
    update = 0.75 * e[0] + 0.25 * e[1]
    assert agreement(update, {"a": 1.0, "b": 1.0}, weights, "mean", 0.0) == pytest.approx(update.norm().item())
    assert agreement(e[0], {"a": 2.0, "b": 4.0}, weights, "median", 0.0) == pytest.approx(1 / 3)
    assert agreement(e[0], {"a": 2.0, "b": 4.0}, weights, "median", 1.0) == pytest.approx(1.0)  # norms clipped to 1


def test_fedexp_lengthens_only_updates_that_disagree():
    e = torch.eye(4)
    same = dict.fromkeys("abcd", 1.0)
    norms = dict.fromkeys("abcd", 1.0)
    assert extrapolation("fedexp", e[0], norms, same, "mean", 0.0) == 1.0  # all moved alike: plain averaging
    orthogonal = e.mean(dim=0)  # four orthogonal unit updates: sum_j w_j |D_j|^2 / (2 |mean|^2) = 1 / (2 * 1/4) = 2
    assert extrapolation("fedexp", orthogonal, norms, same, "mean", 0.0) == pytest.approx(2.0)
    assert extrapolation("none", orthogonal, norms, same, "mean", 0.0) == 1.0
    assert extrapolation("fedexp", torch.zeros(4), norms, same, "mean", 0.0) == 1.0  # cancelled: nothing to lengthen
    weights = {"a": 3.0, "b": 1.0}  # token weights count for `mean`; the norms are taken as clipped
    update = 0.75 * e[0] + 0.25 * 2 * e[1]  # a: |D_a| = 1; b: |D_b| = 3, clipped to 2
    norms = {"a": 1.0, "b": 3.0}
    unclipped = (0.75 * 1 + 0.25 * 9) / (2 * update.norm().item() ** 2)
    clipped = (0.75 * 1 + 0.25 * 4) / (2 * update.norm().item() ** 2)
    assert extrapolation("fedexp", update, norms, weights, "mean", 0.0) == pytest.approx(unclipped)
    assert extrapolation("fedexp", update, norms, weights, "mean", 2.0) == pytest.approx(clipped)
    assert 1 < clipped < unclipped
    with pytest.raises(DgptError, match="unknown extrapolation 'adam'"):
        extrapolation("adam", update, norms, same, "mean", 0.0)


def test_robust_aggregators_resist_a_poisoned_update():
    torch.manual_seed(0)
    honest = [torch.randn(1000) * 0.01 + 1.0 for _ in range(4)]
    poisoned = honest + [-10 * honest[0]]
    assert (coordinate_median(poisoned) - 1.0).abs().max() < 0.05
    assert (trimmed_mean(poisoned, 0.2) - 1.0).abs().max() < 0.05
    assert (geometric_median(poisoned) - 1.0).abs().max() < 0.05
    mean, _, _ = aggregate_round(dict(enumerate(poisoned)), "mean", dict.fromkeys(range(5), 1.0), 0.0, 0.0)
    assert (mean - 1.0).abs().mean() > 1.0  # the mean is dragged away
    torch.testing.assert_close(coordinate_median([torch.tensor([1.0, 5.0]), torch.tensor([3.0, 1.0])]), torch.tensor([2.0, 3.0]))


def test_norm_clipping_and_non_finite_rejection():
    big = torch.full((4,), 10.0)
    assert clip_to_norm(big, 1.0).norm().item() == pytest.approx(1.0)
    assert torch.equal(clip_to_norm(big, 0.0), big)
    deltas = {"good": torch.ones(4), "nan": torch.tensor([1.0, float("nan"), 0, 0]), "inf": torch.full((4,), float("inf"))}
    update, accepted, rejected = aggregate_round(deltas, "mean", {"good": 1.0, "nan": 1.0, "inf": 1.0}, 0.0, 0.0)
    assert accepted == ["good"] and rejected == ["nan", "inf"]
    torch.testing.assert_close(update, torch.ones(4))
    assert aggregate_round({"nan": deltas["nan"]}, "mean", {"nan": 1.0}, 0.0, 0.0)[0] is None


@pytest.mark.parametrize("kind, block, max_rel_err", [("bf16", 0, 1e-2), ("int8", 0, 2e-2), ("int8", 64, 1e-2), ("int8", 1000, 2e-2)])
def test_codec_error_dtypes_and_bytes(kind, block, max_rel_err):
    torch.manual_seed(0)
    delta = torch.randn(4096) * 1e-3
    delta[:1024] *= 100  # one parameter tensor far larger than the other: per-tensor scales keep the small one
    codec = Codec(kind, [1024, 3072], block)
    payload = codec.encode(delta)
    received = codec.decode(payload)
    sizes = [1024, 3072] if block == 0 else [4096]  # a block may straddle two tensors (1000 does, and pads the last)
    for got, want in zip(received.split(sizes), delta.split(sizes)):
        assert (got - want).norm() / want.norm() < max_rel_err
    scales = {"bf16": 0, "int8": -(-4096 // block) if block else 2}[kind]
    assert payload.values.dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[kind]
    assert payload.values.numel() == 4096 and payload.scales.numel() == scales  # int8 padding is never sent
    assert payload.nbytes == {"bf16": 2, "int8": 1}[kind] * 4096 + 4 * scales
    empty = codec.empty()
    assert (empty.values.dtype, empty.values.shape, empty.scales.shape) == (payload.values.dtype, payload.values.shape, payload.scales.shape)
    assert Codec("none", [4096]).encode(delta).nbytes == 4 * 4096


@pytest.mark.parametrize("kind", ["none", "bf16", "int8"])
def test_strategy_checks_what_it_received(kind):
    s = strategy(dict.fromkeys("abcde", 1.0), 8, kind)
    good = s.codec.encode(torch.ones(8))
    nan = s.codec.encode(torch.tensor([1.0, float("nan")] + [0.0] * 6))
    inf = s.codec.encode(torch.full((8,), float("inf")))
    short = Payload(good.values[:4], good.scales)
    other = Payload(torch.ones(8, dtype=torch.float64), good.scales)
    result = s.aggregate({"a": good, "b": nan, "c": inf, "d": short, "e": other})
    assert result.accepted == ["a"] and result.participants == list("abcde")
    assert result.rejected["b"] == result.rejected["c"] == "NaN/Inf in its pseudo-gradient"
    assert "(4,)" in result.rejected["d"] and "float64" in result.rejected["e"]
    assert result.bytes_received["a"] == good.nbytes
    torch.testing.assert_close(result.update, torch.ones(8))
    theta = s.apply(result, inner_steps=3)
    torch.testing.assert_close(theta, -torch.ones(8) * 0.7 * 1.9)  # Nesterov 0.7 / 0.9 from Theta = 0
    assert s.bytes.sent["e"] == other.nbytes and s.bytes.dp_bytes == 2 * 32 * 3 * 5


def test_strategy_state_resumes_draws_and_momentum():
    a = strategy(dict.fromkeys("abcd", 1.0), 4, drop_prob=0.5)
    for _ in range(3):
        a.apply(a.aggregate({n: a.codec.encode(torch.randn(4)) for n in a.sample()}), 1)
    b = strategy(dict.fromkeys("abcd", 1.0), 4, drop_prob=0.5)
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)  # as a round checkpoint keeps it
    saved.seek(0)
    b.load_state_dict(torch.load(saved, weights_only=True), a.theta.clone())
    assert [a.sample() for _ in range(5)] == [b.sample() for _ in range(5)]
    update = {n: a.codec.encode(torch.ones(4)) for n in "abcd"}
    torch.testing.assert_close(a.apply(a.aggregate(update), 1), b.apply(b.aggregate(update), 1))


# --- the sim runtime end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("extrapolate", ["none", "fedexp"])
def test_sim_fedavg_equals_average_of_independent_oracles(tmp_path, extrapolate):
    """One round from Theta: FedAvg is the token-weighted mean of independently trained oracles; FedExP moves
    from Theta along that mean by max(1, sum_j w_j |D_j|^2 / (2 |sum_j w_j D_j|^2)). For FedExP one oracle's
    update is sent reversed, so that the updates disagree enough to be lengthened."""
    sign = {"beta": -1.0} if extrapolate == "fedexp" else {}
    fed = {"rounds": 1, "inner_steps": 3, "outer_lr": 1.0, "outer_momentum": 0.0, "mean_weights": "tokens",
           "extrapolation": extrapolate}
    config = tiny_config(tmp_path, federation=fed)
    pretrain_sim(config, tamper=lambda name, delta: delta * sign.get(name, 1.0))
    setup = read_run(config)
    deltas = []
    for j, name in enumerate(config.oracle_names()):
        torch.manual_seed(config.seed)
        model = GPT(setup.model_config)
        start = parameters_to_vector(model.parameters()).detach().clone()
        seed = oracle_seed(config.seed, j)
        loop = InnerLoop(model, config.pretrain, WindowSampler(setup.train[name], 32, seed), 3, torch.device("cpu"), seed)
        for _ in range(3):
            loop.train_step()
        delta = start - parameters_to_vector(model.parameters()).detach()
        deltas.append((loop.sampler.num_tokens, delta * sign.get(name, 1.0)))
    total = sum(n for n, _ in deltas)
    mean = sum(n * d for n, d in deltas) / total
    spread = sum(n * d.norm() ** 2 for n, d in deltas) / total
    scale = max(1.0, (spread / (2 * mean.norm() ** 2)).item()) if extrapolate == "fedexp" else 1.0
    vector_to_parameters(start - scale * mean, model.parameters())
    got, expected = final_weights(config), weights_of(model)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    row = rounds(config)[1]
    assert row["outer_scale"] == pytest.approx(scale, rel=1e-4)
    assert (scale > 1.0) == (extrapolate == "fedexp")
    # the logged agreement: |sum_j w_j Delta_j| / sum_j w_j |Delta_j| with token weights
    moved = mean.norm() / (sum(n * d.norm() for n, d in deltas) / total)
    assert row["agreement"] == pytest.approx(moved.item(), rel=1e-4)
    assert 0 < moved < 1


def test_sim_one_inner_step_equals_synchronous_data_parallel(tmp_path):
    fed = {"rounds": 4, "inner_steps": 1, "outer_lr": 1.0, "outer_momentum": 0.0, "mean_weights": "uniform"}
    pre = {"optimizer": "sgd", "lr": 0.5, "warmup_steps": 0, "grad_clip": 0.0, "dtype": "float32"}  # the reference is fp32
    config = tiny_config(tmp_path, federation=fed, pretrain=pre, model=NO_DROPOUT)
    pretrain_sim(config)
    # the reference: one model, each step the mean of every oracle's gradient on its own batch
    setup = read_run(config)
    torch.manual_seed(config.seed)
    model = GPT(setup.model_config)
    names = config.oracle_names()
    samplers = [WindowSampler(setup.train[n], 32, oracle_seed(config.seed, j)) for j, n in enumerate(names)]
    optimizer = make_optimizer(model, config.pretrain)
    for step in range(4):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.pretrain, 4)
        for sampler in samplers:
            x, y = sampler.sample(config.pretrain.batch_size)
            (lm_loss(model(x), y) / len(samplers)).backward()
        optimizer.step()
        optimizer.zero_grad()
    got = final_weights(config)
    for key, value in weights_of(model).items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_sim_exact_resume(tmp_path):
    fed = {"rounds": 3, "inner_steps": 2}
    full = tiny_config(tmp_path / "a", federation=fed)
    pretrain_sim(full)
    cut = tiny_config(tmp_path / "b", federation=fed)
    pretrain_sim(cut, stop_after_round=1)
    pretrain_sim(cut)
    assert [r["oracles"] for r in rounds(full)] == [r["oracles"] for r in rounds(cut)]
    a, b = final_weights(full), final_weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sim_rejects_non_finite_oracle_and_goes_on(tmp_path, caplog):
    config = tiny_config(tmp_path, federation={"rounds": 2, "inner_steps": 1})
    pretrain_sim(config, tamper=lambda name, d: d * float("nan") if name == "beta" else d)
    assert any("oracle 'beta'" in r.message and "NaN" in r.message and r.levelname == "WARNING" for r in caplog.records)
    for row in rounds(config)[1:]:
        assert row["rejected"] == ["beta"] and row["accepted"] == ["alpha", "gamma"]
    assert all(torch.isfinite(t).all() for t in final_weights(config).values())


def test_sim_drops_oracles_and_counts_bytes(tmp_path):
    config = tiny_config(tmp_path, federation={"rounds": 6, "inner_steps": 1, "drop_prob": 0.5, "compression": "int8"})
    pretrain_sim(config)
    rows = rounds(config)[1:]
    assert any(len(r["participants"]) < 3 for r in rows)
    per_oracle = rounds(config, "oracle")
    sat_out = [r for r in per_oracle if not r["participated"]]
    assert sat_out and all(r["bytes_sent"] == 0 for r in sat_out)
    sent = sum(r["bytes_sent"] for r in per_oracle)
    assert rows[-1]["bytes_sent"] == sent
    n_params = sum(t.numel() for t in final_weights(config).values())
    assert 0 < sent < len(per_oracle) * n_params  # int8: about one byte per parameter per upload


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


def test_oracle_shards_from_another_tokenizer_are_refused(tmp_path):
    config = tiny_config(tmp_path)
    api.prepare(config)
    other = tiny_config(tmp_path / "other", tokenizer={"vocab_size": 280})
    api.prepare(other)
    alien = other.run_path / "data" / "beta"
    target = config.run_path / "data" / "beta"
    for f in target.iterdir():
        f.unlink()
    for f in alien.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DgptError, match="different tokenizer"):
        read_run(config)


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
    from dgpt.federation.aggregate import cap_shares

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
    from dgpt.federation.aggregate import bucket_means

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
