"""What every runtime does first: resolve the run directory, tokenizer, shards, device and model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dgpt.config import Config, dump_config
from dgpt.data.shards import load_split
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError
from dgpt.fileio import write_text
from dgpt.model.config import GPTConfig, resolve_config
from dgpt.model.gpt import GPT
from dgpt.model.memory import check_weights_fit
from dgpt.rundir import RunDir
from dgpt.train.checkpoint import WEIGHTS, load_weights_into, read_model_config
from dgpt.train.local import check_training_memory, describe_dtype, pick_device

logger = logging.getLogger(__name__)


@dataclass
class RunSetup:
    config: Config
    tokenizer: TextTokenizer
    model_config: GPTConfig
    device: torch.device
    train: dict[str, list[np.ndarray]]  # only the oracles this process holds
    valid: dict[str, list[np.ndarray]]

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def model_config_for(config: Config, vocab_size: int) -> GPTConfig:
    try:
        return resolve_config(config.model, vocab_size)
    except ValueError as e:
        raise DgptError(f"[model]: {e}") from None


def read_run(config: Config, oracles: list[str] | None = None) -> RunSetup:
    """The run's tokenizer and the memory-mapped shards of `oracles` (default: all); writes nothing."""
    if not config.oracles:
        raise DgptError("config declares no [[oracles]]")
    run = RunDir(config.run_dir)
    if not run.tokenizer.is_file():
        raise DgptError(f"{run.tokenizer}: no tokenizer; run `dgpt prepare CONFIG` first")
    tokenizer = TextTokenizer.load(run.tokenizer)
    names = oracles if oracles is not None else config.oracle_names()
    train, valid = {}, {}
    for name in names:
        oracle_dir = run.oracle_data(name)
        train[name] = load_split(oracle_dir, "train", tokenizer_sha256=tokenizer.sha256)
        if sum(len(a) for a in train[name]) == 0:
            raise DgptError(f"oracle '{name}': no training tokens in {oracle_dir}")
        valid[name] = load_split(oracle_dir, "valid", tokenizer_sha256=tokenizer.sha256)
    device = pick_device(config.pretrain.device)
    return RunSetup(config, tokenizer, model_config_for(config, tokenizer.vocab_size), device, train, valid)


def load_run(config: Config, oracles: list[str] | None = None, prepare_data: bool = True) -> RunSetup:
    """For training: refuse a batch that cannot fit, prepare (or reuse) the shards, read the run, and record the
    config it trains with."""
    estimate = model_config_for(config, config.tokenizer.vocab_size)  # the trained tokenizer has at most this many
    trainers = 1 if config.federation.runtime == "central" else len(oracles if oracles is not None else config.oracles)
    check_training_memory(estimate, pick_device(config.pretrain.device), "pretrain.batch_size",
                          config.pretrain.batch_size, estimate.n_ctx, trainers, config.privacy.enabled)
    if prepare_data:
        from dgpt.data.prepare import prepare

        prepare(config)
    setup = read_run(config, oracles)
    write_text(RunDir(config.run_dir).config, dump_config(config))
    logger.info(describe_dtype(config.pretrain.dtype, setup.device))
    return setup


def build_model(setup: RunSetup) -> tuple[GPT, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The model, initialised from the run's seed, and the callable that trains it (compiled if asked)."""
    torch.manual_seed(setup.config.seed)
    model = GPT(setup.model_config).to(setup.device)
    forward = torch.compile(model) if setup.config.pretrain.compile else model
    return model, forward


def newest_weights(run_dir: Path) -> tuple[TextTokenizer, GPTConfig, Path]:
    """A run's tokenizer, and its newest checkpoint's model config and weight file (vocabularies checked)."""
    run = RunDir(run_dir)
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise DgptError(f"{run.root}: no checkpoint; train first with `dgpt pretrain`")
    tokenizer = TextTokenizer.load(run.tokenizer)  # refuses one without dgpt's special tokens
    model_config = read_model_config(checkpoint / WEIGHTS)
    if model_config.vocab_size != tokenizer.vocab_size:
        raise DgptError(f"{run.tokenizer}: {tokenizer.vocab_size} tokens, but the checkpoint's model has {model_config.vocab_size}")
    return tokenizer, model_config, checkpoint / WEIGHTS


def load_newest(run_dir: Path) -> tuple[TextTokenizer, GPT, Path]:
    """A run's tokenizer, its newest checkpoint's model (weights loaded, on the CPU) and that checkpoint's weight file."""
    tokenizer, model_config, weights = newest_weights(run_dir)
    check_weights_fit(model_config, str(weights))  # a received checkpoint's metadata names the shape
    model = GPT(model_config)
    load_weights_into(model, weights, model_config)
    return tokenizer, model, weights
