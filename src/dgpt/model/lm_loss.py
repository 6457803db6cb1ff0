"""L1 straight from the final hidden states: the tied LM head and the cross-entropy, a chunk of rows at a time.

    loss = -1/N sum_i log softmax(h_i W_e^T)[u_i]      over every target that is not IGNORE_INDEX

The plain way makes all N x V logits, then a log-softmax of the same size, then both again in the backward
pass (64 MB each at batch 8, n_ctx 256, V 8192). Here each chunk's logits are made, turned into its loss and
its gradient (softmax - one-hot) while they are still in cache, and dropped; the gradients of h and W are
finished in the forward pass, so the backward pass only scales them. Same loss and gradients as
`F.cross_entropy(h @ W.T, u)` to float rounding (tested); under autocast the matmuls run in the autocast
dtype and the softmax in fp32, as autocast would run the plain way.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets with this value (padding) contribute nothing
CHUNK = 256  # rows per chunk: 256 x 8192 fp32 logits = 8 MB, inside a CPU's L3


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Mean token loss of hidden states [..., d] under the head `weight` [V, d] against `targets` [...]."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLoss.apply(hidden, weight, targets, chunk)
    return _chunks(hidden, weight, targets, chunk, with_grads=False)[0]


def _chunks(hidden, weight, targets, chunk: int, with_grads: bool):
    """(loss, grad of hidden, grad of weight): grads only `with_grads`."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
    keep = targets != IGNORE_INDEX
    count = keep.sum().to(acc)
    h, w = hidden.to(dtype), weight.to(dtype)
    loss = torch.zeros((), device=hidden.device, dtype=acc)
    grad_h = torch.empty_like(hidden) if with_grads else None
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if with_grads else None
    with torch.autocast(device, enabled=False):
        for start in range(0, h.size(0), chunk):
            rows = slice(start, start + chunk)
            logits = (h[rows] @ w.t()).to(acc)
            target, kept = targets[rows].clamp(min=0).unsqueeze(1), keep[rows].unsqueeze(1)
            logp = torch.log_softmax(logits, dim=1)
            loss -= (logp.gather(1, target) * kept).sum()
            if with_grads:  # d loss / d logits = (softmax - one-hot) / count, zero on ignored rows
                probs = logp.exp_().scatter_add_(1, target, torch.full_like(logp[:, :1], -1.0))
                probs = probs.mul_(kept / count).to(dtype)
                grad_h[rows] = probs @ w
                grad_w += (probs.t() @ h[rows]).to(acc)
    return loss / count, grad_h, grad_w


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        loss, grad_h, grad_w = _chunks(hidden, weight, targets, chunk, with_grads=True)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None
