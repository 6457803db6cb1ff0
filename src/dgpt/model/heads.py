"""Fine-tuning heads on the shared body: P(y | x_1..x_m) = softmax(h_l^m W_y), h_l^m the final block's
activation at the extract token (DESIGN.md, DSFT).

    classification / entailment: one sequence; logits = W_y h^m
    similarity: both orders; logits = W_y (h^m_ab + h^m_ba)   (one output: a regression score)
    multiple_choice: one sequence per choice; score_k = w h^m_k; softmax over k

The head W_y belongs to its oracle: it is a separate module, never part of the body's parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dgpt.model.gpt import GPT, init_weights


def extract_states(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[N, T, d] hidden states and [N] sequence lengths -> [N, d] activations at each extract token."""
    return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]


class TaskHead(nn.Module):
    def __init__(self, d_model: int, task_type: str, num_outputs: int, dropout: float, regression: bool = False):
        super().__init__()
        self.task_type, self.regression = task_type, regression
        self.drop = nn.Dropout(dropout)
        # a bias shared by every choice cancels in the softmax over choices (Adam would only amplify its noise)
        self.linear = nn.Linear(d_model, num_outputs, bias=task_type != "multiple_choice")
        self.apply(init_weights)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[B, S, d] extract activations (S sequences per example) -> [B, outputs], [B] scores or [B, choices]."""
        if self.task_type == "similarity":
            states = states.sum(dim=1, keepdim=True)  # the two orders' activations added before the head
        out = self.linear(self.drop(states))
        if self.task_type == "multiple_choice":
            return out.squeeze(-1)
        out = out[:, 0]
        return out.squeeze(-1) if self.regression else out


class TaskModel(nn.Module):
    """A GPT body (decoder + tied LM head, for the auxiliary L1) with one oracle's task head."""

    def __init__(self, gpt: GPT, head: TaskHead):
        super().__init__()
        self.gpt, self.head = gpt, head

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, with_lm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [B, S, T], lengths [B, S] -> (head outputs, LM logits [B*S, T, vocab] or None)."""
        B, S, T = ids.shape
        hidden = self.gpt.transformer(ids.reshape(B * S, T))
        states = extract_states(hidden, lengths.reshape(-1)).view(B, S, -1)
        return self.head(states), (self.gpt.lm_head(hidden) if with_lm else None)
