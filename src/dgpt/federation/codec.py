"""What crosses the wire: a pseudo-gradient encoded as fp32, bf16, or int8 with fp32 scales.

The encoding happens where an update leaves a process and the decoding where it arrives, so the byte
counts are the `nbytes` of the tensors a transport actually moved. For a given parameter count every
payload of one kind has the same shapes (`Codec.empty`), which lets a collective receive it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgpt.errors import DgptError

KINDS = ("none", "bf16", "int8")  # "none": the fp32 values as they are


@dataclass
class Payload:
    """The tensors one oracle sends: `values` (float32, bfloat16 or int8) and, for int8, one fp32 scale per block."""

    values: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


class Codec:
    """fp32 / bf16 / int8 encoding of a flat vector of `segments` (the parameter tensors' sizes).

    int8 keeps one scale per parameter tensor (`block` 0) or per `block` values: q = round(x / s), s = max|x| / 127.
    """

    def __init__(self, kind: str, segments: list[int], block: int = 0):
        if kind not in KINDS:
            raise DgptError(f"unknown compression {kind!r}; expected one of {', '.join(KINDS)}")
        if block < 0:
            raise DgptError(f"int8 block size must be >= 0, got {block}")
        self.kind, self.segments, self.block = kind, list(segments), block
        self.numel = sum(self.segments)

    def encode(self, delta: torch.Tensor) -> Payload:
        delta = delta.detach().reshape(-1).float()
        if self.kind == "none":
            return Payload(delta.clone(), delta.new_empty(0))
        if self.kind == "bf16":
            return Payload(delta.to(torch.bfloat16), delta.new_empty(0))
        blocks = self._blocks(delta)
        scales = torch.cat([b.abs().amax(dim=1) for b in blocks]).clamp_min(1e-30) / 127.0
        per_block = torch.cat([torch.full((len(b),), b.shape[1], device=delta.device) for b in blocks])
        q = torch.cat([b.reshape(-1) for b in blocks]) / scales.repeat_interleave(per_block)
        return Payload(q.round_().clamp_(-127, 127).to(torch.int8)[: self.numel], scales)

    def decode(self, payload: Payload) -> torch.Tensor:
        """The fp32 vector a payload stands for (non-finite values stay non-finite: the receiver checks them)."""
        if self.kind != "int8":
            return payload.values.float()
        blocks = self._blocks(payload.values.float())
        scaled = [b * s.unsqueeze(1) for b, s in zip(blocks, payload.scales.split([len(b) for b in blocks]))]
        return torch.cat([b.reshape(-1) for b in scaled])[: self.numel]

    def empty(self, device: torch.device | str = "cpu") -> Payload:
        """A payload of the right shapes and dtypes to receive into."""
        dtype = {"none": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[self.kind]
        values = torch.zeros(self.numel, dtype=dtype, device=device)
        return Payload(values, torch.zeros(self._num_scales(), device=device))

    def _num_scales(self) -> int:
        if self.kind != "int8":
            return 0
        return -(-self.numel // self.block) if self.block else len(self.segments)

    def _blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The vector as 2-D views that share a scale per row: one matrix of `block` columns (zero-padded), or one
        row per parameter tensor."""
        if self.block:
            return [F.pad(flat, (0, (-self.numel) % self.block)).view(-1, self.block)]
        return [piece.view(1, -1) for piece in flat.split(self.segments)]
