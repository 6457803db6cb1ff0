"""The decoder: shapes, parameter count, causality, tying, initialisation, KV cache, sampling filters."""

import pytest
import torch

from dgpt.model.generate import filter_logits, generate
from dgpt.model.config import PRESETS, GPTConfig
from dgpt.model.gpt import GPT, KVCache
from dgpt.model.memory import param_count_estimate


def small(ln="post", **kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=97, n_ctx=16, n_layer=2, n_head=2, d_model=32, d_ff=64, ln=ln), **kw})


def test_gpt1_preset_shapes_and_parameter_count():
    config = GPTConfig(vocab_size=40478, **PRESETS["gpt1"])
    with torch.device("meta"):
        model = GPT(config)
        logits = model(torch.zeros(2, 512, dtype=torch.long))
    assert logits.shape == (2, 512, 40478)
    n = model.num_params()
    assert n == param_count_estimate(config)
    assert 116e6 < n < 118e6  # GPT-1: ~117M
    assert len(model.transformer.h) == 12 and model.transformer.ln_f is None


@pytest.mark.parametrize("ln", ["post", "pre"])
def test_parameter_count_formula(ln):
    config = small(ln)
    assert GPT(config).num_params() == param_count_estimate(config)


@pytest.mark.parametrize("ln", ["post", "pre"])
def test_causality(ln):
    torch.manual_seed(0)
    model = GPT(small(ln)).eval()
    x = torch.randint(0, 97, (2, 16))
    base = model(x)
    for t in (0, 5, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 97
        changed = model(y)
        torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(changed[:, t], base[:, t])


def test_output_projection_is_tied_to_token_embedding():
    model = GPT(small())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())  # counted once
    x = torch.randint(0, 97, (1, 8))
    model(x).sum().backward()
    # the embedding receives gradient from the head even for tokens absent from the input
    absent = sorted(set(range(97)) - set(x.flatten().tolist()))[0]
    assert model.transformer.wte.weight.grad[absent].abs().sum() > 0


def test_gpt1_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2000, n_ctx=64, n_layer=2, n_head=4, d_model=256, d_ff=1024))
    block = model.transformer.h[0]
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 1e-3
    assert block.attn.c_attn.bias.abs().max() == 0
    assert torch.equal(block.ln_1.weight, torch.ones(256))


@pytest.mark.parametrize("ln", ["post", "pre"])
def test_kv_cache_logits_match_full_forward(ln):
    torch.manual_seed(0)
    model = GPT(small(ln)).eval()
    x = torch.randint(0, 97, (3, 12))
    full = model(x)
    cache = KVCache(model.config, 3, "cpu", torch.float32)
    parts = [model(x[:, :5], cache=cache), model(x[:, 5:6], cache=cache), model(x[:, 6:12], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ln", ["post", "pre"])
def test_greedy_generation_same_with_and_without_cache(ln):
    torch.manual_seed(1)
    model = GPT(small(ln))
    prompt = torch.randint(0, 97, (2, 5))
    # 30 new tokens run past n_ctx = 16, so the sliding window is exercised too
    cached = generate(model, prompt, 30, temperature=0, use_cache=True)
    uncached = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, uncached)


def test_generation_stops_at_end_of_text():
    torch.manual_seed(0)
    model = GPT(small())
    prompt = torch.randint(0, 97, (1, 3))
    first = generate(model, prompt, 1, temperature=0)[0, -1].item()
    out = generate(model, prompt, 20, temperature=0, eot_id=first)
    assert out.shape[1] == 4  # stopped right after producing the end-of-text id


@pytest.mark.parametrize("use_cache", [True, False])
def test_end_of_text_is_not_drawn_before_min_new_tokens(use_cache):
    torch.manual_seed(0)
    model = GPT(small()).eval()
    prompt = torch.randint(0, 97, (2, 3))
    eot = generate(model, prompt[:1], 1, temperature=0)[0, -1].item()  # what greedy decoding picks first
    out = generate(model, prompt, 20, temperature=0, eot_id=eot, min_new_tokens=5, use_cache=use_cache)
    assert out.shape[1] >= 3 + 5 and eot not in out[:, 3:8].tolist()[0] + out[:, 3:8].tolist()[1]
    with torch.no_grad():  # the first new token is the best one but end-of-text
        logits = model(prompt[:1])[0, -1]
    logits[eot] = float("-inf")
    assert out[0, 3].item() == logits.argmax().item()
    sampled = generate(model, prompt, 8, temperature=1.0, eot_id=eot, min_new_tokens=8, generator=torch.Generator().manual_seed(1))
    assert sampled.shape[1] == 3 + 8 and eot not in sampled[:, 3:].flatten().tolist()


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    nucleus = filter_logits(logits, top_p=0.75)  # 0.5 + 0.3 reaches 0.75: keep two
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_p=0.1)[0, 0])  # the top token always stays


def test_sampling_respects_top_k_and_seed():
    torch.manual_seed(0)
    model = GPT(small())
    prompt = torch.zeros(4, 2, dtype=torch.long)
    a = generate(model, prompt, 10, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 10, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bf16_autocast_forward_on_cpu():
    model = GPT(small())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 97, (2, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_sequence_longer_than_context_is_refused():
    model = GPT(small())
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        model(torch.zeros(1, 17, dtype=torch.long))
