"""The decoder's shape: GPTConfig, the presets, and a config's [model] section resolved against the vocabulary.

Kept apart from the modules (and from torch), so that loading and checking a config costs no torch import:
`dgpt prepare` and `dgpt count-pretokens` never load it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 40478
    n_ctx: int = 512
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    ln: str = "post"
    activation: str = "gelu_tanh"
    embd_dropout: float = 0.1
    attn_dropout: float = 0.1
    resid_dropout: float = 0.1
    ln_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.ln not in ("post", "pre"):
            raise ValueError(f"ln must be 'post' or 'pre', got {self.ln!r}")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ValueError(f"activation must be 'gelu_tanh' or 'gelu', got {self.activation!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# Presets: `gpt1` is the paper's model (~117M parameters with its 40,478-token BPE); `tiny` and `small`
# train on a laptop CPU. The vocabulary size always comes from the tokenizer in use.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, d_model=128, d_ff=512, n_ctx=128),
    "small": dict(n_layer=6, n_head=6, d_model=384, d_ff=1536, n_ctx=256),
    "gpt1": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, n_ctx=512),
}


def resolve_config(model_cfg, vocab_size: int) -> GPTConfig:
    """A `dgpt.config.ModelConfig` (preset + overrides) and the tokenizer's vocabulary -> GPTConfig."""
    if model_cfg.preset not in PRESETS:
        raise ValueError(f"unknown model preset {model_cfg.preset!r}; expected one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[model_cfg.preset], vocab_size=vocab_size)
    for key, value in vars(model_cfg).items():
        if key != "preset" and value is not None:
            fields[key] = value
    return GPTConfig(**fields)
