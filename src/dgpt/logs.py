"""Where dgpt's messages go: the library only logs (logger `dgpt`); the programs that run it choose the handler."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def messages_to(handler: logging.Handler, level: int = logging.INFO, fmt: str = "%(message)s") -> Iterator[None]:
    """dgpt's messages through `handler` at `level` while the block runs; logging is left as it was found (a process
    may run several commands: tests, notebooks, a benchmark's arms)."""
    handler.setFormatter(logging.Formatter(fmt))
    logger = logging.getLogger("dgpt")
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
        handler.close()
