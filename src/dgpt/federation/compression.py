"""What an oracle sends: its pseudo-gradient as fp32, bf16, or int8 with per-tensor or per-block scales."""

from __future__ import annotations

import torch

from dgpt.errors import DgptError


def _int8_roundtrip(delta: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    n = delta.numel()
    size = block if block > 0 else n
    pad = (-n) % size
    blocks = torch.nn.functional.pad(delta, (0, pad)).view(-1, size)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0
    q = torch.round(blocks / scale).clamp_(-127, 127).to(torch.int8)  # what travels: q and fp32 scales
    restored = (q.float() * scale).view(-1)[:n]
    return restored, n + 4 * scale.numel()


def transmit(delta: torch.Tensor, kind: str, block: int = 0, segments: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Return (the delta as the receiver decodes it, bytes on the wire).

    `segments` are the sizes of the parameter tensors inside the flat vector: int8 with block 0 keeps one
    scale per parameter tensor.
    """
    if kind == "none":
        return delta, delta.numel() * 4
    if kind == "bf16":
        return delta.to(torch.bfloat16).float(), delta.numel() * 2
    if kind == "int8":
        if block > 0 or not segments:
            return _int8_roundtrip(delta, block)
        parts = [_int8_roundtrip(piece, 0) for piece in torch.split(delta, segments)]
        return torch.cat([p for p, _ in parts]), sum(b for _, b in parts)
    raise DgptError(f"unknown compression {kind!r}; expected none, bf16 or int8")
