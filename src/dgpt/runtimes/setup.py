"""What every runtime does first: resolve the run directory, tokenizer, shards, device and model."""

from __future__ import annotations

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
from dgpt.model.gpt import GPT, GPTConfig, resolve_config
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint, read_model_config
from dgpt.train.local import pick_device


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


def load_run(config: Config, oracles: list[str] | None = None, prepare_data: bool = True, log: Callable = print) -> RunSetup:
    """Prepare (or reuse) the shards, then memory-map those of `oracles` (default: all)."""
    if not config.oracles:
        raise DgptError("config declares no [[oracles]]")
    run_dir = Path(config.run_dir)
    if prepare_data:
        from dgpt.data.prepare import prepare

        prepare(config, log=log)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise DgptError(f"{tok_path}: no tokenizer; run `dgpt prepare CONFIG` first")
    tokenizer = TextTokenizer.load(tok_path)
    names = oracles if oracles is not None else config.oracle_names()
    train, valid = {}, {}
    for name in names:
        oracle_dir = run_dir / "data" / name
        train[name] = load_split(oracle_dir, "train", tokenizer_sha256=tokenizer.sha256)
        if sum(len(a) for a in train[name]) == 0:
            raise DgptError(f"oracle '{name}': no training tokens in {oracle_dir}")
        valid[name] = load_split(oracle_dir, "valid", tokenizer_sha256=tokenizer.sha256)
    write_text(run_dir / "config.toml", dump_config(config))
    device = pick_device(config.pretrain.device)
    return RunSetup(config, tokenizer, model_config_for(config, tokenizer.vocab_size), device, train, valid)


def build_model(setup: RunSetup) -> tuple[GPT, Callable[[torch.Tensor], torch.Tensor]]:
    """The model, initialised from the run's seed, and the callable that trains it (compiled if asked)."""
    torch.manual_seed(setup.config.seed)
    model = GPT(setup.model_config).to(setup.device)
    forward = torch.compile(model) if setup.config.pretrain.compile else model
    return model, forward


def newest_weights(run_dir: Path) -> tuple[TextTokenizer, GPTConfig, Path]:
    """A run's tokenizer, and its newest checkpoint's model config and weight file (vocabularies checked)."""
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise DgptError(f"{run_dir}: no checkpoint; train first with `dgpt pretrain`")
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")  # refuses one without dgpt's special tokens
    model_config = read_model_config(checkpoint / WEIGHTS)
    if model_config.vocab_size != tokenizer.vocab_size:
        raise DgptError(
            f"{run_dir / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, but the checkpoint's model has {model_config.vocab_size}"
        )
    return tokenizer, model_config, checkpoint / WEIGHTS
