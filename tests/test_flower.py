"""The flower runtime on Flower's two engines: the simulation engine (`flwr run APP local`), and the deployment
engine (a SuperLink and one SuperNode per oracle on localhost)."""

from __future__ import annotations

import signal

import pytest

pytest.importorskip("flwr")

from conftest import tiny_config  # noqa: E402
from flower_harness import Deployment, finished, round_done, split_roles, write_node_key, write_tls  # noqa: E402
from test_torchrun import assert_same_model  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.runtimes.flower_app import write_flower_app  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402

FED = {"rounds": 2, "inner_steps": 2, "outer_lr": 0.7, "outer_momentum": 0.9, "eval_interval": 2}


def flower_config(tmp_path, **fed):
    """The deployment's configs. The ledger keeps its records without Shapley values: each coalition's validation
    is a round trip to every SuperNode, a new ClientApp process each (about 10 s here)."""
    config = tiny_config(tmp_path / "fl", federation={**FED, "runtime": "flower", "round_timeout_s": 60, **fed},
                         ledger={"method": "off"})
    api.prepare(config)
    return split_roles(config, tmp_path)


def ledger_values(config) -> list[dict[str, float]]:
    return [{n: o["value"] for n, o in r["oracles"].items()} for r in read_metrics(config.run_path / "ledger.jsonl")[1:]]


def test_flower_simulation_engine_equals_sim(tmp_path):
    """Flower's simulation engine on one machine: one run directory (every oracle's shards, its private states and
    the server's checkpoints), the SuperNodes virtual (SuperNode i is the i-th oracle). Same model, bytes and ledger
    values as sim (to float tolerance: the oracles train in other processes, with other thread counts)."""
    sim = tiny_config(tmp_path / "sim", federation=FED)
    api.pretrain(sim)
    config = tiny_config(tmp_path / "fl", federation={**FED, "runtime": "flower", "round_timeout_s": 60})
    api.prepare(config)
    fed = Deployment(tmp_path / "flwr")
    try:
        fed.simulate(write_flower_app(config), len(config.oracles))
        fed.wait_for(lambda: finished(config.run_dir), 180, "the run", watch=())
    finally:
        fed.close()
    assert_same_model(sim, config)
    rows = [r for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "round"]
    sim_rows = [r for r in read_metrics(sim.run_path / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["bytes_total"] for r in rows] == [r["bytes_total"] for r in sim_rows]
    assert [r["accepted"] for r in rows[1:]] == [["alpha", "beta", "gamma"]] * FED["rounds"]
    for got, want in zip(ledger_values(config), ledger_values(sim), strict=True):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_flower_insecure_equals_sim(tmp_path):
    sim = tiny_config(tmp_path / "sim", federation=FED)
    api.pretrain(sim)
    server, oracles, app = flower_config(tmp_path)
    fed = Deployment(tmp_path / "flwr")
    try:
        fed.launch(app, oracles, server.oracle_names())
        fed.wait_for(lambda: finished(server.run_dir), 240, "the run")
    finally:
        fed.close()
    assert_same_model(sim, server)
    rows = [r for r in read_metrics(server.run_path / "metrics.jsonl") if r["kind"] == "round"]
    sim_rows = [r for r in read_metrics(sim.run_path / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["bytes_total"] for r in rows] == [r["bytes_total"] for r in sim_rows]
    assert rows[-1]["loss"] == pytest.approx(sim_rows[-1]["loss"], rel=1e-4)
    assert rows[0]["loss"] == pytest.approx(sim_rows[0]["loss"], rel=1e-4)


def test_flower_tls_auth_int8_and_an_oracle_that_leaves_and_returns(tmp_path):
    """TLS and SuperNode authentication: an unregistered SuperNode (claiming to be alpha) is refused and the run
    goes on; gamma's SuperNode is killed after round 1, its rounds close without it after round_timeout_s, and
    restarted it is aggregated again; with int8 the bytes of each reply's arrays are the bytes metrics.jsonl counts."""
    server, oracles, app = flower_config(tmp_path, rounds=4, eval_interval=4, compression="int8", round_timeout_s=30,
                                         min_oracles=2)
    keys = {name: write_node_key(tmp_path / "keys", name) for name in (*server.oracle_names(), "intruder")}
    fed = Deployment(tmp_path / "flwr", tls=write_tls(tmp_path / "tls"), auth=True)
    try:
        fed.launch(app, oracles, server.oracle_names(), keys)
        fed.start_supernode("intruder", oracles, "alpha", keys["intruder"][0])
        fed.wait_for(lambda: round_done(server.run_dir, 1), 180, "round 1")
        fed.stop("gamma", signal.SIGTERM)
        fed.wait_for(lambda: round_done(server.run_dir, 2), 120, "round 2")
        fed.start_supernode("gamma", oracles, "gamma", keys["gamma"][0])
        fed.wait_for(lambda: finished(server.run_dir), 180, "the run")
        superlink, intruder = fed.log("superlink"), fed.log("intruder")
    finally:
        fed.close()
    rows = read_metrics(server.run_path / "metrics.jsonl")
    accepted = {r["round"]: r["accepted"] for r in rows if r["kind"] == "round" and r["round"] > 0}
    assert accepted[1] == ["alpha", "beta", "gamma"]
    assert accepted[2] == ["alpha", "beta"]
    assert accepted[4] == ["alpha", "beta", "gamma"]
    gap = [r for r in rows if r["kind"] == "oracle" and r["oracle"] == "gamma" and r["round"] == 2]
    assert gap[0]["participated"] is False and gap[0]["bytes_sent"] == 0
    ledger = read_metrics(server.run_path / "ledger.jsonl")
    assert [r["oracles"]["gamma"]["status"] for r in ledger[1:]] == ["accepted", "absent", "absent", "accepted"]
    assert "alpha" in server.oracle_names() and "intruder" not in (server.run_path / "metrics.jsonl").read_text()
    assert "No SuperNode found with the given public key" in superlink and "SuperNode ID" not in intruder
    log = (server.run_path / "flower_server.log").read_text()
    for r in rows:
        if r["kind"] == "oracle" and r["participated"]:
            assert f"round {r['round']}: oracle '{r['oracle']}' replied with {r['bytes_sent']:,} bytes of arrays" in log
            numel = 27_712  # the tiny model: one int8 per parameter and one fp32 scale per tensor
            assert numel < r["bytes_sent"] < numel + 4 * 40


def test_flower_server_killed_and_restarted_resumes(tmp_path):
    """The SuperLink (and its ServerApp) killed after round 2: restarted and launched again, the run resumes from
    the round 2 checkpoint, the oracles from their states of round 2, and ends with sim's model."""
    fed_config = {**FED, "rounds": 4, "eval_interval": 4}
    sim = tiny_config(tmp_path / "sim", federation=fed_config)
    api.pretrain(sim)
    # a SuperNode may first spend a while on the killed run's last message: the resumed round waits for it
    server, oracles, app = flower_config(tmp_path, rounds=4, eval_interval=4, round_timeout_s=180)
    fed = Deployment(tmp_path / "flwr")
    try:
        fed.launch(app, oracles, server.oracle_names())
        fed.wait_for(lambda: round_done(server.run_dir, 2), 180, "round 2")
        fed.stop("superlink")
        assert not round_done(server.run_dir, 4)
        fed.start_superlink()
        fed.run_app(app)
        fed.wait_for(lambda: finished(server.run_dir), 360, "the resumed run")
    finally:
        fed.close()
    assert "resumed from" in (server.run_path / "flower_server.log").read_text()
    assert_same_model(sim, server)
    rounds = [r["round"] for r in read_metrics(server.run_path / "metrics.jsonl") if r["kind"] == "round"]
    assert rounds == [0, 1, 2, 3, 4]
    assert [r["round"] for r in read_metrics(server.run_path / "ledger.jsonl")] == [0, 1, 2, 3, 4]  # resumed at its head
