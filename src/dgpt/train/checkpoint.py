"""Checkpoints: weights as safetensors, the rest (optimizers, step, RNG, data position) as a state file.

A checkpoint is the directory `RunDir.checkpoint(kind, n)` with the WEIGHTS file (its metadata holds
the model config), the STATE file (read with `weights_only=True`: nothing is unpickled) and CHECKSUMS, the
SHA-256 of both; the last checkpoint of a finished run also holds FINAL, which rotation never removes (the model
a run ended with stays when the run is extended). It is written under a temporary name and renamed when
complete, so a directory that exists is whole; `RunDir.latest_checkpoint` checks the checksums and falls back
past a corrupt one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from dgpt.errors import DgptError
from dgpt.fileio import atomic_dir, parse_json, remove_tree, torch_save, write_bytes, write_checksums, write_text
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import tied_weight_names
from dgpt.rundir import CHECKSUMS, FINAL, STATE, WEIGHTS, RunDir


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as stored: contiguous, on the CPU, tied aliases left out."""
    skip = set(tied_weight_names())
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}


def save_weights(path: Path, weights: dict[str, torch.Tensor], model_config: GPTConfig, extra: dict | None = None) -> None:
    metadata = {"model_config": json.dumps(model_config.to_dict(), sort_keys=True), "format": "dgpt"}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    write_bytes(path, save(weights, metadata=metadata))  # written by Python: a full disk is an OSError


def read_model_config(path: Path) -> GPTConfig:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return GPTConfig(**parse_json(meta["model_config"]))
    except FileNotFoundError:
        raise DgptError(f"{path}: weight file not found") from None
    except (SafetensorError, KeyError, ValueError, TypeError) as e:
        raise DgptError(f"{path}: not a dgpt weight file ({e})") from None


def load_weights_into(model: torch.nn.Module, path: Path, expected: GPTConfig) -> None:
    """Load weights, refusing a file made for a different model config."""
    found = read_model_config(path)
    if found != expected:
        diff = [f"{k} {v} != {getattr(expected, k)}" for k, v in found.to_dict().items() if getattr(expected, k) != v]
        raise DgptError(f"{path}: checkpoint is for a different model ({'; '.join(diff)})")
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise DgptError(f"{path}: corrupt weight file ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_weight_names()]
    if missing or unexpected:
        raise DgptError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def checkpoint_dir(run_dir: Path, kind: str, n: int) -> Path:
    return RunDir(run_dir).checkpoint(kind, n)


def save_checkpoint(
    run_dir: Path, kind: str, n: int, weights: dict[str, torch.Tensor], model_config: GPTConfig, state: dict, keep: int,
    final: bool = False,
) -> Path:
    """Write checkpoint `kind` `n` (`final`: the run's last, kept for good), then remove all but the `keep` newest,
    except the final ones."""
    path = checkpoint_dir(run_dir, kind, n)
    with atomic_dir(path) as tmp:
        save_weights(tmp / WEIGHTS, weights, model_config)
        torch_save(state, tmp / STATE)
        if final:
            write_text(tmp / FINAL, f"{kind} {n}: the last of a finished run; checkpoint rotation keeps it\n")
        write_checksums(tmp, CHECKSUMS)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if not (old / FINAL).is_file():
            remove_tree(old)  # a link among them is removed as a link, never what it points to
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    return RunDir(run_dir).list_checkpoints()


def latest_checkpoint(run_dir: Path) -> Path | None:
    return RunDir(run_dir).latest_checkpoint()


def load_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DgptError(f"{path}: checkpoint state file not found") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise DgptError(f"{path}: corrupt checkpoint state ({type(e).__name__}: {e})".splitlines()[0]) from None
