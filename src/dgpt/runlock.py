"""The run lock: one command writes a run directory at a time.

`RunDir.lock` is created exclusively and holds the writer's pid, host, start time and, under torchrun, the
job it belongs to. A second writer gets one line naming the holder. A lock whose process is gone (same
host, pid not alive) is stale: it is taken over with a warning. The ranks of one torchrun job share the
run directory, so a process of the job that holds the lock joins it instead of waiting for it.

Whoever takes the lock first removes the temporary files of interrupted writes (`dgpt.fileio.TEMP_NAME`)
older than the lock: nothing else can be writing them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from dgpt.errors import DgptError
from dgpt.fileio import parse_json, remove_stale_temps
from dgpt.rundir import RunDir

logger = logging.getLogger(__name__)
_READ_TRIES = 20  # a lock file just created may not hold its content yet: read again this many times, 50 ms apart


def torchrun_job() -> str | None:
    """What the ranks of one torchrun job have in common (None outside torchrun)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return f"{env.get('TORCHELASTIC_RUN_ID', '')}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_holder(path: Path) -> dict | None:
    """The holder's record (None: unreadable after waiting for its writer)."""
    for _ in range(_READ_TRIES):
        try:
            holder = parse_json(path.read_text(encoding="utf-8"))
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            pass
        time.sleep(0.05)
    return None


def _create(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(me) + "\n")
    return True


def _acquire(run: RunDir, me: dict) -> bool:
    """True: this process took the lock; False: it joined its torchrun job's lock."""
    while not _create(run.lock, me):
        holder = _read_holder(run.lock)
        if holder == {}:  # released meanwhile
            continue
        if holder is None:
            logger.warning(f"{run.lock}: unreadable run lock; taking it over")
        elif holder.get("host") == me["host"] and not _alive(holder["pid"]):
            logger.warning(f"{run.lock}: stale run lock of pid {holder['pid']} (since {holder.get('since')}), "
                           "which is no longer running; taking it over")
        elif me["job"] is not None and holder.get("job") == me["job"]:
            return False
        else:
            raise DgptError(f"{run.root}: in use by pid {holder['pid']} on {holder.get('host')} since "
                            f"{holder.get('since')} (lock file {run.lock}); wait for it to finish, or delete the "
                            "lock file if that process is gone")
        if _read_holder(run.lock) == holder:  # not taken over by another process meanwhile
            with contextlib.suppress(FileNotFoundError):
                run.lock.unlink()
    return True


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's lock while the block runs (the directory is made if missing, and removed again
    if it is still empty)."""
    run = RunDir(run_dir)
    created = not run.root.exists()
    run.root.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "job": torchrun_job()}
    taken = _acquire(run, me)
    try:
        run.check_links()
        if taken:
            removed = remove_stale_temps(run.root, run.lock.stat().st_mtime)
            if removed:
                logger.info(f"{run.root}: removed {len(removed)} temporary file(s) of interrupted writes")
        yield
    finally:
        if taken and _read_holder(run.lock) == me:
            run.lock.unlink()
        if created:  # a command that failed before writing anything leaves no empty run directory behind
            with contextlib.suppress(OSError):
                run.root.rmdir()
