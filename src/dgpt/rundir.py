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
    RUN/ledger_heads.jsonl                the aggregator's signed head of each ledger record
    RUN/keys/<party>.key, <party>.pub     Ed25519 key pairs (party: an oracle, or "aggregator") and known public keys
    RUN/oracles/<oracle>/receipts.jsonl   the signed heads an oracle received: its receipts
    RUN/plots/, RUN/tensorboard/          what `dgpt plot` and `[log] tensorboard` write
    RUN/flower_app/pyproject.toml         the Flower App that `flwr run` ships to the SuperLink (`dgpt flower-app`)
    RUN/flower_eval_app/pyproject.toml    the one that has every SuperNode validate and keep the model (`--eval`)
    RUN/flower_server.log                 what the Flower ServerApp of this run logged
    RUN/dgpt.lock                         the run lock of the command writing the run (`dgpt.runlock`)

Oracle names come from configs written by other people, so they are checked before they become a path.
Run directories travel between parties (a run handed over for audit, a checkpoint to fine-tune from), so a
run directory is input like any other: every path named here is checked to stay inside the run directory
with its symbolic links followed (`inside`), before anything is read or written through it; a link that
leads out is refused, one line naming it. Links that stay inside are allowed.
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


def _within(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([root, path]) == root


def inside(path: str | Path, root: str | Path, what: str = "the run directory") -> Path:
    """`path`, refused unless it stays inside `root` both as written (no '..', no absolute part) and with
    every symbolic link on it followed, however deep (a path that does not exist yet is checked as far as
    it exists: what is written there then stays inside too)."""
    path, root = Path(path), Path(root)
    lexical = os.path.normpath(path)
    if not _within(lexical, os.path.normpath(root)):
        raise DgptError(f"{path}: outside {what} {root}")
    real_root = os.path.realpath(root)
    if _within(os.path.realpath(path), real_root):
        return path
    step = root
    for part in Path(lexical).relative_to(os.path.normpath(root)).parts:  # name the first link that leads out
        step = step / part
        if not _within(os.path.realpath(step), real_root):
            break
    target = os.readlink(step) if step.is_symlink() else os.path.realpath(step)
    raise DgptError(f"{step}: a symbolic link to {target}, outside {what} {root}; a run directory is read and "
                    "written only inside itself")


class RunDir:
    """Paths of one run. Creating a RunDir touches nothing on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def _inside(self, *parts: str) -> Path:
        """root/parts, refused unless it is strictly inside root, symbolic links followed (`inside`)."""
        path = self.root.joinpath(*parts)
        if os.path.normpath(path) == os.path.normpath(self.root):
            raise DgptError(f"{path}: outside the run directory {self.root}")
        return inside(path, self.root)

    def check_links(self) -> None:
        """Refuse the run if any symbolic link in it leads out (one line naming the first). Writers call it
        when they take the run (`dgpt.runlock`), so that a received run directory is refused before anything
        is written; readers rely on each path named here being checked when it is asked for."""
        for folder, dirs, files in os.walk(self.root):  # does not descend into linked folders
            for name in sorted(dirs + files):
                if os.path.islink(os.path.join(folder, name)):
                    inside(Path(folder, name), self.root)

    def _entries(self, folder: Path) -> list[Path]:
        """The entries of a folder of the run, each checked to stay inside it (a received run's checkpoint
        or shard folder may hold a link to a file elsewhere)."""
        return [self._inside(*p.relative_to(self.root).parts) for p in folder.iterdir()] if folder.is_dir() else []

    @property
    def config(self) -> Path:
        return self._inside(CONFIG)

    @property
    def tokenizer(self) -> Path:
        return self._inside(TOKENIZER)

    @property
    def tokenizer_fingerprint(self) -> Path:
        return self._inside("tokenizer.fingerprint.json")

    @property
    def metrics(self) -> Path:
        return self._inside(METRICS)

    @property
    def ledger(self) -> Path:
        return self._inside(LEDGER)

    @property
    def ledger_heads(self) -> Path:
        return self._inside("ledger_heads.jsonl")

    @property
    def keys(self) -> Path:
        return self._inside("keys")

    def private_key(self, party: str) -> Path:
        return self._inside("keys", f"{check_oracle_name(party)}.key")

    def public_key(self, party: str) -> Path:
        return self._inside("keys", f"{check_oracle_name(party)}.pub")

    def receipts(self, name: str) -> Path:
        return self._inside("oracles", check_oracle_name(name), "receipts.jsonl")

    @property
    def server_log(self) -> Path:
        return self._inside("flower_server.log")

    @property
    def flower_app(self) -> Path:
        return self._inside("flower_app")

    @property
    def flower_eval_app(self) -> Path:
        return self._inside("flower_eval_app")

    @property
    def lock(self) -> Path:
        return self._inside(LOCK)

    @property
    def plots(self) -> Path:
        return self._inside("plots")

    @property
    def tensorboard(self) -> Path:
        return self._inside("tensorboard")

    # --- an oracle's prepared data and private state ------------------------------------------------

    def oracle_data(self, name: str) -> Path:
        return self._inside("data", check_oracle_name(name))

    def manifest(self, name: str) -> Path:
        return self._inside("data", check_oracle_name(name), MANIFEST)

    def pretoken_counts(self, name: str) -> Path:
        return self._inside("pretoken_counts", f"{check_oracle_name(name)}.json")

    def oracle_state(self, name: str, rnd: int) -> Path:
        return self._inside("oracles", check_oracle_name(name), f"round_{rnd:07d}.pt")

    def oracle_states(self, name: str) -> dict[int, Path]:
        """round -> state file of every round this oracle's state was kept for."""
        found = [(_ORACLE_STATE.match(p.name), p) for p in self._entries(self._inside("oracles", check_oracle_name(name)))]
        return {int(m.group(1)): p for m, p in found if m}

    def oracles_with_state(self) -> list[str]:
        return sorted(p.name for p in self._entries(self._inside("oracles")) if p.is_dir())

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self._inside("checkpoints")

    def checkpoint(self, kind: str, n: int) -> Path:
        return self._inside("checkpoints", f"{kind}_{n:07d}")

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (temporary ones of interrupted writes are skipped),
        each with every file in it checked to stay inside the run."""
        found = [p for p in self._entries(self.checkpoints) if p.is_dir() and _CHECKPOINT.match(p.name)]
        for checkpoint in found:
            self._entries(checkpoint)
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
