"""Validation loss and perplexity per oracle on fixed windows of its validation shards."""

from __future__ import annotations

import math

import numpy as np
import torch

from dgpt.data.loader import batches, eval_windows
from dgpt.objectives import lm_loss
from dgpt.train.local import autocast


class Validator:
    """Holds each oracle's fixed validation windows; `__call__` gives {oracle: mean token loss}."""

    def __init__(self, valid: dict[str, list[np.ndarray]], n_ctx: int, max_windows: int, batch_size: int):
        self.windows = {name: eval_windows(arrays, n_ctx, max_windows) for name, arrays in valid.items()}
        self.windows = {name: w for name, w in self.windows.items() if len(w)}
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device, dtype: str = "float32") -> dict[str, float]:
        was_training = model.training
        model.eval()
        losses = {}
        for name, windows in self.windows.items():
            total = 0.0
            for x, y in batches(windows, self.batch_size):
                with autocast(device, dtype):
                    total += lm_loss(model(x.to(device)), y.to(device)).item() * len(x)
            losses[name] = total / len(windows)
        model.train(was_training)
        return losses


def weighted_loss(losses: dict[str, float], weights: dict[str, float]) -> float:
    """The global validation loss: oracles' losses weighted by their training tokens (every runtime).

    Oracles without a loss (NaN: no validation data) are left out; NaN when no oracle has one.
    """
    names = [n for n in losses if losses[n] == losses[n]]
    total = sum(weights[n] for n in names)
    return sum(losses[n] * weights[n] for n in names) / total if total else float("nan")


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
