"""Seconds per round spent outside training (orchestration + transfer) for sim, torchrun and flower on localhost.

Tiny model, 3 oracles, fp32 and int8. A round's wall time is T(H) = overhead + H * (time per inner step), so each
runtime runs at two values of H and the overhead is the intercept. Rounds that validate are left out (the last).
Flower's deployment engine: one SuperLink and three SuperNodes (insecure) on this machine, the ClientApp a new process
per message. Flower's simulation engine (`flwr run APP local`): three virtual SuperNodes whose ClientApps run in
long-lived Ray worker processes. Then the deployment engine with the Shapley ledger on, at 3 and 5 oracles: the
ledger's share of a round (every coalition validated in one message to each SuperNode).

Run alone on the machine (~40 min on 2 CPU cores): python benchmarks/runtime_overhead.py
Smoke run (the deployment engine only, 3 rounds, a report in a temporary directory): ... --quick
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


def round_seconds(run_dir: Path) -> float:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "round" and 0 < r["round"] < ROUNDS]
    return statistics.median(r["seconds"] for r in rows)


def ledger_seconds(run_dir: Path) -> float:
    rows = [r for r in read_metrics(run_dir / "ledger.jsonl") if r.get("kind") == "round" and 0 < r["round"] < ROUNDS]
    return statistics.median(r["cost"]["seconds"] for r in rows)


RUNTIMES = {"sim": "sim", "torchrun": "torchrun", "flower": "flower", "flower (simulation engine)": "flower"}


def run(label: str, compression: str, steps: int, root: Path, oracles: int = 3, ledger: str = "off") -> float:
    """The median seconds of a round; `ledger` "off": orchestration only, no Shapley valuation."""
    runtime = RUNTIMES[label]
    fed = {"rounds": ROUNDS, "inner_steps": steps, "eval_interval": ROUNDS, "compression": compression,
           "runtime": runtime, "round_timeout_s": 120}
    config = tiny_config(root, names=NAMES[:oracles], docs=(120, 80, 160, 100, 140)[:oracles], federation=fed,
                         ledger={"method": ledger})
    api.prepare(config)
    if runtime == "sim":
        api.pretrain(config)
    elif runtime == "torchrun":
        path = root / "config.toml"
        path.write_text(dump_config(config))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "dgpt",
                        "-q", "pretrain", str(path)], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")})
    else:
        deployment = Deployment(root / "flwr")
        deployment.env["PYTHONPATH"] = str(ROOT / "src")
        try:
            if label == "flower":
                server, oracles, app = split_roles(config, root)
                deployment.launch(app, oracles, config.oracle_names())
                deployment.wait_for(lambda: finished(server.run_dir), 900, "the run")
                return round_seconds(server.run_path)
            deployment.simulate(write_flower_app(config), len(config.oracles))
            deployment.wait_for(lambda: finished(config.run_dir), 900, "the run", watch=())
        finally:
            deployment.close()
    return round_seconds(config.run_path)


def ledger_rows(sizes: tuple[int, ...]) -> list[list[str]]:
    """The deployment engine with the Shapley ledger on: seconds per round, the ledger's seconds, its share."""
    rows = []
    for oracles in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = run("flower", "none", LEDGER_STEPS, Path(tmp), oracles, "shapley")
            valued = ledger_seconds(Path(tmp) / "server")
        rows.append([str(oracles), f"{seconds:.2f}", f"{valued:.2f}", f"{valued / seconds:.0%}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    global ROUNDS, STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the deployment engine only, 3 rounds, no report kept")
    quick = parser.parse_args().quick
    if quick:
        ROUNDS, STEPS, RUNTIMES_RUN, COMPRESSIONS, SIZES = 3, (1, 2), ["flower"], ("none",), (3,)
    else:
        RUNTIMES_RUN, COMPRESSIONS, SIZES = list(RUNTIMES), ("none", "int8"), (3, 5)
    rows, load = [], machine_load()
    for runtime in RUNTIMES_RUN:
        for compression in COMPRESSIONS:
            times = {}
            for steps in STEPS:
                with tempfile.TemporaryDirectory() as tmp:
                    times[steps] = run(runtime, compression, steps, Path(tmp))
            per_step = (times[STEPS[1]] - times[STEPS[0]]) / (STEPS[1] - STEPS[0])
            overhead = times[STEPS[0]] - STEPS[0] * per_step
            rows.append([runtime, "fp32" if compression == "none" else compression, f"{times[STEPS[0]]:.2f}",
                         f"{times[STEPS[1]]:.2f}", f"{per_step:.3f}", f"{overhead:.2f}"])
            print(rows[-1], flush=True)
    headers = ["runtime", "payload", f"s/round, H={STEPS[0]}", f"s/round, H={STEPS[1]}", "s per inner step (all oracles)",
               "s/round outside training"]
    intro = (f"Tiny model (2 layers, d_model 32, 27,712 parameters), 3 oracles, {ROUNDS} rounds; median wall seconds of the "
             "rounds that do not validate, at two H; overhead = the intercept of T(H). sim trains the oracles one after "
             "another, torchrun and flower side by side (3 processes on a 2-core machine). Flower starts a new ClientApp "
             "process (Python, torch, the model and the oracle's state from disk) for every message: that is most of its "
             "overhead. Its simulation engine keeps each virtual SuperNode's ClientApp in a long-lived Ray worker (no process "
             "start per message; the oracle's state still goes through its disk, as on a SuperNode). "
             f"Load at the start: `{load}`.")
    ledger = table(["oracles", f"s/round, H={LEDGER_STEPS}", "of which the Shapley ledger", "ledger's share"],
                   ledger_rows(SIZES))
    write_report("runtime_overhead", "Seconds per round outside training: sim, torchrun, flower (both engines)", intro,
                 [table(headers, rows), "", "Flower's deployment engine with the Shapley ledger on (exact values: every "
                  "coalition validated in one message to each SuperNode):", "", ledger],
                 Path(tempfile.mkdtemp()) if quick else RESULTS)


if __name__ == "__main__":
    main()
