"""The torchrun runtime: 3 real processes on localhost with gloo, checked against the sim runtime."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import quiet, tiny_config
from safetensors.torch import load_file

from dgpt import api
from dgpt.config import dump_config
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint
from dgpt.train.metrics import read_metrics

FED = {"rounds": 3, "inner_steps": 2, "outer_lr": 0.7, "outer_momentum": 0.9}


def torchrun(config_path, *args, nproc=3, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dgpt", "pretrain", str(config_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def write_config(config, path):
    path.write_text(dump_config(config))
    return path


def weights(config):
    return load_file(str(latest_checkpoint(config.run_path) / WEIGHTS))


def assert_same_model(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregator", ["mean", "trimmed_mean"])
def test_torchrun_equals_sim(tmp_path, aggregator):
    fed = {**FED, "aggregator": aggregator, "trim_fraction": 0.34}
    sim = tiny_config(tmp_path / "sim", federation=fed)
    api.pretrain(sim, log=quiet)
    dist = tiny_config(tmp_path / "dist", federation={**fed, "runtime": "torchrun"})
    api.prepare(dist, log=quiet)  # ranks read prepared shards; they never race to write them
    result = torchrun(write_config(dist, tmp_path / "dist.toml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_model(sim, dist)
    sim_rows = [r for r in read_metrics(sim.run_path / "metrics.jsonl") if r["kind"] == "round"]
    dist_rows = [r for r in read_metrics(dist.run_path / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["bytes_total"] for r in sim_rows] == [r["bytes_total"] for r in dist_rows]
    for a, b in zip(sim_rows, dist_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert [a["agreement"] for a in sim_rows[1:]] == pytest.approx([b["agreement"] for b in dist_rows[1:]], rel=1e-4)


def test_torchrun_resume_after_interruption_equals_sim(tmp_path):
    sim = tiny_config(tmp_path / "sim", federation=FED)
    api.pretrain(sim, log=quiet)
    dist = tiny_config(tmp_path / "dist", federation=FED)  # a sim config: torchrun is detected from the launch
    api.prepare(dist, log=quiet)
    path = write_config(dist, tmp_path / "dist.toml")
    first = torchrun(path, "--stop-after", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert latest_checkpoint(dist.run_path).name == "round_0000001"
    second = torchrun(path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    assert_same_model(sim, dist)


def test_torchrun_world_size_must_match_oracles(tmp_path):
    config = tiny_config(tmp_path, federation={**FED, "runtime": "torchrun"})
    api.prepare(config, log=quiet)
    result = torchrun(write_config(config, tmp_path / "c.toml"), nproc=2)
    assert result.returncode != 0
    assert "torchrun world size 2 does not match the 3 oracles in the config (alpha, beta, gamma)" in result.stderr


def test_torchrun_runtime_without_launch_is_an_error(tmp_path):
    config = tiny_config(tmp_path, federation={**FED, "runtime": "torchrun"})
    path = write_config(config, tmp_path / "c.toml")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    result = subprocess.run([sys.executable, "-m", "dgpt", "pretrain", str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "needs a torchrun launch" in result.stderr


def test_torchrun_failed_rank_names_its_oracle_and_the_run_resumes(tmp_path):
    sim = tiny_config(tmp_path / "sim", federation=FED)
    api.pretrain(sim, log=quiet)
    dist = tiny_config(tmp_path / "dist", federation=FED)
    api.prepare(dist, log=quiet)
    path = write_config(dist, tmp_path / "dist.toml")
    assert torchrun(path, "--stop-after", "1").returncode == 0
    shard = dist.run_path / "data" / "beta" / "train_0000.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2] + bytes([good[-2] ^ 0xFF]) + good[-1:])  # one flipped byte
    failed = torchrun(path)
    assert failed.returncode != 0
    assert f"{shard}: sha256 mismatch" in failed.stderr or "beta" in failed.stderr, failed.stderr[-2000:]
    shard.write_bytes(good)
    resumed = torchrun(path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_model(sim, dist)
