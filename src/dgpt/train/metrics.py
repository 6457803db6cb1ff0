"""A run's metrics log: one JSON object per logged event, appended and flushed as training goes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dgpt.errors import DgptError
from dgpt.fileio import parse_json, write_text
from dgpt.rundir import RunDir

logger = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: Path, resume_after: int | None = None, key: str = "step", tensorboard: bool = False):
        """Open for appending; on resume, rows past the checkpoint (`key` > resume_after) are dropped.

        With `tensorboard`, every numeric field is also a scalar `<kind>/<field>[/<oracle>]` at step `row[key]`
        in the run's tensorboard folder (needs the `tensorboard` package).
        """
        self.path, self.key = Path(path), key
        self._board = _summary_writer(RunDir(self.path.parent).tensorboard) if tensorboard else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is None:
            write_text(self.path, "")
        elif self.path.exists():
            kept = [row for row in read_metrics(self.path) if row.get(key, 0) <= resume_after]
            write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, **row) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._board is not None:
            kind, step = row.get("kind", "metrics"), row.get(self.key, 0)
            prefix = f"{kind}/{row['oracle']}" if "oracle" in row else kind
            for tag, value in _scalars(row, prefix):
                self._board.add_scalar(tag, value, step)

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def _scalars(row: dict, prefix: str):
    """(tag, number) pairs of a row, nested dicts ({oracle: loss}, {oracle: {metric: value}}) flattened."""
    for name, value in row.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}/{name}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            yield f"{prefix}/{name}", value


def _summary_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DgptError("[log] tensorboard = true needs the tensorboard package: pip install 'dgpt[tensorboard]'") from None
    return SummaryWriter(str(log_dir))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics log. A last line cut short (a crash mid-write) is left out with a warning;
    any other line that is not a JSON object is an error naming it."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except ValueError:
            if number < len(lines):
                raise DgptError(f"{path}: line {number} is not valid JSON") from None
            logger.warning(f"{path}: line {number} is cut short (an interrupted write); left out")
            continue
        if not isinstance(row, dict):
            raise DgptError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows
