"""The training fast paths compute what the plain ones do: fused chunked LM loss, attention written out
for dropout, the CPU dropout; and `dtype = "auto"` picks bf16 only where the hardware has it."""

import pytest
import torch
import torch.nn.functional as F

from dgpt.config import config_from_dict
from dgpt.errors import DgptError
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT, Dropout
from dgpt.model.lm_loss import IGNORE_INDEX, lm_head_loss
from dgpt.train import local
from dgpt.train.local import describe_dtype, native_bf16, resolve_dtype


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).reshape(-1, weight.size(0)), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 23))
    targets[0, :5] = targets[2, -1] = IGNORE_INDEX  # padding counts for nothing
    want = plain(hidden, weight, targets)
    want_grads = torch.autograd.grad(want * 3.0, (hidden, weight))
    got = lm_head_loss(hidden, weight, targets, chunk=chunk)
    got_grads = torch.autograd.grad(got * 3.0, (hidden, weight))  # the incoming gradient is applied
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # evaluation: the loss only
        torch.testing.assert_close(lm_head_loss(hidden, weight, targets, chunk=chunk), want, rtol=1e-12, atol=1e-12)


def test_chunked_loss_under_bf16_autocast_matches_autocast_of_the_plain_loss():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    targets = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(hidden, weight, targets)  # a bf16 matmul, the softmax in fp32
        got = lm_head_loss(hidden, weight, targets, chunk=16)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-3, atol=1e-3)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-4)


def test_model_loss_equals_cross_entropy_of_its_logits_with_gradients():
    config = GPTConfig(vocab_size=97, n_ctx=16, n_layer=2, n_head=2, d_model=32, d_ff=64,
                       embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    torch.manual_seed(0)
    model, twin = GPT(config).double(), GPT(config).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    model(x, y).backward()
    plain(twin.transformer(x), twin.lm_head.weight, y).backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("ln", ["post", "pre"])
def test_attention_written_out_for_dropout_equals_the_fused_kernel(ln):
    """Training with attention dropout takes the written-out attention; with its dropout an identity it must
    give what the fused kernel (eval mode) gives."""
    config = GPTConfig(vocab_size=97, n_ctx=16, n_layer=2, n_head=2, d_model=32, d_ff=64, ln=ln,
                       embd_dropout=0.0, attn_dropout=0.1, resid_dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config)
    for block in model.transformer.h:
        block.attn.attn_drop.p = 0.0  # the written-out path still runs (attn_dropout > 0), dropping nothing
    x = torch.randint(0, 97, (3, 16))
    torch.testing.assert_close(model.train()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_cpu_dropout_drops_p_and_rescales_the_rest():
    torch.manual_seed(0)
    drop = Dropout(0.25).train()
    x = torch.ones(400_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d y / d x is the same mask
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("flags, want", [
    ({"avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx512f", "amx_tile", "amx_bf16"}, "bfloat16"),
    ({"avx2", "avx512f"}, "float32"),  # AVX-512 without its bf16 instructions: emulated, slower
    (set(), "float32"),  # no /proc/cpuinfo
])
def test_auto_dtype_on_cpu_follows_the_cpu_flags(monkeypatch, flags, want):
    monkeypatch.setattr(local, "cpu_flags", lambda: frozenset(flags))
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == want
    assert resolve_dtype("float32", cpu) == "float32" and resolve_dtype("bfloat16", cpu) == "bfloat16"
    assert ("bfloat16 autocast" if want == "bfloat16" else "float32") in describe_dtype("auto", cpu)
    assert local.autocast(cpu, "auto").fast_dtype == torch.bfloat16
    assert local.autocast(cpu, "auto")._enabled == (want == "bfloat16")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_gpu_asks_for_native_bf16(monkeypatch, native):
    asked = {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.setdefault(
        "emulation", including_emulation) is False and native)
    assert native_bf16(torch.device("cuda"))[0] is native
    assert asked["emulation"] is False  # emulated bf16 does not count
    assert resolve_dtype("auto", torch.device("cuda:0")) == ("bfloat16" if native else "float32")


def test_cpu_flags_are_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx512_bf16 amx_bf16\n\nprocessor\t: 1\n")
    assert local.cpu_flags.__wrapped__(info) == {"fpu", "sse", "avx512_bf16", "amx_bf16"}
    assert local.cpu_flags.__wrapped__(tmp_path / "absent") == frozenset()


def test_config_dtype_defaults_to_auto_and_refuses_unknown_names():
    assert config_from_dict({}).pretrain.dtype == "auto"
    for name in ("auto", "float32", "bfloat16"):
        assert config_from_dict({"pretrain": {"dtype": name}}).pretrain.dtype == name
    with pytest.raises(DgptError, match="dtype"):
        config_from_dict({"pretrain": {"dtype": "float16"}})
