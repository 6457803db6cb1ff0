"""The flower runtime on Flower's two engines: the simulation engine (`flwr run APP local`), and the deployment
engine (a SuperLink and one SuperNode per oracle on localhost). Every ClientApp message on the deployment engine
is a new process (about 5 s of imports on a busy machine), so its tests keep to few rounds."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import warnings

import pytest
import torch

pytest.importorskip("flwr")

from conftest import extended, rounds, tiny_config  # noqa: E402
from flower_harness import (Deployment, finished, node_dir, round_done, split_roles, two_hosts, write_node_key,  # noqa: E402
                            write_tls)
from test_finetune import ft_config, head_of  # noqa: E402
from test_torchrun import assert_same_model  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.audit import verify_ledger  # noqa: E402
from dgpt.config import dump_config  # noqa: E402
from dgpt.errors import DgptError  # noqa: E402
from dgpt.rundir import RunDir  # noqa: E402
from dgpt.runtimes.flower.app import write_flower_app  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402

FED = {"rounds": 2, "inner_steps": 2, "outer_lr": 0.7, "outer_momentum": 0.9, "eval_interval": 2}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """The sim runtime's run of FED, which every Flower run of the same config must equal."""
    config = tiny_config(tmp_path_factory.mktemp("sim"), federation=FED)
    api.pretrain(config)
    return config


def flower_config(tmp_path, **fed):
    """The deployment's configs. The ledger keeps its records without Shapley values: each coalition's validation
    is a round trip to every SuperNode, a new ClientApp process each. The SuperNodes' own file says 1 round and
    another learning rate: the server's shared settings are the ones they train with."""
    config = tiny_config(tmp_path / "fl", federation={**FED, "runtime": "flower", "round_timeout_s": 60, **fed},
                         ledger={"method": "off"})
    api.prepare(config)
    server, oracles, app = split_roles(config, tmp_path)
    drifted = dataclasses.replace(server, run_dir=config.run_dir, federation=dataclasses.replace(config.federation, rounds=1),
                                  pretrain=dataclasses.replace(config.pretrain, lr=0.5))  # the parties' public keys kept
    oracles.write_text(dump_config(drifted))
    return server, oracles, app


def ledger_values(config) -> list[dict[str, float]]:
    return [{n: o["value"] for n, o in r["oracles"].items()} for r in read_metrics(config.run_path / "ledger.jsonl")[1:]]


def simulate(tmp_path, config, finetune: bool = False, runs: int = 1) -> None:
    """`flwr run APP local` with one virtual SuperNode per oracle, until the ServerApp is done (`runs`: its how many
    times in this run directory)."""
    fed = Deployment(tmp_path / "flwr")
    try:
        fed.simulate(write_flower_app(config, finetune), len(config.oracles))
        fed.wait_for(lambda: finished(config.run_dir, runs), 180, "the run", watch=())
    finally:
        fed.close()


def test_flower_finetune_on_the_simulation_engine_equals_sim(tmp_path, sim):
    """DSFT over Flower, with DP-SGD: three oracles with three kinds of task; each head stays in its oracle's state,
    only the body is aggregated. Body, heads, validation metrics and the epsilon each oracle reports equal sim's (the
    ClientApp is the deployment engine's too)."""
    kinds, privacy = ("classification", "entailment", "multiple_choice"), {"noise_multiplier": 1.0}
    ft_sim = ft_config(tmp_path / "sim", sim.run_path, kinds, ledger={"method": "off"}, privacy=privacy)
    api.finetune(ft_sim)
    config = ft_config(tmp_path / "fl", sim.run_path, kinds, ledger={"method": "off"}, privacy=privacy,
                       federation={"runtime": "flower", "round_timeout_s": 60})
    simulate(tmp_path, config, finetune=True)
    assert_same_model(ft_sim, config)
    for name in kinds:
        for key, tensor in head_of(ft_sim, name).items():
            torch.testing.assert_close(head_of(config, name)[key], tensor, rtol=1e-4, atol=1e-5)
    rows, sim_rows = rounds(config), rounds(ft_sim)
    assert [r["round"] for r in rows] == [r["round"] for r in sim_rows] == [0, 1, 2]
    assert [r.get("privacy_epsilon") for r in rows] == [r.get("privacy_epsilon") for r in sim_rows]
    assert set(rows[-1]["privacy_epsilon"]) == set(kinds)
    for row, sim_row in zip(rows, sim_rows):
        assert set(row["metrics"]) == set(kinds)
        for name in kinds:
            assert row["metrics"][name] == pytest.approx(sim_row["metrics"][name], rel=1e-3, abs=1e-4)


def test_flower_simulation_engine_equals_sim_and_extends_a_finished_run(tmp_path):
    """Flower's simulation engine on one machine: one run directory (every oracle's shards, its private states and
    the server's checkpoints), the SuperNodes virtual (SuperNode i is the i-th oracle). A 3-round run has the same
    model, bytes and ledger values as sim (to float tolerance: the oracles train in other processes, with other
    thread counts), every statement and loss report signed on its SuperNode and every head kept as each oracle's
    receipt. Raised to 6 rounds, the server resumes from its round-3 checkpoint (kept through rotation), each oracle
    from its state with its schedule re-planned: the model equals sim's extended run, ends no worse than the 3-round
    run and within 2% of a fresh 6-round run."""
    fed = {**FED, "rounds": 3, "eval_interval": 3}
    sim = tiny_config(tmp_path / "sim", federation=fed)
    api.pretrain(sim)
    fresh = tiny_config(tmp_path / "fresh", federation={**fed, "rounds": 6}, ledger={"method": "off"})
    api.pretrain(fresh)
    config = tiny_config(tmp_path / "fl", federation={**fed, "runtime": "flower", "round_timeout_s": 60})
    api.prepare(config)
    simulate(tmp_path, config)
    assert_same_model(sim, config)
    log = (config.run_path / "flower_server.log").read_text()
    assert "round 3's model validated by each oracle on its own data:" in log
    assert "round 3's model delivered to 3 of 3 oracles' run directories" in log  # the server's checkpoint, kept as it is
    rows, sim_rows = rounds(config), rounds(sim)
    assert [r["bytes_total"] for r in rows] == [r["bytes_total"] for r in sim_rows]
    assert [r["accepted"] for r in rows[1:]] == [["alpha", "beta", "gamma"]] * fed["rounds"]
    for got, want in zip(ledger_values(config), ledger_values(sim), strict=True):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-5)
    run = RunDir(config.run_dir)
    checked = verify_ledger(run.root, [run.receipts(n) for n in config.oracle_names()], run.keys)
    assert checked.confirmed == {n: list(range(fed["rounds"] + 1)) for n in config.oracle_names()}
    three = rows[-1]["loss"]
    api.pretrain(extended(sim, rounds=6))
    longer = extended(config, rounds=6)
    simulate(tmp_path, longer, runs=2)
    assert_same_model(sim, longer)
    assert [r["round"] for r in rounds(longer)] == [0, 1, 2, 3, 4, 5, 6]
    assert rounds(longer)[-1]["loss"] <= min(three, 1.02 * rounds(fresh)[-1]["loss"])
    assert [p.name for p in RunDir(config.run_dir).list_checkpoints()] == ["round_0000003", "round_0000005", "round_0000006"]


def test_flower_on_two_hosts_equals_sim_across_a_killed_superlink_then_an_oracle_leaves_and_returns(tmp_path, sim):
    """Two hosts: the SuperLink (and the flwr CLI, and the ServerApp it starts) in one network namespace, the
    SuperNodes in another, joined by a veth pair with private addresses; TLS with a certificate for the SuperLink's
    address, SuperNode authentication on: an unregistered SuperNode (claiming to be alpha) is refused and the run goes
    on. The SuperLink (and its ServerApp) killed after round 1: restarted and launched again, the run resumes from the
    round 1 checkpoint, the oracles from their states of round 1, and ends with sim's model and bytes. Every
    organisation's run directory then holds the final model, where `dgpt eval` scores it on its own data as the
    federated evaluation (`dgpt flower-app --eval`) did. Then the run, extended to 4 rounds with int8 updates: gamma's
    SuperNode stops (SIGTERM) as round 3 begins, so the SuperLink answers round 3's message to it with an error and
    the round closes without it; restarted at once, gamma is aggregated again in round 4; the bytes of each int8 reply's arrays are the bytes
    metrics.jsonl counts. Where namespaces cannot be made (no root), the same runs on localhost, with a warning."""
    server, oracles, app = flower_config(tmp_path)
    names = server.oracle_names()
    with contextlib.ExitStack() as stack:
        hosts, why = stack.enter_context(two_hosts())
        if hosts is None:
            warnings.warn(f"two hosts could not be made ({why}): the deployment runs on localhost")
        tls = write_tls(tmp_path / "tls", ("127.0.0.1", hosts.server_ip) if hosts else ("127.0.0.1",))
        keys = {name: write_node_key(tmp_path / "keys", name) for name in (*names, "intruder")}
        fed = Deployment(tmp_path / "flwr", tls=tls, auth=True, hosts=hosts)
        stack.callback(fed.close)
        fed.launch(app, oracles, names, {n: keys[n] for n in names})
        fed.start_supernode("intruder", oracles, "alpha", keys["intruder"][0])
        fed.wait_for(lambda: round_done(server.run_dir, 1), 180, "round 1")
        fed.stop("superlink")
        assert not round_done(server.run_dir, 2)
        fed.start_superlink()
        fed.stop_runs()
        fed.run_app(app)
        fed.wait_for(lambda: finished(server.run_dir), 240, "the resumed run")
        fed.run_app(write_flower_app(server, evaluate=True))
        fed.wait_for(lambda: finished(server.run_dir, 2), 120, "the federated evaluation")
        _two_rounds_equal_sim(server, oracles, sim)
        fed.run_app(write_flower_app(extended(server, rounds=4, compression="int8")))
        fed.wait_for(lambda: "resumed from" in server.run_path.joinpath("flower_server.log").read_text().split("delivered to")[-1],
                     120, "the extension to resume")  # round 3's messages go out now
        fed.stop("gamma", signal.SIGTERM)
        fed.start_supernode("gamma", oracles, "gamma", keys["gamma"][0])
        fed.wait_for(lambda: finished(server.run_dir, 3), 240, "the extension")
        superlink, intruder = fed.log("superlink"), fed.log("intruder")
    assert "No SuperNode found with the given public key" in superlink and "SuperNode ID" not in intruder
    assert "intruder" not in (server.run_path / "metrics.jsonl").read_text()
    rows = read_metrics(server.run_path / "metrics.jsonl")
    accepted = [r["accepted"] for r in rows if r["kind"] == "round" and r["round"] > 0]
    assert accepted[-2:] == [["alpha", "beta"], ["alpha", "beta", "gamma"]]
    gap = [r for r in rows if r["kind"] == "oracle" and r["oracle"] == "gamma" and r["round"] == 3]
    assert gap[0]["participated"] is False and gap[0]["bytes_sent"] == 0
    ledger = read_metrics(server.run_path / "ledger.jsonl")
    assert [r["oracles"]["gamma"]["status"] for r in ledger[1:]] == ["accepted", "accepted", "absent", "accepted"]
    log = (server.run_path / "flower_server.log").read_text()
    assert "round 3: oracle 'gamma' sat this round out" in log
    for r in rows:
        if r["kind"] == "oracle" and r["participated"] and r["round"] > 2:
            assert f"round {r['round']}: oracle '{r['oracle']}' replied with {r['bytes_sent']:,} bytes of arrays" in log
            numel = 27_712  # the tiny model: one int8 per parameter and one fp32 scale per tensor
            assert numel < r["bytes_sent"] < numel + 4 * 40
    # each SuperNode signed with its own key; its receipts, kept across the restarts, confirm the server's ledger
    checked = verify_ledger(server.run_dir, [RunDir(node_dir(oracles, n)).receipts(n) for n in names])
    assert checked.confirmed == {n: [0, 1, 2, 3, 4] for n in names}


def _two_rounds_equal_sim(server, oracles, sim) -> None:
    """The resumed 2-round run, and each organisation's evaluation of its model, equal sim's."""
    log = (server.run_path / "flower_server.log").read_text()
    table = log.split("round 2's model validated by each oracle on its own data:")[-1]
    for name in server.oracle_names():
        org = api.load_run_config(node_dir(oracles, name))
        assert org.federation.rounds == FED["rounds"] and org.pretrain.lr == server.pretrain.lr  # the server's settings
        scores = api.evaluate(org).scores
        assert list(scores) == [name]  # its own data only
        assert any(line.split()[-5:-3] == [name, "loss"] and f"loss {scores[name]['loss']:.4f}" in line for line in table.splitlines())
        assert scores[name]["loss"] == pytest.approx(rounds(sim)[-1]["oracles"][name], rel=1e-4)
    with pytest.raises(DgptError, match="holds no oracle's data"):
        api.evaluate(server)
    assert "resumed from" in log
    assert_same_model(sim, server)
    rows, sim_rows = rounds(server), rounds(sim)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["bytes_total"] for r in rows] == [r["bytes_total"] for r in sim_rows]
    assert rows[-1]["loss"] == pytest.approx(sim_rows[-1]["loss"], rel=1e-4)
    assert rows[0]["loss"] == pytest.approx(sim_rows[0]["loss"], rel=1e-4)
    assert [r["round"] for r in read_metrics(server.run_path / "ledger.jsonl")] == [0, 1, 2]  # resumed at its head
