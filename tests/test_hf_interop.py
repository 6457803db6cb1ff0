"""Hugging Face interop: dgpt -> transformers and back give the same logits, generations and token ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, OpenAIGPTConfig, OpenAIGPTLMHeadModel  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.config import load_config  # noqa: E402
from dgpt.data.tokenizer import SPECIAL_TOKENS, TextTokenizer  # noqa: E402
from dgpt.errors import DgptError  # noqa: E402
from dgpt.interop.hf import export_hf, import_hf, key_map  # noqa: E402
from dgpt.model.generate import generate  # noqa: E402
from dgpt.model.config import GPTConfig, resolve_config  # noqa: E402
from dgpt.model.gpt import GPT  # noqa: E402
from dgpt.train.checkpoint import save_checkpoint, weights_of  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text and emoji 🙂 appear too.",
] * 20
PROBES = ["The fox", "<|endoftext|>To be<|pad|>", "<|start|>a<|delim|>b<|extract|>", " spaces  and\ttabs\n", "🙂漢字"]
HF_CLASS = {"post": OpenAIGPTLMHeadModel, "pre": GPT2LMHeadModel}
CASES = [("post", "gelu_tanh", 128), ("pre", "gelu_tanh", 64), ("pre", "gelu", 64)]  # OpenAI GPT fixes d_ff = 4 d


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(iter(TEXTS), vocab_size=300, min_frequency=2)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every tensor (LayerNorm gains and biases too), so no mapping slip hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_run(tmp_path, tokenizer, ln, activation, d_ff) -> tuple[GPT, object]:
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=32, n_layer=2, n_head=4, d_model=32, d_ff=d_ff,
                       ln=ln, activation=activation)
    torch.manual_seed(0)
    model = perturbed(GPT(config), 1)
    run_dir = tmp_path / "run"
    tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, "step", 5, weights_of(model), config, {}, keep=2)
    return model, run_dir


def random_ids(vocab: int, shape=(3, 20), seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_key_maps_cover_every_stored_tensor():
    for ln in ("post", "pre"):
        config = GPTConfig(vocab_size=300, n_ctx=32, n_layer=2, n_head=4, d_model=32, d_ff=128, ln=ln)
        rows = key_map(config)
        assert {d for d, _, _ in rows} == set(weights_of(GPT(config)))
        assert len({h for _, h, _ in rows}) == len(rows)
        transposed = {d for d, _, t in rows if t}
        assert "transformer.h.1.mlp.c_proj.weight" in transposed and "transformer.h.1.ln_1.weight" not in transposed
    assert ("transformer.wte.weight", "transformer.tokens_embed.weight", False) in key_map(
        GPTConfig(vocab_size=300, n_ctx=32, n_layer=1, n_head=4, d_model=32, d_ff=128))


@pytest.mark.parametrize("ln,activation,d_ff", CASES)
def test_export_matches_transformers(tmp_path, tokenizer, ln, activation, d_ff):
    model, run_dir = make_run(tmp_path, tokenizer, ln, activation, d_ff)
    out = export_hf(run_dir, tmp_path / "hf")
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    hf = HF_CLASS[ln].from_pretrained(out).eval()
    assert type(hf) is type(transformers.AutoModelForCausalLM.from_pretrained(out))
    ids = random_ids(tokenizer.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids))

    prompt = torch.cat([torch.full((4, 1), tokenizer.eot_id), random_ids(tokenizer.vocab_size, (4, 5), seed=1)], 1)
    ours = generate(model, prompt, 12, temperature=0, eot_id=tokenizer.eot_id)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                         eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id)
    assert theirs.tolist() == ours.tolist()

    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(auto, transformers.PreTrainedTokenizerFast)
    assert (auto.eos_token, auto.bos_token, auto.unk_token, auto.pad_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert set(SPECIAL_TOKENS[2:]) <= set(auto.all_special_tokens)
    for text in PROBES:
        assert auto(text)["input_ids"] == tokenizer.encode(text), text
        assert auto.decode(tokenizer.encode(text)) == text


def test_export_refuses_what_openai_gpt_cannot_hold(tmp_path, tokenizer):
    _, run_dir = make_run(tmp_path, tokenizer, "post", "gelu", 128)
    with pytest.raises(DgptError, match="tanh approximation"):
        export_hf(run_dir, tmp_path / "hf")
    with pytest.raises(DgptError, match="no checkpoint"):
        export_hf(tmp_path / "nothing", tmp_path / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _, run_dir = make_run(tmp_path / "b", tokenizer, "pre", "gelu", 64)
    with pytest.raises(DgptError, match="notes.txt"):
        export_hf(run_dir, tmp_path / "busy")


def hf_model(ln: str, vocab: int, seed: int = 3):
    torch.manual_seed(seed)
    if ln == "post":
        config = OpenAIGPTConfig(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    else:
        config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                            activation_function="gelu", bos_token_id=0, eos_token_id=0)
    return perturbed(HF_CLASS[ln](config), seed)


def assert_same_logits(run_dir, hf, vocab: int) -> GPT:
    model, _ = api.load_pretrained(run_dir, device="cpu")
    ids = random_ids(vocab, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :vocab], hf(ids).logits)
    return model


@pytest.mark.parametrize("ln", ["post", "pre"])
def test_import_matches_transformers(tmp_path, tokenizer, ln):
    hf = hf_model(ln, tokenizer.vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf" / "tokenizer.json")
    run_dir = import_hf(tmp_path / "hf", tmp_path / "run")
    model = assert_same_logits(run_dir, hf, tokenizer.vocab_size)
    assert model.config.vocab_size == tokenizer.vocab_size  # nothing added: the tokenizer had dgpt's tokens
    config = load_config(run_dir / "config.toml")
    assert resolve_config(config.model, tokenizer.vocab_size) == model.config
    assert api.generate_text(model, TextTokenizer.load(run_dir / "tokenizer.json"), "The", max_new_tokens=4,
                             temperature=0)[0].startswith("The")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_import_old_layout_with_mask_buffers_and_no_prefix(tmp_path, tokenizer, fmt):
    hf = hf_model("pre", tokenizer.vocab_size)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    (hf_dir / "model.safetensors").unlink()
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if fmt == "bin":
        torch.save(state, hf_dir / "pytorch_model.bin")
    else:
        save_file(state, str(hf_dir / "model.safetensors"))
    tokenizer.save(hf_dir / "tokenizer.json")
    assert_same_logits(import_hf(hf_dir, tmp_path / "run"), hf, tokenizer.vocab_size)


def test_import_adds_missing_special_tokens(tmp_path):
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    plain.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    vocab = plain.get_vocab_size()
    hf = hf_model("pre", vocab)
    hf.save_pretrained(tmp_path / "hf")
    plain.save(str(tmp_path / "hf" / "tokenizer.json"))
    run_dir = import_hf(tmp_path / "hf", tmp_path / "run")
    model = assert_same_logits(run_dir, hf, vocab)
    tok = TextTokenizer.load(run_dir / "tokenizer.json")
    assert model.config.vocab_size == tok.vocab_size == vocab + 4
    assert tok.eot_id == plain.token_to_id("<|endoftext|>") and tok.pad_id == vocab
    assert tok.encode("The fox") == plain.encode("The fox").ids


def test_import_bad_input_names_the_file(tmp_path, tokenizer):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(DgptError, match="config.json"):
        import_hf(hf_dir, tmp_path / "run")
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DgptError, match="config.json.*'bert'"):
        import_hf(hf_dir, tmp_path / "run")

    hf = hf_model("post", tokenizer.vocab_size)
    hf.save_pretrained(hf_dir)
    tokenizer.save(hf_dir / "tokenizer.json")
    state = load_file(str(hf_dir / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}, str(hf_dir / "model.safetensors"))
    with pytest.raises(DgptError, match=r"model.safetensors: missing key transformer.h.1.mlp.c_fc.bias"):
        import_hf(hf_dir, tmp_path / "run")
    save_file(dict(state, **{"multiple_choice_head.summary.weight": torch.zeros(1)}), str(hf_dir / "model.safetensors"))
    with pytest.raises(DgptError, match=r"model.safetensors: unknown key transformer.multiple_choice_head"):
        import_hf(hf_dir, tmp_path / "run")
    save_file(state, str(hf_dir / "model.safetensors"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("")
    with pytest.raises(DgptError, match="not empty"):
        import_hf(hf_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run")
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(DgptError, match="tokenizer.json: not found"):
        import_hf(hf_dir, tmp_path / "run")


def test_imported_run_continues_pretraining(tmp_path, tokenizer):
    from conftest import write_corpus

    from dgpt.train.checkpoint import latest_checkpoint
    from dgpt.train.metrics import read_metrics

    hf = hf_model("pre", tokenizer.vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf" / "tokenizer.json")
    run_dir = import_hf(tmp_path / "hf", tmp_path / "run")
    train, valid = write_corpus(tmp_path / "corpus", "alpha", 40, seed=0)
    with open(run_dir / "config.toml", "a") as f:
        f.write(f'\n[[oracles]]\nname = "alpha"\ntrain = ["{train}"]\nvalid = ["{valid}"]\n')
    config = load_config(run_dir / "config.toml", ["federation.runtime=central", "pretrain.steps=3",
                                                    "pretrain.batch_size=2", "pretrain.eval_windows=2"])
    api.pretrain(config)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == 3
    assert latest_checkpoint(run_dir).name == "step_0000003"
    initial = [r["loss"] for r in rows if r["kind"] == "valid"][0]  # the imported weights, before any step
    assert initial == pytest.approx(api.evaluate(config, max_windows=2).scores["alpha"]["loss"], rel=0.5)
