"""The Python API: what the `dgpt` commands do, callable from code.

    from dgpt import api
    config = api.load_config("examples/shared4.toml")
    api.pretrain(config)
    model, tokenizer = api.load_pretrained(config.run_dir)
    print(api.generate_text(model, tokenizer, "To be", max_new_tokens=50))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from dgpt.config import Config, load_config
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError
from dgpt.model.generate import generate
from dgpt.model.gpt import GPT
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint, load_weights_into, read_model_config
from dgpt.train.local import pick_device

__all__ = ["load_config", "load_run_config", "prepare", "pretrain", "load_pretrained", "generate_text", "evaluate"]


def load_run_config(config_or_run: str | Path, overrides: list[str] = ()) -> Config:
    """A TOML file, or a run directory (its saved config.toml)."""
    path = Path(config_or_run)
    if path.is_dir():
        path = path / "config.toml"
    return load_config(path, list(overrides))


def prepare(config: Config, log: Callable[[str], None] = print) -> dict:
    from dgpt.data.prepare import prepare as _prepare

    return _prepare(config, log=log)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def pretrain(config: Config, *, stop_after: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Centralised (`central`) or decentralized (`sim`, `torchrun`) pre-training, as the config says.

    Under a torchrun launch a `sim` config runs on the torchrun runtime: one config for both.
    `stop_after` ends the run early after that step (central) or round (federated), checkpointed.
    """
    runtime = config.federation.runtime
    if launched_by_torchrun() and runtime == "sim":
        runtime = "torchrun"
    if runtime == "central":
        from dgpt.runtimes.central import pretrain_central

        return pretrain_central(config, stop_after=stop_after, log=log)
    if runtime == "sim":
        from dgpt.runtimes.sim import pretrain_sim

        return pretrain_sim(config, stop_after_round=stop_after, log=log)
    from dgpt.runtimes.torchrun import pretrain_torchrun

    return pretrain_torchrun(config, stop_after_round=stop_after, log=log)


def load_pretrained(run_dir: str | Path, device: str = "auto") -> tuple[GPT, TextTokenizer]:
    """The newest checkpoint of a run and its tokenizer, ready for generation or evaluation."""
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise DgptError(f"{run_dir}: no checkpoint; train first with `dgpt pretrain`")
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    model_config = read_model_config(checkpoint / WEIGHTS)
    if model_config.vocab_size != tokenizer.vocab_size:
        raise DgptError(
            f"{run_dir / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, but the checkpoint's model has {model_config.vocab_size}"
        )
    model = GPT(model_config)
    load_weights_into(model, checkpoint / WEIGHTS, model_config)
    return model.to(pick_device(device)).eval(), tokenizer


def generate_text(
    model: GPT,
    tokenizer: TextTokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[str]:
    device = next(model.parameters()).device
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)  # documents start after <|endoftext|> in training
    ids = ids[-model.config.n_ctx :]
    prompt_t = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model, prompt_t, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eot_id=tokenizer.eot_id, generator=gen,
    )
    texts = []
    for row in out[:, len(ids) :].tolist():
        if tokenizer.eot_id in row:
            row = row[: row.index(tokenizer.eot_id)]
        texts.append(prompt + tokenizer.decode(row))
    return texts


def evaluate(config: Config, max_windows: int | None = None, log: Callable[[str], None] = print) -> dict[str, float]:
    """Validation loss per oracle of the run's newest checkpoint."""
    from dgpt.runtimes.setup import load_run
    from dgpt.train.evaluate import Validator

    setup = load_run(config, prepare_data=False, log=log)
    model, _ = load_pretrained(config.run_dir, config.pretrain.device)
    windows = max_windows or config.pretrain.eval_windows
    validator = Validator(setup.valid, model.config.n_ctx, windows, config.pretrain.batch_size)
    return validator(model, next(model.parameters()).device, config.pretrain.dtype)
