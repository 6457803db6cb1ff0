"""The GPT-1 decoder, readable top to bottom.

    h_0 = U W_e + W_p                      token embedding + learned position embedding
    h_l = block(h_{l-1}),  l = 1..n        masked multi-head self-attention + feed-forward
    P(u) = softmax(h_n W_e^T)              output projection tied to the token embedding

`Decoder` is the shared body and returns hidden states; `GPT` adds the tied LM head. Fine-tuning heads
(`dgpt.model.heads`) sit on the same body. LayerNorm placement is `post` (GPT-1 exactly: LN after each
residual add, no final LN) or `pre` (GPT-2 style: LN before each sublayer and a final LN).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dgpt.model.config import GPTConfig
from dgpt.model.lm_loss import lm_head_loss


class KVCache:
    """Keys and values of every layer for the positions seen so far (generation)."""

    def __init__(self, config: GPTConfig, batch: int, device, dtype):
        shape = (batch, config.n_head, config.n_ctx, config.d_model // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from uniform draws: torch's CPU bernoulli_ draws element by element
    (its vectorised path is Intel MKL's, Intel CPUs only), `rand_like >= p` is ~2x faster; same distribution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * torch.rand_like(x).ge_(self.p).div_(1 - self.p)  # kept: 1 / (1 - p), dropped: 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.attn_dropout = config.attn_dropout
        self.attn_drop = Dropout(config.attn_dropout)
        self.resid_drop = Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.training and self.attn_dropout > 0 and x.device.type == "cpu":
            # the CPU's fused SDPA kernel has no dropout: its math fallback is slower than this
            causal = torch.full((T, T), float("-inf"), device=x.device).triu_(1)  # added to the scores
            att = torch.baddbmm(causal, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), alpha=q.size(-1) ** -0.5)
            att = self.attn_drop(att.softmax(-1))
            y = (att @ v.flatten(0, 1)).view(B, self.n_head, T, -1)
            return self._merge(y)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        if past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new query sees every cached position
        else:  # several new queries after a prefix: query i sees keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self._merge(y)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, heads, T, head dim] -> the output projection of the heads side by side."""
        B, _, T, _ = y.shape
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, -1)))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.d_model)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.drop = Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.pre_ln = config.ln == "pre"
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.ln_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.ln_eps)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln_1(x), cache, layer)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, cache, layer))  # GPT-1: normalise after the residual add
        return self.ln_2(x + self.mlp(x))


class Decoder(nn.Module):
    """The transformer body: token ids -> final hidden states h_n."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.n_ctx, config.d_model)
        self.drop = Dropout(config.embd_dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.ln_eps) if config.ln == "pre" else None

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_ctx:
            raise ValueError(f"sequence of {start + T} tokens exceeds n_ctx {self.config.n_ctx}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        return self.ln_f(x) if self.ln_f is not None else x


class GPT(nn.Module):
    """Decoder + language-model head whose weight is the token embedding (tied)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # P(u) = softmax(h_n W_e^T)
        self.apply(init_weights)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits over the vocabulary for every position; given `targets`, the mean L1 loss instead
        (`lm_head_loss`: the logits are made a chunk at a time and never all at once)."""
        hidden = self.transformer(idx, cache)
        if targets is not None:
            return lm_head_loss(hidden, self.lm_head.weight, targets)
        return self.lm_head(hidden)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied weight counts once


def init_weights(module: nn.Module) -> None:
    """GPT-1 initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm gains."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 N plus attention's 12 L T d (PaLM appendix B)."""
    n = config.n_layer * (4 * config.d_model**2 + 2 * config.d_model * config.d_ff) + config.vocab_size * config.d_model
    return 6 * n + 12 * config.n_layer * config.n_ctx * config.d_model


def tied_weight_names() -> tuple[str, ...]:
    """State-dict keys that alias another tensor and are not stored in weight files."""
    return ("lm_head.weight",)
