"""Validation loss and perplexity per oracle on fixed windows of its validation shards."""

from __future__ import annotations

import math

import numpy as np
import torch

from dgpt.data.loader import batches, eval_windows
from dgpt.train.local import autocast


class Validator:
    """Holds each oracle's fixed validation windows; `__call__` gives {oracle: mean token loss}."""

    def __init__(self, valid: dict[str, list[np.ndarray]], n_ctx: int, max_windows: int, batch_size: int):
        self.windows = {name: eval_windows(arrays, n_ctx, max_windows) for name, arrays in valid.items()}
        self.windows = {name: w for name, w in self.windows.items() if len(w)}
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device, dtype: str = "float32") -> dict[str, float]:
        return {name: sum(loss.item() for loss in self._losses(model, windows, device, dtype))
                for name, windows in self.windows.items()}

    def gradients(self, model: torch.nn.Module, params: list[torch.Tensor], device: torch.device,
                  dtype: str = "float32") -> dict[str, torch.Tensor]:
        """{oracle: the gradient of its validation loss with respect to `params`, flattened}: one backward pass
        per batch of windows (the contribution ledger's first-order estimate)."""
        grads = {}
        for name, windows in self.windows.items():
            total = [torch.zeros_like(p) for p in params]
            with torch.enable_grad():
                for loss in self._losses(model, windows, device, dtype):
                    for t, g in zip(total, torch.autograd.grad(loss, params)):
                        t += g
            grads[name] = torch.cat([t.flatten() for t in total])
        return grads

    def _losses(self, model: torch.nn.Module, windows, device: torch.device, dtype: str):
        """Each batch's share of the mean token loss over `windows`, in eval mode (no dropout)."""
        was_training = model.training
        model.eval()
        try:
            for x, y in batches(windows, self.batch_size):
                with autocast(device, dtype):
                    yield model(x.to(device), y.to(device)) * (len(x) / len(windows))  # GPT: inputs, targets -> L1
        finally:
            model.train(was_training)


def weighted_loss(losses: dict[str, float], weights: dict[str, float]) -> float:
    """The global validation loss: oracles' losses weighted by their training tokens (every runtime).

    Oracles without a loss (NaN: no validation data) are left out; NaN when no oracle has one.
    """
    names = [n for n in losses if losses[n] == losses[n]]
    total = sum(weights[n] for n in names)
    return sum(losses[n] * weights[n] for n in names) / total if total else float("nan")


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
