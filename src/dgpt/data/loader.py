"""Batches of token windows from memory-mapped shards, reproducible from a saved generator state."""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch

from dgpt.errors import DgptError


class WindowSampler:
    """Random windows of n_ctx + 1 tokens, uniform over every token of the given arrays.

    The only state is one torch.Generator, so saving `state_dict()` and loading it later continues
    the exact same sequence of batches (exact resume).
    """

    def __init__(self, arrays: list[np.ndarray], n_ctx: int, seed: int, name: str = "data"):
        self.arrays = [a for a in arrays if len(a) > n_ctx + 1]
        if not self.arrays:
            raise DgptError(f"{name}: fewer than n_ctx + 2 = {n_ctx + 2} tokens in every shard; nothing to train on")
        self.n_ctx = n_ctx
        self.starts = torch.tensor([len(a) - n_ctx - 1 for a in self.arrays], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        which = torch.multinomial(self.starts, batch_size, replacement=True, generator=self.generator)
        offsets = (torch.rand(batch_size, generator=self.generator, dtype=torch.float64) * self.starts[which]).long()
        rows = [self.arrays[a][o : o + self.n_ctx + 1] for a, o in zip(which.tolist(), offsets.tolist())]
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    @property
    def num_examples(self) -> int:
        """Fixed windows of n_ctx + 1 tokens at stride n_ctx: the examples of a differentially private loop."""
        return int(self._window_ends[-1])

    @functools.cached_property
    def _window_ends(self) -> torch.Tensor:
        return torch.cumsum((self.starts.long() + self.n_ctx - 1) // self.n_ctx, 0)

    def poisson(self, rate: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each fixed window independently with probability `rate` (Poisson sampling, what DP-SGD's accounting
        assumes); None when none was drawn."""
        picked = (torch.rand(self.num_examples, generator=self.generator, dtype=torch.float64) < rate).nonzero()[:, 0]
        which = torch.searchsorted(self._window_ends, picked, right=True)
        offsets = (picked - torch.cat([self._window_ends.new_zeros(1), self._window_ends])[which]) * self.n_ctx
        if not len(picked):
            return None
        rows = [self.arrays[a][o : o + self.n_ctx + 1] for a, o in zip(which.tolist(), offsets.tolist())]
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_spans(arrays: list[np.ndarray], n_ctx: int) -> list[tuple[int, int]]:
    """(array, start) of every validation window: n_ctx + 1 tokens, each predicting n_ctx tokens none other does."""
    return [(i, s) for i, a in enumerate(arrays) for s in range(0, len(a) - n_ctx - 1, n_ctx)]


def eval_windows(arrays: list[np.ndarray], n_ctx: int, max_windows: int) -> torch.Tensor:
    """Fixed, non-overlapping windows of n_ctx + 1 tokens, evenly spread when there are too many."""
    spans = eval_spans(arrays, n_ctx)
    if not spans:
        return torch.empty(0, n_ctx + 1, dtype=torch.long)
    if len(spans) > max_windows:
        spans = [spans[j] for j in np.linspace(0, len(spans) - 1, max_windows).round().astype(int)]
    return torch.from_numpy(np.stack([arrays[i][s : s + n_ctx + 1].astype(np.int64) for i, s in spans]))


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        yield w[:, :-1], w[:, 1:]
