"""Autoregressive sampling: greedy, temperature, top-k, top-p, with or without a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgpt.model.gpt import GPT, KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every logit outside the top-k / nucleus (top-p) set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eot_id: int | None = None,
    min_new_tokens: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend `prompt` [B, T] by up to `max_new_tokens`; temperature 0 is greedy.

    Stops early once every row has produced `eot_id`; rows that finished keep emitting `eot_id`. `eot_id` is
    never drawn as one of the first `min_new_tokens` new tokens (its logit is masked out), so short
    continuations do not end before they begin.
    Past n_ctx the context slides: the last n_ctx tokens are re-encoded (learned positions leave
    no cheaper exact choice), so cached and uncached generation give the same tokens.
    """
    was_training = model.training
    model.eval()
    with torch.inference_mode():  # no autograd bookkeeping: per-token overhead matters at batch 1
        out = _extend(model, prompt, max_new_tokens, temperature, top_k, top_p, eot_id, min_new_tokens, use_cache, generator)
    model.train(was_training)
    return out.clone()  # a normal tensor again, usable where autograd is on


def _extend(model, prompt, max_new_tokens, temperature, top_k, top_p, eot_id, min_new_tokens, use_cache, generator):
    n_ctx = model.config.n_ctx
    B, T = prompt.shape
    out = torch.empty(B, T + max_new_tokens, dtype=prompt.dtype, device=prompt.device)  # written in place
    out[:, :T] = prompt
    idx = out[:, :T]
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    cache, fed = None, 0  # `fed`: tokens of idx already in the cache
    for i in range(max_new_tokens):
        if not use_cache:
            hidden = model.transformer(idx[:, -n_ctx:])
        elif cache is not None and idx.size(1) <= n_ctx:
            hidden = model.transformer(idx[:, fed:], cache)
        else:  # first step, or the window slid: start a fresh cache on the last n_ctx tokens
            dtype = next(model.parameters()).dtype
            cache = KVCache(model.config, idx.size(0), idx.device, dtype)
            hidden = model.transformer(idx[:, -n_ctx:], cache)
        fed = idx.size(1)
        logits = model.lm_head(hidden[:, -1, :])  # only the last position is sampled from
        if eot_id is not None and i < min_new_tokens:
            logits[:, eot_id] = float("-inf")
        token = next_token(logits.float(), temperature, top_k, top_p, generator)
        if eot_id is not None:
            token = torch.where(done[:, None], torch.full_like(token, eot_id), token)
            done |= token[:, 0] == eot_id
        out[:, T + i] = token[:, 0]
        idx = out[:, : T + i + 1]
        if eot_id is not None and bool(done.all()):
            break
    return idx
