"""Training objectives as functions of model outputs (DESIGN.md: L1, L2, L3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value (padding) contribute nothing


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L1 as a mean: -1/N sum_i log P(u_i | u_<i), over every target that is not IGNORE_INDEX."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
