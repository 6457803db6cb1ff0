"""What `dgpt info` says about a run, reading only: its kind, the model of its newest checkpoint, its oracles
(pre-training: their prepared tokens; fine-tuning: their task and head) and its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dgpt.config import Config
from dgpt.data.shards import read_manifest
from dgpt.data.tasks import TaskSpec
from dgpt.data.tokenizer import TextTokenizer
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT
from dgpt.rundir import WEIGHTS, RunDir, checkpoint_number
from dgpt.runtimes.evaluation import finetuning_run
from dgpt.runtimes.federated import load_oracle_state
from dgpt.runtimes.setup import model_config_for
from dgpt.train.checkpoint import read_model_config


def info_lines(config: Config) -> list[str]:
    run = RunDir(config.run_dir)
    finetuning = finetuning_run(config)
    checkpoint = run.latest_checkpoint()
    model_config, source = _model(config, run, checkpoint, finetuning)
    with torch.device("meta"):
        params = GPT(model_config).num_params()
    lines = [
        f"run_dir     {run.root}",
        f"kind        {'fine-tuning (DSFT, one head per oracle)' if finetuning else 'pre-training'}",
        f"model       {params:,} parameters (from {source})  " + json.dumps(model_config.to_dict()),
        f"runtime     {config.federation.runtime}",
    ]
    for oracle in config.oracles:
        state = _task_state(run, oracle.name, checkpoint) if finetuning else _prepared(run, oracle.name)
        lines.append(f"oracle      {oracle.name}: {state}")
    return lines + [f"checkpoint  {c}" for c in run.list_checkpoints()]


def _model(config: Config, run: RunDir, checkpoint: Path | None, finetuning: bool) -> tuple[GPTConfig, str]:
    """The model as the newest checkpoint's metadata records it (fine-tuning, not yet checkpointed: the one it starts
    from); without a checkpoint, as the config would build it."""
    if checkpoint is None and finetuning and config.finetune.init_from:
        checkpoint = RunDir(config.finetune.init_from).latest_checkpoint()
    if checkpoint is not None:
        return read_model_config(checkpoint / WEIGHTS), str(checkpoint)
    vocab = TextTokenizer.load(run.tokenizer).vocab_size if run.tokenizer.is_file() else config.tokenizer.vocab_size
    return model_config_for(config, vocab), f"the config, preset {config.model.preset}: no checkpoint yet"


def _prepared(run: RunDir, name: str) -> str:
    if not run.manifest(name).is_file():
        return "not prepared"
    splits = read_manifest(run.oracle_data(name))["splits"]
    return ", ".join(f"{split} {splits[split]['tokens']:,} tokens" for split in splits)


def _task_state(run: RunDir, name: str, checkpoint: Path | None) -> str:
    """The oracle's task and what its head has trained, from its own state file at the newest checkpoint."""
    path = run.oracle_state(name, checkpoint_number(checkpoint)) if checkpoint is not None else None
    if path is None or not path.is_file():
        return "no trained head yet"
    state = load_oracle_state(path, mmap=True)  # mapped, not read: only the task and counters are needed
    if "task" not in state:
        return f"no task head in {path}"
    spec = TaskSpec(**state["task"])
    if spec.regression or spec.type == "multiple_choice":
        outputs = "regression" if spec.regression else f"{spec.num_choices} choices"
    else:
        outputs = f"{len(spec.labels)} labels: " + ", ".join(map(str, spec.labels[:8])) + (", ..." if len(spec.labels) > 8 else "")
    return f"{spec.type} ({outputs}); head at {checkpoint.name}: {state['step']:,} steps, {state['tokens']:,} tokens trained"
