"""Seconds per round spent outside training (orchestration + transfer) for sim, torchrun and flower on localhost.

Tiny model, 3 oracles, fp32 and int8. A round's wall time is T(H) = overhead + H * (time per inner step), so each
runtime runs at two values of H and the overhead is the intercept. Rounds that validate are left out (the last).
Flower's deployment engine: one SuperLink and three SuperNodes (insecure) on this machine, the ClientApp a new process
per message. Flower's simulation engine (`flwr run APP local`): three virtual SuperNodes whose ClientApps run in
long-lived Ray worker processes. Then the deployment engine with the Shapley ledger off and on, at 3 and 5 oracles:
the ledger's share of a round. Then where a deployment round's seconds go (`flower_timeline`). Every table has the
previous report's figure of the same row beside the new one.

Run alone on the machine (~20 min on 2 CPU cores): python benchmarks/runtime_overhead.py
The flower rows only (~17 min; the other rows are kept from the previous report): ... --flower
Smoke run (the deployment engine only, 4 rounds, the ledger at 5 oracles, a report in a temporary directory, ~5 min):
... --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import RESULTS, machine_load, table, write_report
from flower_timeline import markdown_rows, phase_seconds

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from conftest import tiny_config  # noqa: E402
from flower_harness import Deployment, finished, split_roles  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.config import dump_config  # noqa: E402
from dgpt.runtimes.flower.app import write_flower_app  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402

ROUNDS, STEPS, LEDGER_STEPS = 5, (1, 6), 6
NAMES = ("alpha", "beta", "gamma", "delta", "epsilon")
RUNTIMES = {"sim": "sim", "torchrun": "torchrun", "flower": "flower", "flower (simulation engine)": "flower"}
HEADERS = ["runtime", "payload", "s/round, H={}", "s/round, H={}", "s per inner step (all oracles)",
           "s/round outside training", "previous report"]
LEDGER_HEADERS = ["oracles", "s/round, ledger off", "s/round, Shapley ledger", "ledger's share", "previous report"]


def round_seconds(run_dir: Path) -> float:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "round" and 0 < r["round"] < ROUNDS]
    return statistics.median(r["seconds"] for r in rows)


def deploy(config, root: Path, debug: bool = False) -> Path:
    """The run on Flower's deployment engine (a SuperLink, a SuperNode per oracle); the server's run directory.
    `debug`: Flower's processes log with timestamps (FLWR_LOG_LEVEL=DEBUG), for `flower_timeline`."""
    deployment = Deployment(root / "flwr")
    deployment.env.update({"PYTHONPATH": str(ROOT / "src"), **({"FLWR_LOG_LEVEL": "DEBUG"} if debug else {})})
    try:
        server, oracles, app = split_roles(config, root)
        deployment.launch(app, oracles, config.oracle_names())
        deployment.wait_for(lambda: finished(server.run_dir), 900, "the run")
    finally:
        deployment.close()
    return server.run_path


def run(label: str, compression: str, steps: int, root: Path, oracles: int = 3, ledger: str = "off") -> float:
    """The median seconds of a round; `ledger` "off": orchestration only, no Shapley valuation."""
    runtime = RUNTIMES[label]
    config = setup(root, runtime, steps, oracles, ledger, compression)
    if runtime == "sim":
        api.pretrain(config)
    elif runtime == "torchrun":
        path = root / "config.toml"
        path.write_text(dump_config(config))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "dgpt",
                        "-q", "pretrain", str(path)], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")})
    elif label == "flower":
        return round_seconds(deploy(config, root))
    else:
        deployment = Deployment(root / "flwr")
        deployment.env["PYTHONPATH"] = str(ROOT / "src")
        try:
            deployment.simulate(write_flower_app(config), len(config.oracles))
            deployment.wait_for(lambda: finished(config.run_dir), 900, "the run", watch=())
        finally:
            deployment.close()
    return round_seconds(config.run_path)


def setup(root: Path, runtime: str, steps: int, oracles: int = 3, ledger: str = "off", compression: str = "none"):
    """The prepared tiny config: validation only in the last round (which `round_seconds` leaves out)."""
    fed = {"rounds": ROUNDS, "inner_steps": steps, "eval_interval": ROUNDS, "compression": compression,
           "runtime": runtime, "round_timeout_s": 120}
    config = tiny_config(root, names=NAMES[:oracles], docs=(120, 80, 160, 100, 140)[:oracles], federation=fed,
                         ledger={"method": ledger})
    api.prepare(config)
    return config


def previous(path: Path) -> dict[str, dict[tuple[str, ...], list[str]]]:
    """The tables of the report this run replaces, by their last header (each row by its first cells): the "previous
    report" columns."""
    tables, key = {}, None
    for line in path.read_text().splitlines() if path.is_file() else []:
        if not line.startswith("|"):
            key = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-"}:  # the line under the headers
            continue
        if key is None:
            key = cells[-2] if cells[-1] == "previous report" else cells[-1]
            tables[key] = {}
        else:
            tables[key][(cells[0],) if key == "ledger's share" else tuple(cells[:2])] = cells
    return tables


def overhead_rows(labels: list[str], compressions: tuple[str, ...], before: dict) -> list[list[str]]:
    rows = []
    for label in labels:
        for compression in compressions:
            times = {}
            for steps in STEPS:
                with tempfile.TemporaryDirectory() as tmp:
                    times[steps] = run(label, compression, steps, Path(tmp))
            per_step = (times[STEPS[1]] - times[STEPS[0]]) / (STEPS[1] - STEPS[0])
            payload = "fp32" if compression == "none" else compression
            old = before.get((label, payload))
            rows.append([label, payload, f"{times[STEPS[0]]:.2f}", f"{times[STEPS[1]]:.2f}", f"{per_step:.3f}",
                         f"{times[STEPS[0]] - STEPS[0] * per_step:.2f}", old[5] if old else "-"])
            print(rows[-1], flush=True)
    return rows


def ledger_rows(sizes: tuple[int, ...], before: dict) -> list[list[str]]:
    """The deployment engine at H=LEDGER_STEPS with the ledger off, then on: the ledger's share is the part of a
    round that it adds (its coalitions' validation rides on the next messages to the oracles)."""
    rows = []
    for oracles in sizes:
        seconds = {}
        for ledger in ("off", "shapley"):
            with tempfile.TemporaryDirectory() as tmp:
                seconds[ledger] = round_seconds(deploy(setup(Path(tmp), "flower", LEDGER_STEPS, oracles, ledger), Path(tmp)))
        share = (seconds["shapley"] - seconds["off"]) / seconds["shapley"]
        old = before.get((str(oracles),))
        rows.append([str(oracles), f"{seconds['off']:.2f}", f"{seconds['shapley']:.2f}", f"{share:.0%}", old[3] if old else "-"])
        print(rows[-1], flush=True)
    return rows


def timeline_rows() -> list[list[str]]:
    """Where the seconds of a deployment round go: one run (3 oracles, H=1) with Flower's timestamps on."""
    with tempfile.TemporaryDirectory() as tmp:
        config = setup(Path(tmp), "flower", STEPS[0])
        server = deploy(config, Path(tmp), debug=True)
        found = phase_seconds(server / "flower_server.log", {n: Path(tmp) / "flwr" / f"{n}.log" for n in config.oracle_names()},
                              range(1, ROUNDS - 1))
    return markdown_rows(found)


def main() -> None:
    global ROUNDS, STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the deployment engine only, 4 rounds, no report kept")
    parser.add_argument("--flower", action="store_true", help="the flower rows only; the others kept from the previous report")
    args = parser.parse_args()
    before = previous(RESULTS / "runtime_overhead.md")
    labels, compressions, sizes = list(RUNTIMES), ("none", "int8"), (3, 5)
    if args.quick:
        ROUNDS, STEPS, labels, compressions, sizes = 4, (1, 2), ["flower"], ("none",), (5,)
    elif args.flower:
        labels = ["flower"]
    load = machine_load()
    old_rows = before.get("s/round outside training", {})
    new, rows = overhead_rows(labels, compressions, old_rows), []
    for label in RUNTIMES:  # a runtime not run again (--flower): its rows as the previous report had them
        rows += [r for r in new if r[0] == label] or [[*c[:6], "not run again"] for k, c in old_rows.items() if k[0] == label]
    ledger = ledger_rows(sizes, before.get("ledger's share", {}))
    phases = timeline_rows()
    headers = [h.format(s) if "{}" in h else h for h, s in zip(HEADERS, (None, None, *STEPS, None, None, None))]
    intro = (f"Tiny model (2 layers, d_model 32, 27,712 parameters), 3 oracles, {ROUNDS} rounds; median wall seconds of the "
             "rounds that do not validate, at two H; overhead = the intercept of T(H). sim trains the oracles one after "
             "another, torchrun and flower side by side (3 processes on a 2-core machine). On Flower's deployment engine "
             "each SuperNode starts a new ClientApp process (Python, flwr, torch, the model and the oracle's state from "
             "disk) for every message, and its pull loop sleeps 3 s whenever it finds no message waiting (flwr 1.42, "
             "not configurable): a round cannot take less than that sleep plus a process start, and the last table "
             "shows where the rest goes. Each SuperNode runs with FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 (README). "
             "Flower's simulation engine keeps each virtual SuperNode's ClientApp in a long-lived Ray worker (no "
             "process start per message; the oracle's state still goes through its disk, as on a SuperNode). "
             f"\"previous report\": the figure the report before this one had in the same row. Load at the start: `{load}`.")
    write_report("runtime_overhead", "Seconds per round outside training: sim, torchrun, flower (both engines)", intro,
                 [table(headers, rows), "",
                  f"Flower's deployment engine, H={LEDGER_STEPS}, with the Shapley ledger off and on (exact values; each "
                  "round's coalition Thetas ride on the next messages to the oracles: the next round's train messages, or "
                  "the round's validation); the ledger's share is the part of a round it adds:", "",
                  table(LEDGER_HEADERS, ledger), "",
                  f"Where a round's seconds go on the deployment engine (3 oracles, H={STEPS[0]}, ledger off; median over "
                  "rounds of the train message of the oracle that answered last, i.e. the round's critical path; "
                  "Flower's own timestamps with FLWR_LOG_LEVEL=DEBUG):", "",
                  table(["phase", "seconds"], phases)],
                 Path(tempfile.mkdtemp()) if args.quick else RESULTS)


if __name__ == "__main__":
    main()
