"""The Python API: what the `dgpt` commands do, callable from code.

    from dgpt import api
    config = api.load_config("examples/shared4.toml")
    api.pretrain(config)
    model, tokenizer = api.load_pretrained(config.run_dir)
    print(api.generate_text(model, tokenizer, "To be", max_new_tokens=50))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dgpt.config import Config, load_config
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError
from dgpt.rundir import RunDir

if TYPE_CHECKING:  # torch is imported by the functions that use it: `dgpt prepare` runs without it
    from dgpt.model.gpt import GPT
    from dgpt.runtimes.evaluation import Evaluation
    from dgpt.runtimes.summary import RunSummary

__all__ = [
    "load_config", "load_run_config", "prepare", "pretrain", "finetune", "predict", "load_pretrained", "generate_text", "evaluate",
]

logger = logging.getLogger(__name__)


def load_run_config(config_or_run: str | Path, overrides: list[str] = ()) -> Config:
    """A TOML file, or a run directory: the config it was trained with, its run_dir the directory given
    (a run that was copied or moved is read where it is now)."""
    path = Path(config_or_run)
    if not path.is_dir():
        return load_config(path, list(overrides))
    return dataclasses.replace(load_config(RunDir(path).config, list(overrides)), run_dir=str(path))


def prepare(config: Config, oracles: list[str] | None = None) -> dict:
    """Tokenizer and token shards of `oracles` (default: all of the config's)."""
    from dgpt.data.prepare import prepare as _prepare

    return _prepare(config, oracles=oracles)


def count_pretokens(config: Config, oracle: str, out: str | Path | None = None, min_count: int = 1) -> Path:
    """Write the pre-token count file that `oracle` shares for a tokenizer trained without its text
    (default: the run's pretoken_counts/ORACLE.json); return its path."""
    from dgpt.data.prepare import count_oracle_pretokens

    path = Path(out) if out else RunDir(config.run_dir).pretoken_counts(oracle)
    logger.info(count_oracle_pretokens(config, oracle, path, min_count))
    return path


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def pretrain(config: Config, *, stop_after: int | None = None) -> RunSummary:
    """Centralised (`central`) or decentralized (`sim`, `torchrun`) pre-training, as the config says.

    Under a torchrun launch a `sim` config runs on the torchrun runtime: one config for both.
    `stop_after` ends the run early after that step (central) or round (federated), checkpointed.
    Returns the run's summary (final validation, tokens, bytes, time; `.lines()` as `dgpt pretrain` prints it).
    """
    if config.federation.runtime == "central":
        from dgpt.runtimes.central import pretrain_central

        return pretrain_central(config, stop_after=stop_after)
    return _federated(config, stop_after)


def _federated(config: Config, stop_after: int | None, **work) -> RunSummary:
    """The torchrun runtime when asked for, or when a `sim` config is launched by torchrun; else sim."""
    if config.federation.runtime == "flower":
        from dgpt.runtimes.flower.app import require_flower

        require_flower()
        raise DgptError("federation.runtime = 'flower' runs under Flower: `dgpt flower-app CONFIG` writes the app, "
                        "`flwr run RUN_DIR/flower_app local --federation-config num-supernodes=N` runs it on this machine, "
                        "`flwr run RUN_DIR/flower_app SUPERLINK` on a deployment (README: Runtimes, flower)")
    if config.federation.runtime == "torchrun" or launched_by_torchrun():
        from dgpt.runtimes.torchrun import pretrain_torchrun

        return pretrain_torchrun(config, stop_after_round=stop_after, **work)
    from dgpt.runtimes.sim import pretrain_sim

    return pretrain_sim(config, stop_after_round=stop_after, **work)


def flower_app(config: Config, finetune: bool = False, evaluate: bool = False) -> Path:
    """Write the Flower App of a `runtime = "flower"` config (RUN_DIR/flower_app) for `flwr run`: pre-training,
    or fine-tuning (DSFT) with `finetune`; `evaluate`: RUN_DIR/flower_eval_app, which has every SuperNode validate
    the newest checkpoint on its own data (the table in the server's log) and keep it in its run directory."""
    from dgpt.runtimes.flower.app import write_flower_app

    return write_flower_app(config, finetune, evaluate)


def finetune(config: Config, *, stop_after: int | None = None) -> RunSummary:
    """DSFT: fine-tune the body across oracles (sim, or torchrun), one head per oracle; see docs/finetune.md.

    Returns the run's summary: `.oracles[name]` holds each oracle's validation loss and scores (accuracy, f1 or
    macro_f1, pearson, spearman).
    """
    from dgpt.runtimes.finetune import finetune_work

    if config.federation.runtime == "central":
        raise DgptError("fine-tuning runs on the sim or torchrun runtime; federation.runtime = 'central' is for pre-training")
    return _federated(config, stop_after, work=finetune_work)


def predict(
    run_dir: str | Path, oracle: str, input_path: str | Path, output_path: str | Path, *, device: str = "auto",
    batch_size: int = 64,
) -> list[dict]:
    """Label every row of a JSONL file with a fine-tuned run's body and `oracle`'s head.

    Writes one JSON object per input line: {"label": ..., "probabilities": ...} (class label -> probability,
    or one probability per choice); a regression task writes {"label": score}. Returns the rows written.
    """
    import torch

    from dgpt.data.tasks import encode_examples, read_rows
    from dgpt.fileio import write_text
    from dgpt.runtimes.finetune import load_task_model
    from dgpt.train.local import pick_device
    from dgpt.train.task_eval import task_outputs

    target = pick_device(device)
    model, spec, tokenizer = load_task_model(Path(run_dir), oracle, target)
    rows = read_rows([str(input_path)], spec, oracle, need_label=False)
    examples = encode_examples(rows, spec, tokenizer, oracle, with_labels=False)
    if examples.truncated:
        logger.info(f"{input_path}: {examples.truncated} of {len(examples)} inputs truncated to {spec.max_len} tokens")
    outputs = task_outputs(model, examples, batch_size, target)
    results = []
    for out in outputs:
        if spec.regression:
            results.append({"label": float(out)})
            continue
        probs = torch.softmax(out, dim=-1)
        k = int(probs.argmax())
        if spec.type == "multiple_choice":
            results.append({"label": k, "probabilities": probs.tolist()})
        else:
            results.append({"label": spec.labels[k], "probabilities": {str(v): p for v, p in zip(spec.labels, probs.tolist())}})
    write_text(output_path, "".join(json.dumps(r) + "\n" for r in results))
    return results


def load_pretrained(run_dir: str | Path, device: str = "auto") -> tuple[GPT, TextTokenizer]:
    """The newest checkpoint of a run and its tokenizer, ready for generation or evaluation."""
    from dgpt.runtimes.setup import load_newest
    from dgpt.train.local import pick_device

    tokenizer, model, _ = load_newest(Path(run_dir))
    return model.to(pick_device(device)).eval(), tokenizer


def generate_text(
    model: GPT,
    tokenizer: TextTokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    min_new_tokens: int = 0,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[str]:
    """`num_samples` continuations of `prompt`, each ending at end-of-text (never before `min_new_tokens` new tokens)
    or after `max_new_tokens`."""
    import torch

    from dgpt.model.generate import generate

    if min_new_tokens > max_new_tokens:
        raise DgptError(f"min_new_tokens {min_new_tokens} exceeds max_new_tokens {max_new_tokens}")
    device = next(model.parameters()).device
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)  # documents start after <|endoftext|> in training
    ids = ids[-model.config.n_ctx :]
    prompt_t = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model, prompt_t, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eot_id=tokenizer.eot_id, min_new_tokens=min_new_tokens, generator=gen,
    )
    texts = []
    for row in out[:, len(ids) :].tolist():
        if tokenizer.eot_id in row:
            row = row[: row.index(tokenizer.eot_id)]
        texts.append(prompt + tokenizer.decode(row))
    return texts


def evaluate(config: Config, max_windows: int | None = None, full: bool = False) -> Evaluation:
    """The run's newest checkpoint re-scored (the run is only read). Pre-training: loss per oracle and global on
    `max_windows` validation windows per oracle (default pretrain.eval_windows; `full`: all of them). Fine-tuning:
    each oracle's head on its validation set. `.scores[oracle]` holds the figures, `.lines()` the printed table."""
    from dgpt.runtimes.evaluation import evaluate_run

    return evaluate_run(config, None if full else max_windows or config.pretrain.eval_windows)
