"""The flower runtime on Flower's deployment engine: a SuperLink and one SuperNode per oracle on localhost."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("flwr")

from conftest import tiny_config  # noqa: E402
from flower_harness import Deployment, finished, round_done, write_node_key, write_tls  # noqa: E402
from test_torchrun import assert_same_model, write_config  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.runtimes.flower_app import write_flower_app  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402

FED = {"rounds": 2, "inner_steps": 2, "outer_lr": 0.7, "outer_momentum": 0.9, "eval_interval": 2}


def flower_config(tmp_path, **fed):
    """The server's config and the oracles' config (one prepared run_dir their SuperNodes share; each keeps its
    own state under oracles/<name>/), and the Flower App."""
    config = tiny_config(tmp_path / "fl", federation={**FED, "runtime": "flower", "round_timeout_s": 60, **fed})
    api.prepare(config)
    path = write_config(config, tmp_path / "oracles.toml")
    server = dataclasses.replace(config, run_dir=str(tmp_path / "server"))
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "tokenizer.json").write_bytes((config.run_path / "tokenizer.json").read_bytes())
    return server, path, write_flower_app(server, write_config(server, tmp_path / "server.toml"))


def test_flower_insecure_equals_sim(tmp_path):
    sim = tiny_config(tmp_path / "sim", federation=FED)
    api.pretrain(sim)
    server, oracles, app = flower_config(tmp_path)
    fed = Deployment(tmp_path / "flwr")
    try:
        fed.start_superlink()
        for name in server.oracle_names():
            fed.start_supernode(name, oracles, name)
        fed.run_app(app)
        fed.wait_for(lambda: finished(server.run_dir), 240, "the run")
    finally:
        fed.close()
    assert_same_model(sim, server)
    rows = [r for r in read_metrics(server.run_path / "metrics.jsonl") if r["kind"] == "round"]
    sim_rows = [r for r in read_metrics(sim.run_path / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["bytes_total"] for r in rows] == [r["bytes_total"] for r in sim_rows]
    assert rows[-1]["loss"] == pytest.approx(sim_rows[-1]["loss"], rel=1e-4)
    assert rows[0]["loss"] == pytest.approx(sim_rows[0]["loss"], rel=1e-4)
