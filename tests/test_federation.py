"""Federation arithmetic and the sim runtime: FedAvg and data-parallel equivalences, codecs, checks of what arrives,
resume (robust aggregation has its own module, test_robust_aggregation.py)."""

import io

import pytest
import torch
from conftest import rounds, strategy, tiny_config
from safetensors.torch import load_file
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from dgpt import api
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
from dgpt.model.gpt import GPT
from dgpt.objectives import lm_loss
from dgpt.runtimes.federated import oracle_seed
from dgpt.runtimes.setup import read_run
from dgpt.runtimes.sim import pretrain_sim
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint, weights_of
from dgpt.train.local import InnerLoop, lr_at, make_optimizer

NO_DROPOUT = {"embd_dropout": 0.0, "attn_dropout": 0.0, "resid_dropout": 0.0}


def final_weights(config):
    return load_file(str(latest_checkpoint(config.run_path) / WEIGHTS))


# --- pure federation arithmetic ---------------------------------------------------------------------


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
