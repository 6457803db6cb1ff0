"""Atomic file writes: a file appears under its final name only when it is complete.

Temporary names are `.NAME.XXXXXXXX.tmp` beside the target (`TEMP_NAME`); what an interrupted write left
behind is removed by `remove_stale_temps` when the next writer takes the run (see `dgpt.runlock`).
Files get the permissions the umask gives any new file (mkstemp alone would make them 0600), and an
OSError inside the block names the final path, not the temporary one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dgpt.errors import DgptError

TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what tempfile.mkstemp/mkdtemp make from the prefix and suffix below


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _named(error: OSError, tmp: Path, final: Path) -> OSError:
    """The error with its filename the final path (or the final path's counterpart of a file inside `tmp`)."""
    name = str(error.filename) if error.filename is not None else str(tmp)
    if name.startswith(str(tmp)):
        error.filename = str(final) + name[len(str(tmp)):]
    return error


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds (with `mode`, else the
    permissions the umask gives; the temporary file is 0600 while it is written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except OSError as e:
        raise _named(e, Path(tmp), path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists() or path.is_symlink():
            remove_tree(path)
        os.replace(tmp, path)
    except OSError as e:
        raise _named(e, tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_tree(path: str | Path) -> None:
    """Delete a directory and what is in it, never what a symbolic link points to: a link, the directory itself
    or one inside it, is removed as a link (shutil.rmtree refuses the first and unlinks the others)."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def remove_stale_temps(root: str | Path, older_than: float) -> list[Path]:
    """Remove the temporary files and directories of interrupted atomic writes under `root` last modified
    before `older_than` (a file-system timestamp); return what was removed."""
    removed = []
    for folder, dirs, files in os.walk(root):
        for name in [n for n in dirs + files if TEMP_NAME.match(n)]:
            path = Path(folder) / name
            if path.lstat().st_mtime < older_than:
                if path.is_dir():
                    remove_tree(path)
                else:
                    path.unlink()
                removed.append(path)
        dirs[:] = [d for d in dirs if not TEMP_NAME.match(d)]
    return removed


def torch_save(obj: Any, path: str | Path) -> None:
    """torch.save, serialised in memory and written by Python, so that a full disk is an OSError with its errno
    (torch's own writer reports a short write as a RuntimeError without one)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Path.write_bytes, the path named in the OSError of a failed write (Python names it only when open fails)."""
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path, name: str) -> None:
    """`folder/name`: the SHA-256 of every other file in `folder` (not recursive)."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != name)
    write_json(folder / name, {"sha256": {f: sha256_file(folder / f) for f in files}})


def checksum_problem(folder: Path, name: str) -> str | None:
    """What is wrong with `folder` against its `name` file (None: every listed file matches). A folder
    without the file (written before checksums were kept) is not checked."""
    if not (folder / name).is_file():
        return None
    try:
        listed = read_json_object(folder / name)["sha256"]
    except (DgptError, KeyError) as e:
        return f"unreadable {name} ({e})"
    for file, digest in sorted(listed.items()):
        if not (folder / file).is_file():
            return f"{file} is missing"
        if sha256_file(folder / file) != digest:
            return f"{file} does not match its SHA-256 in {name}"
    return None


def parse_json(text: str) -> Any:
    """json.loads, with a value nested too deeply for the parser a JSONDecodeError like any other malformed JSON
    (a received run's files are input: they must end in one line, not a RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to read", text[:0], 0) from None


def read_json_object(path: str | Path, missing: str = "not found") -> dict:
    """A JSON object from a file, or one DgptError line naming the file: `missing`, not JSON, not an object."""
    path = Path(path)
    if not path.is_file():
        raise DgptError(f"{path}: {missing}")
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DgptError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DgptError(f"{path}: expected a JSON object")
    return data
