"""What `dgpt info` says about a run, reading only: its kind, the model of its newest checkpoint, its oracles
(pre-training: their prepared tokens; fine-tuning: their task and head), the privacy each oracle has spent under
DP-SGD, and its checkpoints."""

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
from dgpt.train.checkpoint import load_state, read_model_config
from dgpt.train.privacy import epsilon_spent


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
    states = {o.name: _task_state(run, o.name, checkpoint) if finetuning else _prepared(run, o.name) for o in config.oracles}
    if config.federation.runtime == "flower" and not finetuning and all(s == "not prepared" for s in states.values()):
        states = {name: "its data is on its SuperNode (`dgpt flower-app CONFIG --eval` validates there)" for name in states}
    lines += [f"oracle      {name}: {state}" for name, state in states.items()]
    lines += [f"privacy     {name}: {spent}" for name, spent in _privacy(config, run, checkpoint).items()]
    return lines + [f"checkpoint  {c}" for c in run.list_checkpoints()]


def _privacy(config: Config, run: RunDir, checkpoint: Path | None) -> dict[str, str]:
    """DP-SGD: each oracle's (epsilon, delta) at the newest checkpoint, from its accountant's state (its own state
    file; the pooled trainer's in a central checkpoint; a flower server holds only what the oracles reported)."""
    if checkpoint is None:
        return {}
    state, delta = load_state(checkpoint), config.privacy.delta
    if "epsilon" in state:  # a flower server's checkpoint
        return {n: f"epsilon {e:.3f} at delta {delta:g} (as the oracle reported it)" for n, e in state["epsilon"].items()}
    accountants = {"pooled": state["loop"].get("privacy")} if "loop" in state else {}
    for name in config.oracle_names():
        path = run.oracle_state(name, checkpoint_number(checkpoint))
        if "loop" not in state and path.is_file():
            accountants[name] = load_oracle_state(path, mmap=True).get("privacy")
    return {n: _spent(a) for n, a in accountants.items() if a is not None}


def _spent(accountant: dict) -> str:
    if not accountant["history"]:
        return "no DP-SGD step yet"
    steps = sum(int(s) for _, _, s in accountant["history"])
    sigma, q, _ = accountant["history"][-1]
    return (f"epsilon {epsilon_spent(accountant['history'], accountant['delta']):.3f} at delta {accountant['delta']:g} "
            f"after {steps:,} DP-SGD steps (noise multiplier {sigma:.3f}, sample rate {q:.4g})")


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
