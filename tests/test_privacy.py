"""DP-SGD in the inner loop: per-example clipping, the noise's scale, the accountant against dp-accounting,
target_epsilon, exact resume, and the reports that carry epsilon."""

import dataclasses

import dp_accounting
import pytest
import torch
from conftest import rounds, tiny_config
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from dgpt import api
from dgpt.config import PrivacyConfig
from dgpt.errors import DgptError
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT
from dgpt.objectives import lm_loss
from dgpt.runinfo import info_lines
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint
from dgpt.train.privacy import Mechanism, PrivateGradients, _orders, epsilon_spent, noise_for

SMALL = GPTConfig(vocab_size=40, n_ctx=8, n_layer=1, n_head=2, d_model=16, d_ff=32, embd_dropout=0.0,
                  attn_dropout=0.0, resid_dropout=0.0)


def dp(sigma: float, clip: float, expected: float) -> PrivateGradients:
    return PrivateGradients(Mechanism(sigma, clip, 0.5, expected), delta=1e-5)


def scaled_loss(model):
    """Each example's LM loss times its own scale: one example's gradient can be made huge."""
    return lambda x, y, scale: lm_loss(model(x), y) * scale.squeeze()


def test_each_example_is_clipped_before_the_noise():
    torch.manual_seed(0)
    model = GPT(SMALL)
    x, y = torch.randint(0, 40, (3, 8)), torch.randint(0, 40, (3, 8))
    scale = torch.tensor([1.0, 1e4, 1.0])  # the middle example's gradient is 10,000 times longer
    dp(0.0, 0.5, 4.0).gradients(model, scaled_loss(model), (x, y, scale), chunk=2)  # two chunks: 2 + 1 examples
    got = [p.grad.clone() for p in model.parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(3):  # every example's gradient by plain autograd, clipped by hand
        model.zero_grad()
        scaled_loss(model)(x[i : i + 1], y[i : i + 1], scale[i : i + 1]).backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.stack([g.norm() for g in grads]).norm()
        assert (norm > 100 * 0.5) == (i == 1)  # only the scaled example is over max_grad_norm, far over
        for e, g in zip(expected, grads):
            e += g * min(1.0, 0.5 / (float(norm) + 1e-6))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e / 4.0, rtol=1e-4, atol=1e-7)
    # the huge example counts at most max_grad_norm: the sum is within 3 x 0.5 of zero
    assert torch.stack([g.norm() for g in got]).norm() * 4.0 <= 1.5 + 1e-4


def test_the_noise_has_the_configured_scale():
    torch.manual_seed(1)
    model = GPT(dataclasses.replace(SMALL, vocab_size=400, d_model=64))  # ~70k coordinates
    dp(1.3, 0.7, 8.0).gradients(model, scaled_loss(model), None, chunk=4)  # an empty Poisson draw: noise only
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * 8.0
    assert noise.mean().item() == pytest.approx(0.0, abs=0.02)
    assert noise.std().item() == pytest.approx(1.3 * 0.7, rel=0.02)


@pytest.mark.parametrize("sigma, q, steps", [(1.1, 0.01, 1000), (0.8, 0.05, 300), (4.0, 0.2, 50)])
def test_the_accountant_equals_opacus(sigma, q, steps):
    orders = _orders(dp_accounting)
    reference = RDPAccountant()
    reference.history = [(sigma, q, steps)]
    assert epsilon_spent([(sigma, q, steps)], 1e-5) == pytest.approx(reference.get_epsilon(1e-5, alphas=orders), rel=1e-9)
    # steps at a second (sigma, q) compose: the history of a run whose config changed
    reference.history.append((sigma * 2, q / 2, steps))
    both = epsilon_spent([(sigma, q, steps), (sigma * 2, q / 2, steps)], 1e-5)
    assert both == pytest.approx(reference.get_epsilon(1e-5, alphas=orders), rel=1e-9)


@pytest.mark.parametrize("target", [1.0, 8.0])
@pytest.mark.parametrize("q, steps", [(0.02, 500), (0.001, 1000)])  # 0.001: epsilon falls steeply with sigma there
def test_target_epsilon_sets_the_noise(target, q, steps):
    sigma = noise_for(target, 1e-5, q, steps)
    assert 0.95 * target <= epsilon_spent([(sigma, q, steps)], 1e-5) <= target


def test_a_run_spends_its_target_and_resumes_exactly(tmp_path):
    privacy = {"target_epsilon": 3.0, "max_grad_norm": 0.5}
    whole = tiny_config(tmp_path / "whole", privacy=privacy)
    summary = api.pretrain(whole)
    # every oracle took all its planned steps: each lands within 5% of the target, at or under it
    assert set(summary.epsilon) == set(whole.oracle_names())
    assert all(0.95 * 3.0 <= e <= 3.0 for e in summary.epsilon.values()), summary.epsilon
    assert any("epsilon spent at delta 1e-05" in line for line in summary.lines())
    rows = rounds(whole)
    assert [r["privacy_epsilon"] for r in rows[1:]][-1] == summary.epsilon and rows[1]["privacy_delta"] == 1e-5
    assert all(rows[i]["privacy_epsilon"]["alpha"] < rows[i + 1]["privacy_epsilon"]["alpha"] for i in range(1, 3))
    assert {r["oracle"]: r["privacy_epsilon"] for r in rounds(whole, "oracle") if r["round"] == 3} == summary.epsilon

    parts = tiny_config(tmp_path / "parts", privacy=privacy)
    api.pretrain(parts, stop_after=2)
    api.pretrain(parts)  # resumes the accountant with the inner loops
    assert [(r["loss"], r["privacy_epsilon"]) for r in rounds(parts)[1:]] == [(r["loss"], r["privacy_epsilon"]) for r in rows[1:]]
    wa, wb = (load_file(str(latest_checkpoint(c.run_path) / WEIGHTS)) for c in (whole, parts))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [line for line in info_lines(whole) if line.startswith("privacy")]
    assert len(lines) == 3 and f"alpha: epsilon {summary.epsilon['alpha']:.3f} at delta 1e-05 after 6 DP-SGD steps" in lines[0]

    # DP off costs nothing: the plain run trains otherwise (and resuming it with [privacy] is refused)
    plain = tiny_config(tmp_path / "plain")
    assert api.pretrain(plain).epsilon == {}
    more = dataclasses.replace(plain, privacy=PrivacyConfig(noise_multiplier=1.0),
                               federation=dataclasses.replace(plain.federation, rounds=4))
    with pytest.raises(DgptError, match=r"trained without \[privacy\] and would resume with it"):
        api.pretrain(more)


def test_central_baseline_under_dp(tmp_path):
    config = tiny_config(tmp_path, federation={"runtime": "central"}, privacy={"noise_multiplier": 1.0})
    summary = api.pretrain(config)
    assert list(summary.epsilon) == ["pooled"] and summary.epsilon["pooled"] > 0


def test_privacy_config_is_checked(tmp_path):
    with pytest.raises(DgptError, match="set one of 'privacy.noise_multiplier' and 'privacy.target_epsilon'"):
        tiny_config(tmp_path, privacy={"noise_multiplier": 1.0, "target_epsilon": 2.0})
    with pytest.raises(DgptError, match=r"'privacy.delta' must be in \(0, 1\)"):
        tiny_config(tmp_path, privacy={"noise_multiplier": 1.0, "delta": 0.0})
    with pytest.raises(DgptError, match="oracle 'alpha': \\[privacy\\] samples batches of 4000 expected examples"):
        api.pretrain(tiny_config(tmp_path, privacy={"noise_multiplier": 1.0}, pretrain={"batch_size": 4000}))
