"""How much memory a model needs, estimated before it is built, so that a shape or a batch that cannot fit is one
line naming the key instead of an allocator's failure (or swapping without a word).

The estimate, in bytes, for fp32 (bf16 autocast keeps fp32 weights and saves some activations in half):

    P             parameters: V·d + T·d + L·(4d² + 2d·f + 9d + f), + 2d for pre-LN's final LayerNorm
    weights       4P
    training      8P (weights and gradients) + 8P per AdamW state the process keeps (one per oracle it trains)
                  + 4·B·T·(L·(10d + 2f) + d) for one micro-batch of B sequences of T tokens: per layer what
                  backward keeps (LayerNorm inputs, q, k, v, attention and projection outputs, the feed-forward's
                  input and both sides of its activation), and the embeddings (the logits are made a chunk of rows
                  at a time, `dgpt.model.lm_loss`, so they are left out)
                  + 4P·B with DP-SGD: its per-example gradients, B at a time (`dgpt.train.privacy`)

(V vocabulary, T context, L layers, d width, f feed-forward width.) A configuration is refused when the estimate is
above the memory of the device it would run on: the machine's physical memory for the CPU, the GPU's for CUDA.
Kept free of torch, like `dgpt.model.config`: a config is checked when it is read.
"""

from __future__ import annotations

import os

from dgpt.errors import DgptError
from dgpt.model.config import GPTConfig

FLOAT = 4  # bytes of an fp32 value


def param_count_estimate(c: GPTConfig) -> int:
    """GPT(c).num_params() in closed form, without building it (the tied output projection counts once; checked
    against the module in the tests)."""
    per_layer = 4 * c.d_model**2 + 2 * c.d_model * c.d_ff + 9 * c.d_model + c.d_ff
    final_ln = 2 * c.d_model if c.ln == "pre" else 0
    return (c.vocab_size + c.n_ctx) * c.d_model + c.n_layer * per_layer + final_ln


def weight_bytes(c: GPTConfig) -> int:
    return FLOAT * param_count_estimate(c)


def activation_bytes(c: GPTConfig, batch: int, tokens: int) -> int:
    """What one training micro-batch of `batch` sequences of `tokens` keeps for backward."""
    return FLOAT * batch * tokens * (c.n_layer * (10 * c.d_model + 2 * c.d_ff) + c.d_model)


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_weights_fit(c: GPTConfig, where: str) -> None:
    """A model whose weights alone are more than this machine's memory cannot be used here at all."""
    limit = physical_memory()
    if limit is not None and weight_bytes(c) > limit:
        raise DgptError(f"{where}: {param_count_estimate(c):,} parameters need {gib(weight_bytes(c))} for the weights alone, "
                        f"more than the {gib(limit)} of physical memory on this machine")


def check_training_fits(c: GPTConfig, batch: int, tokens: int, optimizers: int, limit: int | None, device: str,
                        what: str, private: bool = False) -> None:
    """Refuse training whose estimate (module docstring) is above `limit` bytes of `device`; `what` names the
    batch's config key and value; `private`: DP-SGD's per-example gradients are counted too."""
    weights, states = 2 * weight_bytes(c), 2 * weight_bytes(c) * optimizers
    acts = activation_bytes(c, batch, tokens) + (batch * weight_bytes(c) if private else 0)
    needed = weights + states + acts
    if limit is not None and needed > limit:
        raise DgptError(f"{what} sequences of {tokens:,} tokens: training needs about {gib(needed)} (weights and "
                        f"gradients {gib(weights)}, optimizer state {gib(states)}, activations"
                        f"{' and per-example gradients' if private else ''} {gib(acts)}), more than the {gib(limit)} "
                        f"of {device}")
