"""Progress: a bar on a terminal only; elsewhere periodic one-line log records, and no carriage returns in a log file."""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_config

from dgpt.config import dump_config
from dgpt.progress import Progress

SRC = str(Path(__file__).resolve().parents[1] / "src")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_and_anything_else_log_records(caplog):
    terminal = Terminal()
    bar = Progress(5, 0, "step", interval_s=0, stream=terminal)
    with caplog.at_level(logging.INFO, logger="dgpt"):
        for step in range(1, 6):
            bar.update(100 * step, loss=f"{1 / step:.4f}")
        bar.close()
    assert "\r" in terminal.getvalue() and "5/5" in terminal.getvalue()
    assert caplog.records == []

    piped = io.StringIO()
    with caplog.at_level(logging.INFO, logger="dgpt"):
        bar = Progress(5, 0, "step", interval_s=0, stream=piped)
        for step in range(1, 6):
            bar.update(100 * step, loss=f"{1 / step:.4f}")
        bar.close()
    assert piped.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == [f"step {i}/5" for i in range(1, 6)]
    assert lines[-1].startswith("step 5/5: loss 0.2000, ") and lines[-1].endswith(" tokens/s")


def test_records_are_periodic_and_the_last_update_is_never_lost(caplog):
    with caplog.at_level(logging.INFO, logger="dgpt"):
        bar = Progress(600, 0, "step", interval_s=3600, stream=io.StringIO())
        for step in range(1, 601):
            bar.update(10 * step)
        bar.close()
        stopped = Progress(10, 2, "round", interval_s=3600, tokens=None, stream=io.StringIO())  # resumed at round 2
        for _ in range(3):
            stopped.update(50)
        stopped.close()  # stopped early (--stop-after 5): round 5 is still logged
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["step 1/600", "step 600/600", "round 3/10", "round 5/10"]
    assert lines[2] == "round 3/10"  # the rate of a resumed run is measured from its first update on
    assert lines[3].endswith(" tokens/s")


def run_piped(tmp_path, log, *args):
    """`dgpt pretrain` with stdout and stderr redirected to a file, as under nohup or a scheduler."""
    config = tiny_config(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(dump_config(config))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "dgpt", "pretrain", str(path), *args], stdout=out, stderr=out,
                              env=env, timeout=300)
    text = Path(log).read_text()
    assert done.returncode == 0, text[-3000:]
    return text


def test_a_600_step_run_piped_to_a_file_leaves_no_carriage_returns(tmp_path):
    text = run_piped(tmp_path, tmp_path / "central.log", "--set", "federation.runtime=central", "--set", "pretrain.steps=600",
                     *[f"--set=pretrain.{k}=600" for k in ("eval_interval", "checkpoint_interval", "log_interval")])
    assert "\r" not in text and "\x1b" not in text
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    assert steps[0].startswith("step 1/600: loss ") and steps[-1].startswith("step 600/600: loss ")
    assert all(line.endswith(" tokens/s") for line in steps)
    assert len(text.splitlines()) < 30


def test_federated_rounds_piped_to_a_file(tmp_path):
    text = run_piped(tmp_path, tmp_path / "sim.log", "--set", "log.progress_interval_s=0")
    assert "\r" not in text
    rounds = [line for line in text.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1/3", "round 2/3", "round 3/3"]
    assert all(" train " in line and "alpha " in line and "agreement " in line and line.endswith(" tokens/s") for line in rounds)
