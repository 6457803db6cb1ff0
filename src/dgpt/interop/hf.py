"""Hugging Face `transformers` directories <-> dgpt runs, with explicit key maps and no pickles written.

    export_hf(run_dir, out_dir)      newest checkpoint -> config.json + model.safetensors + tokenizer files
    import_hf(hf_dir, out_run_dir)   config.json + model.safetensors (or pytorch_model.bin) -> a dgpt run

`ln = "post"` (GPT-1) is `OpenAIGPTLMHeadModel` (model_type "openai-gpt"); `ln = "pre"` is
`GPT2LMHeadModel` (model_type "gpt2"). Both scale attention by 1/sqrt(head_dim) like dgpt. HF's Conv1D
stores a projection as [in, out], nn.Linear as [out, in]: those weights are transposed. The output
projection is tied to the token embedding on both sides, so `lm_head.weight` is never written.

Limits of the mapping: OpenAI GPT in `transformers` fixes d_ff = 4 * d_model and its `afn = "gelu"` is
the tanh approximation (`gelu_new`), so a post-LN run must use d_ff = 4 * d_model and gelu_tanh.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tokenizers import AddedToken, Tokenizer

from dgpt.config import Config, ModelConfig, TokenizerConfig, dump_config
from dgpt.data.tokenizer import SPECIAL_TOKENS, TextTokenizer
from dgpt.errors import DgptError
from dgpt.fileio import atomic_dir, read_json_object, write_bytes, write_json, write_text
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT
from dgpt.rundir import RunDir
from dgpt.runtimes.setup import newest_weights
from dgpt.train.checkpoint import save_checkpoint

_BLOCK = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)
EXPORT_FILES = frozenset(
    ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
     "special_tokens_map.json")
)
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# config.json written by save_pretrained omits values equal to the class defaults
_HF_DEFAULTS = {
    "openai-gpt": dict(n_positions=512, n_embd=768, n_layer=12, n_head=12, afn="gelu"),
    "gpt2": dict(n_positions=1024, n_embd=768, n_layer=12, n_head=12, activation_function="gelu_new"),
}
_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old files


def key_map(config: GPTConfig) -> list[tuple[str, str, bool]]:
    """(dgpt key, HF key, transposed) for every tensor stored; `lm_head.weight` is tied on both sides."""
    wte, wpe = ("tokens_embed", "positions_embed") if config.ln == "post" else ("wte", "wpe")
    rows = [("transformer.wte.weight", f"transformer.{wte}.weight", False),
            ("transformer.wpe.weight", f"transformer.{wpe}.weight", False)]
    for i in range(config.n_layer):
        for name in _BLOCK:  # same names in both libraries; Conv1D weights are [in, out]
            key = f"transformer.h.{i}.{name}"
            rows.append((key, key, name.endswith("weight") and ".c_" in name))
    if config.ln == "pre":
        rows += [("transformer.ln_f.weight", "transformer.ln_f.weight", False),
                 ("transformer.ln_f.bias", "transformer.ln_f.bias", False)]
    return rows


def hf_config(config: GPTConfig, tokenizer: TextTokenizer) -> dict:
    """The config.json of the HF model equal to a dgpt model."""
    common = dict(
        vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.d_model, n_layer=config.n_layer,
        n_head=config.n_head, embd_pdrop=config.embd_dropout, attn_pdrop=config.attn_dropout,
        resid_pdrop=config.resid_dropout, layer_norm_epsilon=config.ln_eps, initializer_range=0.02,
        bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id,
        tie_word_embeddings=True,
    )
    if config.ln == "pre":
        return dict(
            common, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_inner=config.d_ff,
            activation_function="gelu_new" if config.activation == "gelu_tanh" else "gelu",
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
            add_cross_attention=False, use_cache=True,
        )
    if config.activation != "gelu_tanh":
        raise DgptError("ln = 'post' exports as OpenAI GPT, whose only GELU is the tanh approximation; "
                        "this model uses exact gelu")
    if config.d_ff != 4 * config.d_model:
        raise DgptError(f"ln = 'post' exports as OpenAI GPT, which fixes d_ff = 4 * d_model = {4 * config.d_model}; "
                        f"this model has d_ff {config.d_ff}")
    return dict(common, model_type="openai-gpt", architectures=["OpenAIGPTLMHeadModel"], afn="gelu")


def _model_type(hf: dict, source: str) -> str:
    kind = hf.get("model_type")
    if kind not in _HF_DEFAULTS:
        raise DgptError(f"{source}: model_type {kind!r} is not supported; expected 'openai-gpt' or 'gpt2'")
    return kind


def gpt_config(hf: dict, vocab_size: int, source: str) -> GPTConfig:
    """A config.json (as a dict) -> the equal GPTConfig; refuses what dgpt cannot compute."""
    kind = _model_type(hf, source)
    hf = {**_HF_DEFAULTS[kind], **hf}
    if kind == "openai-gpt":
        if hf["afn"] != "gelu":
            raise DgptError(f"{source}: afn {hf['afn']!r} is not supported; dgpt has GELU only ('gelu')")
        ln, activation, d_ff = "post", "gelu_tanh", 4 * hf["n_embd"]
    else:
        activation = _GPT2_ACTIVATIONS.get(hf["activation_function"])
        if activation is None:
            raise DgptError(f"{source}: activation_function {hf['activation_function']!r} is not supported; "
                            f"expected one of {', '.join(_GPT2_ACTIVATIONS)}")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise DgptError(f"{source}: {key} = {hf[key]} is not supported (dgpt needs {want})")
        ln, d_ff = "pre", hf.get("n_inner") or 4 * hf["n_embd"]
    try:
        return GPTConfig(
            vocab_size=vocab_size, n_ctx=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
            d_model=hf["n_embd"], d_ff=d_ff, ln=ln, activation=activation, embd_dropout=hf.get("embd_pdrop", 0.1),
            attn_dropout=hf.get("attn_pdrop", 0.1), resid_dropout=hf.get("resid_pdrop", 0.1),
            ln_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    except (ValueError, TypeError) as e:
        raise DgptError(f"{source}: {e}") from None


def _remap(state: dict[str, torch.Tensor], rows: list[tuple[str, str, bool]], path: Path) -> dict[str, torch.Tensor]:
    """Rename (and transpose) every tensor by rows of (source key, target key, transposed); exact key sets."""
    expected = [src for src, _, _ in rows]
    missing = [k for k in expected if k not in state]
    if missing:
        raise DgptError(f"{path}: missing key {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise DgptError(f"{path}: unknown key {unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return {dst: (state[src].t() if transposed else state[src]).contiguous() for src, dst, transposed in rows}


def _check_target(path: Path, may_hold: frozenset = frozenset()) -> None:
    """Refuse to replace a directory that holds anything but what this module writes there."""
    if path.exists():
        if not path.is_dir():
            raise DgptError(f"{path}: exists and is not a directory")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in may_hold)
        if foreign:
            raise DgptError(f"{path}: directory is not empty ({foreign[0]}); choose a new output directory")


# --- export -------------------------------------------------------------------------------------------------


def export_hf(run_dir: Path, out_dir: Path) -> Path:
    """The newest checkpoint of a dgpt run -> a directory `transformers.AutoModelForCausalLM` and
    `AutoTokenizer` load without dgpt. An existing earlier export at `out_dir` is replaced."""
    out_dir = Path(out_dir)
    tokenizer, config, weight_file = newest_weights(Path(run_dir))
    hf = hf_config(config, tokenizer)
    try:
        state = load_file(str(weight_file))
    except SafetensorError as e:
        raise DgptError(f"{weight_file}: corrupt weight file ({e})") from None
    weights = _remap(state, key_map(config), weight_file)
    _check_target(out_dir, EXPORT_FILES)
    eot, pad, *extra = SPECIAL_TOKENS
    special = dict(bos_token=eot, eos_token=eot, unk_token=eot, pad_token=pad, additional_special_tokens=extra)
    with atomic_dir(out_dir) as tmp:
        write_bytes(tmp / "model.safetensors", save(weights, metadata={"format": "pt"}))
        write_json(tmp / "config.json", hf)
        write_json(tmp / "generation_config.json",
                   dict(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id))
        tokenizer.save(tmp / "tokenizer.json")
        write_json(tmp / "special_tokens_map.json", special)
        write_json(tmp / "tokenizer_config.json", dict(
            special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=config.n_ctx,
            clean_up_tokenization_spaces=False, add_bos_token=False, add_eos_token=False,
        ))
    return out_dir


# --- import -------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return read_json_object(path, "not found (not a Hugging Face model directory?)")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One weight file: safetensors, or a PyTorch file read with weights_only=True (nothing unpickled)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DgptError(f"{path}: weight file not found") from None
    except Exception as e:  # safetensors and torch raise several types for corrupt or foreign files
        raise DgptError(f"{path}: cannot read weights ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DgptError(f"{path}: not a state dict of tensors")
    return state


def _read_weights(hf_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The HF weights (single file or shards) and the file to name in errors."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return _load_tensors(hf_dir / name), hf_dir / name
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (hf_dir / name).is_file():
            weight_map = _read_json(hf_dir / name).get("weight_map") or {}
            state = {}
            for shard in sorted(set(map(str, weight_map.values()))):
                if Path(shard).name != shard or shard in (".", ".."):
                    raise DgptError(f"{hf_dir / name}: weight_map names {shard!r}, not a file of {hf_dir}")
                state.update(_load_tensors(hf_dir / shard))
            return state, hf_dir / name
    raise DgptError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")


def _normalise(raw: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop mask buffers and position ids, add the `transformer.` prefix, check the tied LM head."""
    state, head = {}, raw.get("lm_head.weight")
    for key, tensor in raw.items():
        if _BUFFER.match(key) or key.endswith("position_ids") or key == "lm_head.weight":
            continue
        state[key if key.startswith("transformer.") else f"transformer.{key}"] = tensor
    embedding = state.get("transformer.wte.weight", state.get("transformer.tokens_embed.weight"))
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise DgptError(f"{path}: lm_head.weight differs from the token embedding; dgpt ties them")
    return state


def _id_span(hf: Tokenizer) -> int:
    return max(hf.get_vocab(with_added_tokens=True).values()) + 1


def import_tokenizer(hf_dir: Path, rows: int) -> tuple[TextTokenizer, int]:
    """The HF directory's tokenizer.json, with those of dgpt's special tokens it lacks added as new special
    tokens (ids after its vocabulary) and `<|unused_N|>` fillers up to the embedding's rows.
    Returns the tokenizer and how many embedding rows the model must gain for the added tokens."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise DgptError(f"{path}: not found; write it with transformers: "
                        "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        hf = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse failure
        raise DgptError(f"{path}: not a valid tokenizer file: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if _id_span(hf) > rows:
        raise DgptError(f"{path}: token ids reach {_id_span(hf) - 1}, but the model's embedding has {rows} rows")
    hf.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS if hf.token_to_id(t) is None])
    fillers = rows - _id_span(hf)
    hf.add_special_tokens([AddedToken(f"<|unused_{i}|>", special=True) for i in range(max(fillers, 0))])
    if hf.get_vocab_size(with_added_tokens=True) != _id_span(hf):
        raise DgptError(f"{path}: token ids are not contiguous; dgpt needs ids 0..vocab_size-1")
    return TextTokenizer(hf, str(path)), max(-fillers, 0)


def import_hf(hf_dir: Path, out_run_dir: Path) -> Path:
    """A local HF `openai-gpt` or `gpt2` directory -> a new dgpt run directory (tokenizer, config and the
    checkpoint of step 0) that `api.load_pretrained` and `dgpt generate` accept."""
    hf_dir, out_run_dir = Path(hf_dir), Path(out_run_dir).resolve()
    hf = _read_json(hf_dir / "config.json")
    post = _model_type(hf, str(hf_dir / "config.json")) == "openai-gpt"
    raw, path = _read_weights(hf_dir)
    state = _normalise(raw, path)
    embedding_key = "transformer.tokens_embed.weight" if post else "transformer.wte.weight"
    if embedding_key not in state:
        raise DgptError(f"{path}: missing key {embedding_key}")
    rows = state[embedding_key].shape[0]
    config = gpt_config(hf, rows, str(hf_dir / "config.json"))
    weights = {k: v.float() for k, v in _remap(state, [(h, d, t) for d, h, t in key_map(config)], path).items()}
    with torch.device("meta"):
        reference = GPT(config).state_dict()
    for dgpt_key, hf_key, _ in key_map(config):
        if weights[dgpt_key].shape != reference[dgpt_key].shape:
            raise DgptError(f"{path}: {hf_key} has shape {list(weights[dgpt_key].shape)} (transposed for dgpt), "
                            f"but config.json implies {list(reference[dgpt_key].shape)}")
    tokenizer, grow = import_tokenizer(hf_dir, rows)
    if grow:  # rows for added special tokens start at the mean embedding: never a strict argmax
        wte = weights["transformer.wte.weight"]
        weights["transformer.wte.weight"] = torch.cat([wte, wte.mean(0, keepdim=True).expand(grow, -1)]).contiguous()
        config = GPTConfig(**{**config.to_dict(), "vocab_size": rows + grow})
    _check_target(out_run_dir)
    run_config = Config(
        run_dir=str(out_run_dir),
        model=ModelConfig(
            preset="gpt1", n_layer=config.n_layer, n_head=config.n_head, d_model=config.d_model, d_ff=config.d_ff,
            n_ctx=config.n_ctx, ln=config.ln, activation=config.activation, embd_dropout=config.embd_dropout,
            attn_dropout=config.attn_dropout, resid_dropout=config.resid_dropout,
        ),
        tokenizer=TokenizerConfig(vocab_size=config.vocab_size, path=str(RunDir(out_run_dir).tokenizer)),
    )
    state_info = {"imported_from": str(hf_dir.resolve()), "model_type": hf["model_type"], "added_rows": grow}
    with atomic_dir(out_run_dir) as tmp:
        tokenizer.save(RunDir(tmp).tokenizer)
        write_text(RunDir(tmp).config, dump_config(run_config))
        save_checkpoint(tmp, "step", 0, weights, config, state_info, keep=1)
    return out_run_dir
