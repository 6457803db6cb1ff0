"""Re-scoring a saved run with its newest checkpoint, reading only (`dgpt eval`).

Pre-training: each oracle's loss and perplexity on fixed windows of its validation shards (`pretrain.eval_windows`
of them, evenly spread, or every one), the global loss (oracles weighted by their training tokens, as in training)
and how much of each validation set the windows cover. Fine-tuning: each oracle's own head on its labeled
validation set (accuracy; F1 for two labels, macro-F1 for more; Pearson and Spearman for regression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dgpt.config import Config
from dgpt.data.loader import eval_spans
from dgpt.data.tasks import load_split
from dgpt.model.heads import TaskModel
from dgpt.errors import DgptError
from dgpt.rundir import RunDir, checkpoint_number
from dgpt.runtimes.finetune import load_head
from dgpt.runtimes.setup import load_newest, read_run
from dgpt.runtimes.summary import score_lines, with_perplexity
from dgpt.train.evaluate import Validator, perplexity, weighted_loss
from dgpt.train.local import pick_device
from dgpt.train.task_eval import evaluate_task


def finetuning_run(config: Config) -> bool:
    """Whether the config is a fine-tuning run's: its oracles have labeled tasks (`dgpt finetune` needs one for every
    oracle; a flower SuperNode's config holds only its own oracle's)."""
    return any(o.task is not None for o in config.oracles)


def no_data_here(run_dir) -> DgptError:
    """The error for a run directory that holds no oracle's data: a flower run's server's."""
    return DgptError(f"{run_dir} holds no oracle's data (the server of a flower run holds none): `dgpt flower-app CONFIG "
                     "--eval` and `flwr run` it to have every SuperNode validate the model on its own data and keep it in "
                     "its run directory, where `dgpt eval ITS_RUN_DIR` runs")


@dataclass
class Evaluation:
    checkpoint: Path
    scores: dict[str, dict[str, float]]  # per oracle: "loss" first ({} without validation data)
    covered: dict[str, str]  # per oracle: how much of its validation set was scored, in words
    loss: float | None = None  # pre-training: the global loss

    def lines(self) -> list[str]:
        lines = [f"checkpoint  {self.checkpoint}"]
        if self.loss is not None:
            lines.append(f"global      loss {self.loss:.4f}  perplexity {perplexity(self.loss):.2f}  "
                         "(oracles weighted by their training tokens)")
        return lines + score_lines(self.scores, self.covered)


def evaluate_run(config: Config, max_windows: int | None = None) -> Evaluation:
    """The run's newest checkpoint on every oracle's validation data; `max_windows` (pre-training) None: all windows."""
    if finetuning_run(config):
        return _evaluate_finetuning(config)
    return _evaluate_pretraining(config, max_windows)


def _evaluate_pretraining(config: Config, max_windows: int | None) -> Evaluation:
    """Every oracle whose shards this run directory holds (a flower SuperNode's: its own oracle's)."""
    run = RunDir(config.run_dir)
    here = [n for n in config.oracle_names() if run.manifest(n).is_file()]
    if not here and config.oracles:
        raise no_data_here(run.root)
    setup = read_run(config, here)
    _, model, weights = load_newest(setup.run_dir)
    n_ctx = model.config.n_ctx
    validator = Validator(setup.valid, n_ctx, max_windows or math.inf, config.pretrain.batch_size)
    losses = validator(model.to(setup.device).eval(), setup.device, config.pretrain.dtype)
    covered = {}
    for name, arrays in setup.valid.items():
        scored, every = len(validator.windows.get(name, ())), len(eval_spans(arrays, n_ctx))
        tokens = sum(len(a) for a in arrays)
        covered[name] = f"{scored:,} of {every:,} windows ({scored * n_ctx:,} of {tokens:,} validation tokens)"
    train_tokens = {name: sum(len(a) for a in arrays) for name, arrays in setup.train.items()}
    scores = {name: with_perplexity({"loss": losses[name]}) if name in losses else {} for name in setup.valid}
    return Evaluation(weights.parent, scores, covered, weighted_loss(losses, train_tokens))


def _evaluate_finetuning(config: Config) -> Evaluation:
    run_dir, ft = Path(config.run_dir), config.finetune
    tokenizer, body, weights = load_newest(run_dir)
    device = pick_device(config.pretrain.device)
    body.to(device)
    scores, covered = {}, {}
    if not any(RunDir(run_dir).oracle_states(o.name) for o in config.oracles if o.task is not None):
        raise no_data_here(run_dir)
    for oracle in (o for o in config.oracles if o.task is not None):
        head, spec = load_head(run_dir, oracle.name, checkpoint_number(weights.parent), body.config)
        scores[oracle.name], covered[oracle.name] = {}, "no validation set (task.valid)"
        if oracle.task.valid:
            examples = load_split(oracle.task.valid, spec, tokenizer, oracle.name)
            model = TaskModel(body, head.to(device))
            scores[oracle.name] = evaluate_task(model, examples, spec, ft.eval_batch_size, device, config.pretrain.dtype)
            covered[oracle.name] = f"{len(examples):,} {spec.type} validation examples"
    return Evaluation(weights.parent, scores, covered)
