"""Shared helpers of the speed benchmarks: interleaved A/B timing, child-process peak RSS, markdown output.

The machine these run on is shared, so every comparison alternates its sides (A B, B A, A B, ...) and keeps
the median of the repeats: background load then hits every side alike. Results files record `uptime`.

Importing this module sets OMP_WAIT_POLICY=PASSIVE (unless set) for this process and its children, so import
it before torch: on a shared, oversubscribed machine OpenMP's spinning worker threads made a 2-thread
training step up to 10x slower than 1 thread (tiny model, load 8 on 2 cores: 8.1 s vs 0.8 s passive).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch initialises OpenMP
RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(sides: dict[str, Callable[[], object]], repeats: int, calls: int = 1) -> dict[str, float]:
    """Median seconds per call of each side (see `interleaved_times`)."""
    return {n: statistics.median(t) for n, t in interleaved_times(sides, repeats, calls).items()}


def interleaved_times(sides: dict[str, Callable[[], object]], repeats: int, calls: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each side in every round: `repeats` rounds, each side `calls` times per round,
    the order of the sides reversed every other round so drifting background load is shared."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            for _ in range(calls):
                sides[name]()
            times[name].append((time.perf_counter() - t0) / calls)
    return times


def run_measured(cmd: list[str], env: dict | None = None, children: bool = False) -> tuple[float, float, int, str]:
    """Run `cmd` in a fresh process: (wall seconds, peak RSS in MiB of that process, exit code, output).

    The peak is the process's own VmHWM, read every 20 ms until it exits: its rusage ru_maxrss would not do, since
    Linux carries the high-water mark of the memory it replaced at exec into it, i.e. this (torch-importing) process's.
    With `children`, the peak of the summed VmRSS of it and every process it started, read at the same times (at
    least the largest VmHWM of any one of them): what they held together at their fullest.
    """
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        peak = 0.0
        while not (done := os.wait4(proc.pid, os.WNOHANG))[0]:
            pids = [proc.pid, *(_descendants(proc.pid) if children else [])]
            peak = max(peak, sum(_status_mib(pid, "VmRSS:") for pid in pids), *(_status_mib(pid, "VmHWM:") for pid in pids))
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(done[1])
        out.seek(0)
        return seconds, peak, proc.returncode, out.read().decode(errors="replace")


def _status_mib(pid: int, field: str) -> float:
    """A memory field of a running process's /proc status (VmHWM: its peak RSS) in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) / 1024 for line in status if line.startswith(field)), 0.0)
    except OSError:
        return 0.0


def _descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (Linux /proc; [] where it cannot tell)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        return []
    return found + [d for child in found for d in _descendants(child)]


def python_child(*args: str) -> list[str]:
    return [sys.executable, *args]


def machine_load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load averages (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


SETTLE_S = int(os.environ.get("DGPT_SETTLE_S", "120"))  # 0 for smoke runs, whose load nobody reads


def settled_load() -> str:
    """`machine_load` after SETTLE_S idle seconds: the 1-minute average has mostly forgotten the benchmark's own
    threads, while other jobs, had any run alongside it, would still be counted."""
    time.sleep(SETTLE_S)
    return machine_load()


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats keep what `fmt` gave them (pass strings for custom formats)."""
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def write_report(name: str, title: str, intro: str, sections: list[str], out: Path = RESULTS) -> Path:
    """Write out/name.md: title, intro, machine load at the start and end, then the sections; print it too."""
    out.mkdir(parents=True, exist_ok=True)
    import torch

    head = [f"# {title}", "", intro, "",
            f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. "
            f"Load {SETTLE_S} s after the run (its own threads idle): `{settled_load()}`", ""]
    text = "\n".join(head + sections) + "\n"
    path = out / f"{name}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")
    return path
