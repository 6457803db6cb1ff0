"""The torchrun runtime: 3 real processes on localhost with gloo, checked against the sim runtime."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import extended, host_config, tiny_config
from safetensors.torch import load_file

from dgpt import api
from dgpt.audit import verify_ledger
from dgpt.runtimes.sim import pretrain_sim
from dgpt.config import dump_config
from dgpt.rundir import RunDir
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint
from dgpt.train.metrics import read_metrics

FED = {"rounds": 3, "inner_steps": 2, "outer_lr": 0.7, "outer_momentum": 0.9}


PROBE = Path(__file__).with_name("torchrun_probe.py")


def torchrun(config_path, *args, nproc=3, timeout=240, launch=("-m", "dgpt"), env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *launch, "pretrain", str(config_path), *args]
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


@pytest.mark.parametrize("aggregator, extrapolate, privacy", [
    ("mean", "none", {}), ("trimmed_mean", "none", {"noise_multiplier": 0.8, "max_grad_norm": 0.5}), ("mean", "fedexp", {}),
])
def test_torchrun_equals_sim(tmp_path, aggregator, extrapolate, privacy):
    fed = {**FED, "aggregator": aggregator, "trim_fraction": 0.34, "extrapolation": extrapolate}
    # FedExP lengthens only updates that disagree: without warmup these oracles' first updates do
    pre = {"warmup_steps": 0} if extrapolate == "fedexp" else {}
    sim = tiny_config(tmp_path / "sim", federation=fed, pretrain=pre, privacy=privacy)
    api.pretrain(sim)
    dist = tiny_config(tmp_path / "dist", federation={**fed, "runtime": "torchrun"}, pretrain=pre, privacy=privacy)
    api.prepare(dist)  # ranks read prepared shards; they never race to write them
    result = torchrun(write_config(dist, tmp_path / "dist.toml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_model(sim, dist)
    sim_rows = [r for r in read_metrics(sim.run_path / "metrics.jsonl") if r["kind"] == "round"]
    dist_rows = [r for r in read_metrics(dist.run_path / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["bytes_total"] for r in sim_rows] == [r["bytes_total"] for r in dist_rows]
    for a, b in zip(sim_rows, dist_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert [a["agreement"] for a in sim_rows[1:]] == pytest.approx([b["agreement"] for b in dist_rows[1:]], rel=1e-4)
    assert [a["outer_scale"] for a in sim_rows[1:]] == pytest.approx([b["outer_scale"] for b in dist_rows[1:]], rel=1e-4)
    assert (max(a["outer_scale"] for a in sim_rows[1:]) > 1) == (extrapolate == "fedexp")
    # DP-SGD: each rank's oracle draws the same Poisson batches and noise as in sim, and spends the same epsilon
    assert [a.get("privacy_epsilon") for a in sim_rows] == [b.get("privacy_epsilon") for b in dist_rows]
    assert bool(sim_rows[-1].get("privacy_epsilon")) == bool(privacy)
    # the contribution ledger: every rank values the same coalitions; rank 0 writes what sim writes, signed by every
    # rank's oracle, and each rank's receipts hold every head
    run = RunDir(dist.run_dir)
    checked = verify_ledger(run.root, [run.receipts(n) for n in dist.oracle_names()], run.keys)
    assert checked.confirmed == {n: list(range(FED["rounds"] + 1)) for n in dist.oracle_names()}
    sim_values, dist_values = verify_ledger(sim.run_dir).oracles, checked.oracles
    for name in sim.oracle_names():
        assert dist_values[name].value == pytest.approx(sim_values[name].value, rel=1e-3, abs=1e-6)
        assert dist_values[name].bytes == sim_values[name].bytes


@pytest.mark.parametrize("kind, dtype, value_bytes", [("int8", "int8", 1), ("bf16", "bfloat16", 2)])
def test_torchrun_sends_compressed_payloads_and_equals_sim(tmp_path, kind, dtype, value_bytes):
    """What each rank hands to the collectives is the encoded payload itself (int8 values + one fp32 scale per
    parameter tensor, or bf16), of exactly the size counted in metrics.jsonl; the model equals sim's."""
    fed = {**FED, "compression": kind}
    sim = tiny_config(tmp_path / "sim", federation=fed)
    torch.set_num_threads(1)  # as each rank runs: the same float sums, so no value lands on the other side of a rounding
    api.pretrain(sim)
    dist = tiny_config(tmp_path / "dist", federation={**fed, "runtime": "torchrun"})
    api.prepare(dist)
    result = torchrun(write_config(dist, tmp_path / "dist.toml"), launch=(str(PROBE), str(tmp_path / "calls")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_model(sim, dist)
    final = weights(dist)
    numel, tensors = sum(t.numel() for t in final.values()), len(final)
    oracle_rows = [r for r in read_metrics(dist.run_path / "metrics.jsonl") if r["kind"] == "oracle"]
    for rank, name in enumerate(dist.oracle_names()):
        calls = json.loads((tmp_path / f"calls.rank{rank}.json").read_text())
        payloads = [c for c in calls if c["numel"] == numel]
        assert [c["dtype"] for c in payloads] == [dtype] * FED["rounds"]  # nothing model-sized travels in fp32
        scales = [c for c in calls if c["dtype"] == "float32" and c["numel"] == tensors] if kind == "int8" else []
        assert len(scales) == (FED["rounds"] if kind == "int8" else 0)
        counted = [r["bytes_sent"] for r in oracle_rows if r["oracle"] == name]
        sent = [p["nbytes"] + (s["nbytes"] if scales else 0) for p, s in zip(payloads, scales or payloads)]
        assert counted == sent == [numel * value_bytes + 4 * tensors * (kind == "int8")] * FED["rounds"]


@pytest.mark.parametrize("factor, aggregator", [("nan", "mean"), ("1000", "median")])
def test_a_lying_rank_is_checked_by_every_receiver(tmp_path, factor, aggregator):
    """Rank 1 sends NaN (which used to crash every rank) or x1000 updates: every rank checks what it received, so the
    run goes on exactly as sim's aggregator would have handled the same oracle."""
    fed = {**FED, "aggregator": aggregator}
    sim = tiny_config(tmp_path / "sim", federation=fed)
    pretrain_sim(sim, tamper=lambda name, delta: delta * float(factor) if name == "beta" else delta)
    dist = tiny_config(tmp_path / "dist", federation={**fed, "runtime": "torchrun"})
    api.prepare(dist)
    result = torchrun(write_config(dist, tmp_path / "dist.toml"), launch=(str(PROBE), str(tmp_path / "calls")),
                      env={"DGPT_PROBE_LIE": f"1:{factor}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_model(sim, dist)
    rows = [r for r in read_metrics(dist.run_path / "metrics.jsonl") if r["kind"] == "round"][1:]
    if factor == "nan":
        assert all(r["rejected"] == ["beta"] for r in rows) and "oracle 'beta' was left out" in result.stderr
    clean = tiny_config(tmp_path / "clean", federation=fed)
    api.pretrain(clean)
    clean_loss = [r for r in read_metrics(clean.run_path / "metrics.jsonl") if r["kind"] == "round"][-1]["loss"]
    assert rows[-1]["loss"] < clean_loss * 1.05


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
def test_torchrun_ranks_leave_no_gloo_threads_to_interpreter_exit(tmp_path):
    """A finished rank has torn its process group down for good before it exits: no gloo thread is left running.
    (The first optimizer imports torch.distributed.nn, whose default arguments held the process group when it was
    imported after init_process_group; gloo's threads then lived until interpreter exit, where a rank of a finished
    run sometimes died in std::terminate, "terminate called without an active exception".)"""
    config = tiny_config(tmp_path, federation={**FED, "rounds": 1, "runtime": "torchrun"})
    api.prepare(config)
    result = torchrun(write_config(config, tmp_path / "c.toml"), launch=(str(PROBE), str(tmp_path / "calls")))
    assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-3000:]
    for rank in range(3):
        threads = json.loads((tmp_path / f"calls.rank{rank}.threads.json").read_text())
        assert not [t for t in threads if "gloo" in t], threads


def test_torchrun_resume_after_interruption_and_extension_equals_sim(tmp_path):
    sim = tiny_config(tmp_path / "sim", federation=FED)
    api.pretrain(sim)
    dist = tiny_config(tmp_path / "dist", federation=FED)  # a sim config: torchrun is detected from the launch
    api.prepare(dist)
    path = write_config(dist, tmp_path / "dist.toml")
    first = torchrun(path, "--stop-after", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert latest_checkpoint(dist.run_path).name == "round_0000001"
    second = torchrun(path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    assert_same_model(sim, dist)
    # the finished run extended to 6 rounds: each rank re-plans its schedule as sim does
    api.pretrain(extended(sim, rounds=6))
    third = torchrun(path, "--set", "federation.rounds=6")
    assert third.returncode == 0, third.stderr[-3000:]
    assert_same_model(sim, dist)
    assert [p.name for p in RunDir(dist.run_dir).list_checkpoints()] == ["round_0000003", "round_0000005", "round_0000006"]


def test_torchrun_world_size_must_match_oracles(tmp_path):
    config = tiny_config(tmp_path, federation={**FED, "runtime": "torchrun"})
    api.prepare(config)
    result = torchrun(write_config(config, tmp_path / "c.toml"), nproc=2)
    assert result.returncode != 0
    assert "torchrun world size 2 does not match the 3 oracles in the config (alpha, beta, gamma)" in result.stderr


def test_torchrun_rank_without_its_shards_says_where_to_prepare(tmp_path):
    config = tiny_config(tmp_path, federation=FED)
    api.prepare(config)
    shutil.rmtree(config.run_path / "data" / "beta")  # this host does not hold beta
    result = torchrun(write_config(config, tmp_path / "c.toml"))
    assert result.returncode != 0
    assert "oracle 'beta' (rank 1): no prepared shards on this host" in result.stderr
    assert "dgpt prepare CONFIG --oracle beta" in result.stderr


def test_torchrun_runtime_without_launch_is_an_error(tmp_path):
    config = tiny_config(tmp_path, federation={**FED, "runtime": "torchrun"})
    path = write_config(config, tmp_path / "c.toml")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    result = subprocess.run([sys.executable, "-m", "dgpt", "pretrain", str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "needs a torchrun launch" in result.stderr


def test_torchrun_failed_rank_names_its_oracle_and_the_run_resumes(tmp_path):
    sim = tiny_config(tmp_path / "sim", federation=FED)
    api.pretrain(sim)
    dist = tiny_config(tmp_path / "dist", federation=FED)
    api.prepare(dist)
    path = write_config(dist, tmp_path / "dist.toml")
    assert torchrun(path, "--stop-after", "1").returncode == 0
    shard = dist.run_path / "data" / "beta" / "train_0000.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2] + bytes([good[-2] ^ 0xFF]) + good[-1:])  # one flipped byte
    failed = torchrun(path)
    assert failed.returncode != 0
    assert f"oracle 'beta' (rank 1): {shard}: sha256 checksum does not match the manifest" in failed.stderr, failed.stderr[-2000:]
    shard.write_bytes(good)
    resumed = torchrun(path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_model(sim, dist)


def test_torchrun_names_the_oracle_whose_rank_vanished(tmp_path):
    """A rank that goes away without a word (its host lost) is named by the others; the run resumes and equals sim."""
    sim = tiny_config(tmp_path / "sim", federation=FED)
    api.pretrain(sim)
    dist = tiny_config(tmp_path / "dist", federation={**FED, "timeout_s": 20})
    api.prepare(dist)
    path = write_config(dist, tmp_path / "dist.toml")
    assert torchrun(path, "--stop-after", "1").returncode == 0
    # the collectives of a round: train losses, payload values, tokens, validation losses; vanish in round 2's payload
    lost = torchrun(path, launch=(str(PROBE), str(tmp_path / "calls")), env={"DGPT_PROBE_VANISH": "2:6"})
    assert lost.returncode != 0
    for rank, oracle in ((0, "alpha"), (1, "beta")):
        assert f"oracle '{oracle}' (rank {rank}): lost contact with the other ranks" in lost.stderr, lost.stderr[-3000:]
    assert "dead or silent: 'gamma' (rank 2)" in lost.stderr
    resumed = torchrun(path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_model(sim, dist)


def two_hosts(paths: list, *args, timeout=240) -> list[tuple[int, str]]:
    """Two torchrun nodes on localhost (static rendezvous: node rank k runs rank k), one rank each, each
    with its own config file; returns (exit status, output) per node."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [open(Path(path).with_suffix(".log"), "w+") for path in paths]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={k}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "dgpt", "pretrain", str(path), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
             for k, (path, log) in enumerate(zip(paths, logs))]
    results = []
    for proc, log in zip(procs, logs):
        proc.wait(timeout=timeout)
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results


def test_two_hosts_without_shared_files_equal_sim(tmp_path):
    """Each host holds one oracle's text and its own run_dir: the tokenizer comes from pre-token counts,
    each host prepares only its oracle, both get the round checkpoints, and the resumed run equals sim."""
    names, docs = ("alpha", "beta"), (120, 80)
    sim = tiny_config(tmp_path / "sim", names=names, docs=docs, federation=FED)
    api.pretrain(sim)
    hosts = {"host0": "alpha", "host1": "beta"}  # node rank k runs rank k, which holds the k-th oracle
    configs = {h: host_config(tmp_path, h, {o}, names=names, docs=docs, federation=FED) for h, o in hosts.items()}
    counts = [str(api.count_pretokens(configs[h], o)) for h, o in hosts.items()]  # what the hosts exchange
    paths = []
    for host, oracle in hosts.items():
        config = dataclasses.replace(configs[host], tokenizer=dataclasses.replace(configs[host].tokenizer, counts=counts))
        api.prepare(config, oracles=[oracle])
        paths.append(write_config(config, tmp_path / f"{host}.toml"))
    for status, out in two_hosts(paths, "--stop-after", "1"):
        assert status == 0, out[-3000:]
    assert [latest_checkpoint(tmp_path / h).name for h in hosts] == ["round_0000001"] * 2

    lost = latest_checkpoint(tmp_path / "host1")
    aside = shutil.move(lost, tmp_path / "aside")
    for status, out in two_hosts(paths):  # host1 lost its checkpoint: it would start over while host0 resumes
        assert status != 0 and "the oracles would resume from different rounds ('alpha' from round 1, 'beta' from round 0)" in out
    shutil.move(aside, lost)

    resumed = two_hosts(paths)
    assert [status for status, _ in resumed] == [0, 0], resumed[1][1][-3000:]
    assert "resumed from" in resumed[0][1]  # rank 0 speaks for the run
    for host in hosts:
        assert_same_model(sim, dataclasses.replace(configs[host], run_dir=str(tmp_path / host)))
    # host1's oracle signed with a key only host1 holds, and its receipts confirm the ledger host0 wrote
    assert not RunDir(tmp_path / "host0").private_key("beta").exists()
    checked = verify_ledger(tmp_path / "host0", [RunDir(tmp_path / "host1").receipts("beta")])
    assert checked.confirmed == {"beta": list(range(FED["rounds"] + 1))}
