"""Training objectives as functions of model outputs (DESIGN.md: L1, L2, L3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgpt.model.lm_loss import IGNORE_INDEX


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L1 as a mean: -1/N sum_i log P(u_i | u_<i), over every target that is not IGNORE_INDEX."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def lm_targets(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Next-token targets of right-padded sequences [N, T] -> [N, T - 1]; padding is IGNORE_INDEX."""
    positions = torch.arange(1, ids.size(1), device=ids.device)
    # torch.where, not a masked assignment: DP-SGD's per-example gradients take this under vmap
    return torch.where(positions.unsqueeze(0) >= lengths.unsqueeze(1), IGNORE_INDEX, ids[:, 1:])


def task_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L2 as a mean: -1/|C| sum log P(y | x) (cross-entropy); squared error for a float (regression) label."""
    if labels.is_floating_point():
        return F.mse_loss(outputs.float(), labels)
    return F.cross_entropy(outputs.float(), labels)


def finetune_loss(
    outputs: torch.Tensor, labels: torch.Tensor, lm_logits: torch.Tensor | None, ids: torch.Tensor, lengths: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(L3, L2, L1) with L3 = L2 + lam * L1; L1 is on the same input tokens [N, T] (None when lam = 0)."""
    l2 = task_loss(outputs, labels)
    if lam == 0 or lm_logits is None:
        return l2, l2, None
    l1 = lm_loss(lm_logits[:, :-1], lm_targets(ids, lengths))
    return l2 + lam * l1, l2, l1
