"""`benchmarks/gpu_check.sh --smoke`: the GPU checks run end to end on the CPU at tiny sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (SHARED_DATA / "pretrain").is_dir(), reason="needs ../shared/data/pretrain (the DUPT step)")
def test_gpu_check_smoke_runs_end_to_end_on_cpu():
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check --smoke: ok" in done.stdout
    assert "dgpt / faster peer" in done.stdout and "dgpt / transformers" in done.stdout
