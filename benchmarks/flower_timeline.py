"""Where a round's seconds go on Flower's deployment engine, from the timestamps of one run's logs (one machine).

For each round's train messages, the oracle whose answer reached the ServerApp last (the round's critical path):
the ServerApp's line for the wave ("N of N oracle(s) answered the train messages in D s": pushed D s before it),
its SuperNode's "Receiving: train message" (Flower's own line, timestamped with FLWR_LOG_LEVEL=DEBUG), the
ClientApp's lines ("trained H steps in T s", "answered the train message in W s, A s after its ClientApp process
started"), and the ServerApp's next push.
"""

from __future__ import annotations

import re
import statistics
from datetime import datetime
from pathlib import Path

STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PHASES = {
    "pickup": "message pushed -> its SuperNode pulls it (its pull loop sleeps 3 s whenever it finds none waiting)",
    "spawn": "pulled -> the ClientApp process starts (the SuperExec's poll for work, then the process launch)",
    "start": "process start -> dgpt's handler runs (Python, flwr and torch imports, the task pulled from the SuperNode)",
    "setup": "dgpt's handler other than training (config, tokenizer check, shards, model, the oracle's state, signing)",
    "train": "training: H inner steps (the first also imports torch's compiler stack, which torch.optim loads)",
    "return": "answer -> the ServerApp has it (pushed to the SuperNode, its 0.5 s reply poll, the SuperLink, the "
              "ServerApp's 0.05 s poll)",
    "server": "the ServerApp until it pushes the next round (aggregation, ledger record, checkpoint, metrics)",
}


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _waves(server_log: Path) -> dict[int, tuple[float, float]]:
    """round -> (pushed, last answer) of its train messages."""
    found = {}
    for line in server_log.read_text().splitlines():
        m = re.match(STAMP + r" INFO round (\d+): \d+ of \d+ oracle\(s\) answered the train messages in ([\d.]+) s", line)
        if m:
            end = _time(m[1])
            found[int(m[2])] = (end - float(m[3]), end)
    return found


def _node(log: Path) -> dict[int, dict[str, float]]:
    """round -> when the SuperNode pulled its train message, the ClientApp's process started, its handler began and
    answered, and the seconds it trained."""
    rounds: dict[int, dict[str, float]] = {}
    current = None
    for line in ANSI.sub("", log.read_text(errors="replace")).splitlines():
        if m := re.search(r"\[RUN \d+, ROUND (\d+)\]", line):
            current = int(m[1])
        elif (m := re.search(STAMP + r":?\s+Receiving: train message", line)) and current is not None:
            rounds.setdefault(current, {})["received"] = _time(m[1])
        elif m := re.match(STAMP + r" INFO round (\d+): oracle '[^']+' trained \d+ steps in ([\d.]+) s", line):
            rounds.setdefault(int(m[2]), {})["train"] = float(m[3])
        elif m := re.match(STAMP + r" INFO round (\d+): oracle '[^']+' answered the train message in ([\d.]+) s, "
                                   r"([\d.]+) s after its ClientApp process started", line):
            t = rounds.setdefault(int(m[2]), {})
            t["answered"] = _time(m[1])
            t["entered"] = t["answered"] - float(m[3])
            t["started"] = t["entered"] - float(m[4])
    return rounds


def phase_seconds(server_log: Path, node_logs: dict[str, Path], rounds: range) -> dict[str, list[float]]:
    """Each phase's seconds in each of `rounds` (those whose next round trained too), and the rounds' totals."""
    waves, nodes = _waves(server_log), {name: _node(path) for name, path in node_logs.items()}
    found: dict[str, list[float]] = {p: [] for p in [*PHASES, "round"]}
    keys = {"received", "started", "entered", "answered", "train"}
    for rnd in rounds:
        answers = {n: t[rnd] for n, t in nodes.items() if keys <= set(t.get(rnd, {}))}
        if rnd not in waves or rnd + 1 not in waves or not answers:
            continue
        (pushed, ended), t = waves[rnd], max(answers.values(), key=lambda a: a["answered"])
        phases = {"pickup": t["received"] - pushed, "spawn": t["started"] - t["received"],
                  "start": t["entered"] - t["started"], "setup": t["answered"] - t["entered"] - t["train"],
                  "train": t["train"], "return": ended - t["answered"], "server": waves[rnd + 1][0] - ended}
        for phase, seconds in phases.items():
            found[phase].append(seconds)
        found["round"].append(sum(phases.values()))
    return found


def markdown_rows(found: dict[str, list[float]]) -> list[list[str]]:
    if not found["round"]:
        return [["(no round had every timestamp: is FLWR_LOG_LEVEL=DEBUG set on the SuperNodes?)", "-"]]
    rows = [[PHASES[p], f"{statistics.median(found[p]):.2f}"] for p in PHASES]
    return rows + [[f"a round (the phases' sum; {len(found['round'])} rounds)", f"{statistics.median(found['round']):.2f}"]]
