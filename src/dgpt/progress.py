"""Progress of a training loop: a tqdm bar on a terminal; anywhere else (a file, CI, `nohup`, a scheduler's log) a
one-line log record through `logging` at the first update, then every `log.progress_interval_s` seconds and at the
end, so a log never fills with a bar's carriage-return redraws.

    step 120/600: loss 5.4312, 1,830 tokens/s
    round 3/40: train 5.1200, shakespeare 5.0310, wikitext 5.6620, agreement 0.41, 9,120 tokens/s
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

logger = logging.getLogger(__name__)


class Progress:
    """Counts `unit`s (steps or rounds) from `done` to `total`; each update gives the tokens trained so far (every
    oracle together) and the figures to show. `tokens` is the count at the start (None: unknown, e.g. a resumed
    federated run, whose rate is then measured from the first update on)."""

    def __init__(self, total: int, done: int, unit: str, interval_s: float, tokens: int | None = 0, enabled: bool = True,
                 stream: TextIO | None = None):
        stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.unit, self.interval_s, self.enabled = total, done, unit, interval_s, enabled
        self.start = (time.perf_counter(), tokens)
        self.logged_at: float | None = None
        self.unlogged: str | None = None  # the newest record, when it was not logged yet
        terminal = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, initial=done, desc=f"{unit}s", unit=unit, dynamic_ncols=True, file=stream) if terminal else None

    def _rate(self, now: float, tokens: int) -> str:
        t0, tokens0 = self.start
        if tokens0 is None:
            self.start = (now, tokens)
            return ""
        return f"{(tokens - tokens0) / max(now - t0, 1e-9):,.0f} tokens/s"

    def update(self, tokens: int, **figures: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self._rate(now, tokens)
        if self.bar is not None:
            self.bar.set_postfix({**figures, **({"tok/s": rate.split()[0]} if rate else {})}, refresh=False)
            self.bar.update()
            return
        parts = [f"{k} {v}" for k, v in figures.items()] + ([rate] if rate else [])
        self.unlogged = f"{self.unit} {self.done}/{self.total}" + (": " + ", ".join(parts) if parts else "")
        if self.logged_at is None or now - self.logged_at >= self.interval_s or self.done >= self.total:
            self._log(now)

    def _log(self, now: float) -> None:
        logger.info(self.unlogged)
        self.logged_at, self.unlogged = now, None

    def close(self) -> None:
        """End the bar, or log the last update if it was not (a run stopped early by --stop-after)."""
        if self.bar is not None:
            self.bar.close()
        elif self.unlogged is not None:
            self._log(time.perf_counter())
