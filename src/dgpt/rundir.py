"""The layout of a run directory: every file and folder a run reads or writes is named here, and only here.

    RUN/config.toml                       the resolved config the run was trained with
    RUN/tokenizer.json                    the run's tokenizer (Hugging Face `tokenizers` format)
    RUN/tokenizer.fingerprint.json        what the tokenizer was trained from, so that `dgpt prepare` can reuse it
    RUN/data/<oracle>/manifest.json       an oracle's token shards and their checksums
    RUN/pretoken_counts/<oracle>.json     what an oracle shares to train the tokenizer without its text
    RUN/checkpoints/<kind>_<n>/           model.safetensors + state.pt + checksums.json (kind: step or round);
                                          FINAL in the last one of a finished run, which rotation keeps
    RUN/oracles/<oracle>/round_<n>.pt     an oracle's private state (inner optimizer, sampler, head) at round n
    RUN/metrics.jsonl, RUN/ledger.jsonl   one row per event / per round
    RUN/plots/, RUN/tensorboard/          what `dgpt plot` and `[log] tensorboard` write
    RUN/flower_app/pyproject.toml         the Flower App that `flwr run` ships to the SuperLink (`dgpt flower-app`)
    RUN/flower_server.log                 what the Flower ServerApp of this run logged
    RUN/dgpt.lock                         the run lock of the command writing the run (`dgpt.runlock`)

Oracle names come from configs written by other people, so they are checked before they become a path,
and every path built from one is checked to stay inside the run directory.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from dgpt.errors import DgptError
from dgpt.fileio import checksum_problem

logger = logging.getLogger(__name__)

CONFIG = "config.toml"
TOKENIZER = "tokenizer.json"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
METRICS = "metrics.jsonl"
LEDGER = "ledger.jsonl"
CHECKSUMS = "checksums.json"  # in each checkpoint: the SHA-256 of its other files
FINAL = "FINAL"  # in the last checkpoint of a finished run: checkpoint rotation keeps it
LOCK = "dgpt.lock"

_ORACLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHECKPOINT = re.compile(r"^(step|round)_(\d+)$")
_ORACLE_STATE = re.compile(r"^round_(\d+)\.pt$")


def check_oracle_name(name: str, where: str = "oracle name") -> str:
    """A name that is one plain path component: letters, digits, '.', '_', '-', not starting with '.' or '-'."""
    if not isinstance(name, str) or not _ORACLE_NAME.match(name):
        raise DgptError(f"{where} {name!r} is not allowed: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    return name


def checkpoint_number(checkpoint: Path) -> int:
    """The step or round a checkpoint directory holds."""
    match = _CHECKPOINT.match(Path(checkpoint).name)
    if match is None:
        raise DgptError(f"{checkpoint}: not a checkpoint directory (expected step_N or round_N)")
    return int(match.group(2))


class RunDir:
    """Paths of one run. Creating a RunDir touches nothing on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def _inside(self, *parts: str) -> Path:
        """root/parts, refused unless it stays inside root (no '..', no absolute part)."""
        path, root = self.root.joinpath(*parts), os.path.normpath(self.root)
        normal = os.path.normpath(path)
        if normal == root or os.path.commonpath([root, normal]) != root:
            raise DgptError(f"{path}: outside the run directory {self.root}")
        return path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def tokenizer_fingerprint(self) -> Path:
        return self.root / "tokenizer.fingerprint.json"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER

    @property
    def server_log(self) -> Path:
        return self.root / "flower_server.log"

    @property
    def flower_app(self) -> Path:
        return self.root / "flower_app"

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    # --- an oracle's prepared data and private state ------------------------------------------------

    def oracle_data(self, name: str) -> Path:
        return self._inside("data", check_oracle_name(name))

    def manifest(self, name: str) -> Path:
        return self.oracle_data(name) / MANIFEST

    def pretoken_counts(self, name: str) -> Path:
        return self._inside("pretoken_counts", f"{check_oracle_name(name)}.json")

    def oracle_state(self, name: str, rnd: int) -> Path:
        return self._inside("oracles", check_oracle_name(name), f"round_{rnd:07d}.pt")

    def oracle_states(self, name: str) -> dict[int, Path]:
        """round -> state file of every round this oracle's state was kept for."""
        folder = self._inside("oracles", check_oracle_name(name))
        found = [(_ORACLE_STATE.match(p.name), p) for p in folder.iterdir()] if folder.is_dir() else []
        return {int(m.group(1)): p for m, p in found if m}

    def oracles_with_state(self) -> list[str]:
        folder = self.root / "oracles"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, kind: str, n: int) -> Path:
        return self.checkpoints / f"{kind}_{n:07d}"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (temporary ones of interrupted writes are skipped)."""
        root = self.checkpoints
        found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if root.is_dir() else []
        return sorted(found, key=checkpoint_number)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files match their checksums; a corrupt one is skipped with a warning,
        and a run whose every checkpoint is corrupt is an error. Checkpoints written before dgpt kept
        checksums (no CHECKSUMS file) are taken as they are."""
        found = self.list_checkpoints()
        for checkpoint in reversed(found):
            problem = checksum_problem(checkpoint, CHECKSUMS)
            if problem is None:
                return checkpoint
            logger.warning(f"{checkpoint}: corrupt checkpoint ({problem}); using the one before it")
        if found:
            raise DgptError(f"{self.checkpoints}: every checkpoint is corrupt; move them away to start afresh")
        return None
