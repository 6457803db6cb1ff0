"""One oracle's fine-tuning loop: the shared `InnerLoop` with the L3 objective and the oracle's own head.

With an examples budget (`finetune.epochs`) the last batch is only what is left of it, so the run trains
exactly that many examples. The head's weights and its task spec are part of the loop's state, so they are saved in the oracle's
own state file (`run_dir/oracles/<name>/round_N.pt`) and never in what the oracle sends.
"""

from __future__ import annotations

import torch

from dgpt.data.tasks import ExampleSampler, TaskSpec
from dgpt.model.heads import TaskModel
from dgpt.objectives import finetune_loss
from dgpt.train.local import InnerLoop, LoopSettings


class TaskLoop(InnerLoop):
    def __init__(
        self, model: TaskModel, spec: TaskSpec, cfg: LoopSettings, sampler: ExampleSampler, total_steps: int,
        device: torch.device, seed: int, lambda_lm: float, examples: int | None = None,
    ):
        super().__init__(model, cfg, sampler, total_steps, device, seed, objective=self.loss)
        self.spec, self.lambda_lm = spec, lambda_lm
        self.examples = examples  # in the whole run (None: every batch full); the last batch takes what is left

    def batch_size_at(self, step: int) -> int:
        size = self.cfg.batch_size
        return size if self.examples is None else min(size, self.examples - step * size)

    def loss(self, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """L3 = L2 + lambda * L1 on one batch, and the number of (non-pad) input tokens."""
        return self.example_loss(ids, lengths, labels), self.batch_tokens(ids, lengths, labels)

    def example_loss(self, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        outputs, lm_logits = self.model(ids, lengths, with_lm=self.lambda_lm > 0)
        return finetune_loss(outputs, labels, lm_logits, ids.flatten(0, 1), lengths.flatten(), self.lambda_lm)[0]

    def batch_tokens(self, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> int:
        return int(lengths.sum())

    def state_dict(self) -> dict:
        head = {k: v.detach().cpu().clone() for k, v in self.model.head.state_dict().items()}
        return {**super().state_dict(), "head": head, "task": self.spec.to_dict()}

    def load_state_dict(self, state: dict, position: int | None = None) -> None:
        super().load_state_dict(state, position)
        self.model.head.load_state_dict(state["head"])
