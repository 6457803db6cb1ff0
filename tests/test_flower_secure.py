"""Secure aggregation on Flower (`federation.secure_aggregation`, Flower's SecAgg+): the settings that need single
updates are refused at load; on Flower's simulation engine each round's mean is the plain weighted mean to the
quantisation's bound, the run equals sim's, and the ServerApp never receives an oracle's unmasked update."""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from conftest import strategy, tiny_config
from dgpt import api
from dgpt.audit import verify_ledger
from dgpt.config import config_from_dict, load_config
from dgpt.config_shared import shared_toml, with_local
from dgpt.errors import DgptError
from dgpt.rundir import WEIGHTS, RunDir
from dgpt.train.checkpoint import load_weights_into
from dgpt.train.metrics import read_metrics

SECURE = {"oracles": [{"name": "alpha"}, {"name": "beta"}],
          "federation": {"runtime": "flower", "secure_aggregation": True}, "ledger": {"method": "off"}}


@pytest.mark.parametrize("section, key, value, match", [
    ("federation", "aggregator", "median", "'federation.aggregator' = 'median' cannot go with federation.secure_aggregation"),
    ("federation", "norm_filter", 3.0, "'federation.norm_filter' = 3.0 cannot go"),
    ("federation", "min_cosine", 0.0, "'federation.min_cosine' = 0.0 cannot go"),
    ("federation", "clip_norm", 1.0, "'federation.clip_norm' = 1.0 cannot go"),
    ("federation", "extrapolation", "fedexp", "'federation.extrapolation' = 'fedexp' cannot go"),
    ("federation", "compression", "int8", "'federation.compression' = 'int8' cannot go"),
    ("ledger", "method", "shapley", "'ledger.method' = 'shapley' cannot go"),
    ("ledger", "method", "first_order", "'ledger.method' = 'first_order' cannot go"),
    ("federation", "runtime", "sim", "'federation.secure_aggregation' is Flower's SecAgg\\+: set federation.runtime = 'flower'"),
    ("secagg", "modulus_range", 1 << 24, "'secagg.modulus_range' 16777216 must exceed the 2 oracles"),
    ("secagg", "modulus_range", 3 << 30, "'secagg.modulus_range' must be a power of 2 up to 2\\*\\*32"),
    ("secagg", "quantization_range", 1 << 31, "'secagg.quantization_range' must be in \\[2, 2\\*\\*31\\)"),
    ("secagg", "clipping_range", 0.0, "'secagg.clipping_range' must be > 0"),
    ("secagg", "reconstruction_threshold", 1.5, "'secagg.reconstruction_threshold' must be a fraction"),
    ("secagg", "num_shares", 0.0, "'secagg.num_shares' must be a fraction"),
])
def test_secure_aggregation_refuses_what_needs_single_updates(section, key, value, match):
    data = copy.deepcopy(SECURE)
    data.setdefault(section, {})[key] = value
    with pytest.raises(DgptError, match=f"^<test>: {match}") as refused:
        config_from_dict(data, "<test>")
    assert "\n" not in str(refused.value)


def test_secure_aggregation_settings_are_shared(tmp_path):
    """One oracle alone has no sum to hide in; the [secagg] settings travel with the server's shared settings, and a
    SuperNode's own file cannot change them."""
    with pytest.raises(DgptError, match="needs at least 2 oracles"):
        config_from_dict({**SECURE, "oracles": [{"name": "alpha"}]}, "<test>")
    server = config_from_dict({**SECURE, "secagg": {"quantization_range": 1 << 20}}, "<test>")
    assert "secure_aggregation = true" in shared_toml(server) and "quantization_range = 1048576" in shared_toml(server)
    own = tmp_path / "own.toml"
    own.write_text('[[oracles]]\nname = "alpha"\n[federation]\nsecure_aggregation = false\n[secagg]\nclipping_range = 9.0\n')
    mine = with_local(shared_toml(server), load_config(own), "alpha")
    assert mine.federation.secure_aggregation and mine.secagg == server.secagg


def test_a_masked_mean_is_checked_and_applied_as_a_whole():
    """The Strategy takes a secure round's mean as one update (weights as for the plain mean); a mean of the wrong shape,
    not finite, or with a refused oracle's update inside moves nothing, and every oracle in it is rejected."""
    s = strategy({"alpha": 1.0, "beta": 3.0}, 4)
    assert s.shares(["alpha", "beta"]) == {"alpha": 0.25, "beta": 0.75}
    taken = s.aggregate_sum(torch.ones(4), ["alpha", "beta"], {"alpha": 99, "beta": 99})
    assert taken.accepted == ["alpha", "beta"] and torch.equal(taken.update, torch.ones(4)) and not taken.skipped
    for update, problem, why in ((torch.ones(3), "", r"float32 \(4,\)"), (torch.tensor([1.0, float("nan"), 0, 0]), "", "NaN"),
                                 (torch.ones(4), "oracle 'alpha': statement refused", "statement refused"), (None, "", "no mean")):
        spoiled = s.aggregate_sum(update, ["alpha", "beta"], {}, problem)
        assert spoiled.update is None and spoiled.accepted == [] and set(spoiled.rejected) == {"alpha", "beta"}
        assert re.search(why, spoiled.skipped) and spoiled.skipped.endswith("Theta did not move")


# FedAvg (outer lr 1, no momentum): Theta moves by exactly the round's mean, which the test reads back from the Thetas.
# A coarse quantisation (step 2c/T = 6e-5): its error stands far above float rounding, and is seen, not only bounded.
FEDAVG = {"rounds": 2, "inner_steps": 2, "outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": False, "eval_interval": 2}
COARSE = {"clipping_range": 0.5, "quantization_range": 1 << 14}


def _theta(config, rnd: int) -> np.ndarray:
    """The flat Theta of a run's round checkpoint (the order of the model's parameters, as Flower messages carry it)."""
    from dgpt.runtimes.flower.server import server_work

    work = server_work(config, "pretrain")
    load_weights_into(work.model, RunDir(config.run_dir).checkpoint("round", rnd) / WEIGHTS, work.model.config)
    return parameters_to_vector(work.params).detach().double().numpy()


def _vectors(folder: Path, numel: int) -> list[np.ndarray]:
    """Every byte string the ServerApp received, read as a vector of the model's size where it is one (a NumPy array,
    as SecAgg+'s masked vectors travel, or raw float32, as dgpt's arrays do)."""
    found = []
    for path in sorted(folder.glob("*.bin")):
        data = path.read_bytes()
        if data.startswith(b"\x93NUMPY"):
            array = np.load(io.BytesIO(data), allow_pickle=False)
        elif len(data) == 4 * numel:
            array = np.frombuffer(data, dtype=np.float32)
        else:
            continue
        if array.size == numel:
            found.append(array.reshape(-1))
    return found


def test_secure_aggregation_on_the_simulation_engine_equals_sim(tmp_path):
    """Three oracles, two rounds on Flower's simulation engine with SecAgg+, instrumented (tests/flower_secure_probe.py);
    gamma drops out of round 2 after sharing its keys, which alpha's and beta's shares make up for (2 of 3):
    - each round's mean (Theta before minus Theta after, FedAvg) is the weighted mean of the oracles' true updates
      (written aside on their SuperNodes) to `mean_error_bound`: n oracles' stochastic roundings of under one step 2c/T
      each, over the summed quantised weights (plus float32 rounding of Theta); and the error is there (over a tenth of
      the bound): the mean went through the quantisation;
    - round 1's Theta equals sim's to that bound plus the plain flower-vs-sim float tolerance;
    - nothing the ServerApp received is an oracle's update, its weighted update, or its quantised form (masked: at
      chance level, ~1e-9 of coordinates within a step);
    - the ledger keeps each oracle's signed statement, its receipts confirm every record."""
    pytest.importorskip("flwr")
    from flower_harness import Deployment, finished

    from dgpt.runtimes.flower.app import write_flower_app
    from dgpt.runtimes.flower.secure import mean_error_bound, quantised

    sim = tiny_config(tmp_path / "sim", federation=FEDAVG, ledger={"method": "off"})
    api.pretrain(sim)
    config = tiny_config(tmp_path / "fl", federation={**FEDAVG, "runtime": "flower", "round_timeout_s": 60,
                                                      "secure_aggregation": True}, ledger={"method": "off"}, secagg=COARSE)
    api.prepare(config)
    app, probe = write_flower_app(config), tmp_path / "probe"
    shutil.copy(Path(__file__).with_name("flower_secure_probe.py"), app)
    text = (app / "pyproject.toml").read_text().replace("dgpt.runtimes.flower.server:app", "flower_secure_probe:probe_server")
    text = text.replace("dgpt.runtimes.flower.client:app", "flower_secure_probe:probe_client")
    (app / "pyproject.toml").write_text(text + f'probe = "{probe}"\ndrop = "2:2"\n')  # the file ends in [tool.flwr.app.config]
    fed = Deployment(tmp_path / "flwr")
    try:
        fed.simulate(app, len(config.oracles))
        fed.wait_for(lambda: finished(config.run_dir), 180, "the run", watch=())
    finally:
        fed.close()

    sa, names, eps = config.secagg, config.oracle_names(), np.finfo(np.float32).eps
    took = {1: names, 2: names[:2]}
    aside = {(n, r): np.load(probe / "client" / f"{n}_{r}.npz") for r, ns in took.items() for n in ns}
    assert not (probe / "client" / "gamma_2.npz").exists()
    thetas = [aside[names[0], 1]["theta"].astype(np.float64), aside[names[0], 2]["theta"].astype(np.float64), _theta(config, 2)]
    for rnd, ns in took.items():
        assert all(np.array_equal(aside[n, rnd]["theta"], aside[names[0], rnd]["theta"]) for n in ns)
        weights = [float(aside[n, rnd]["weight"]) for n in ns]
        assert max(weights) == 1.0  # the largest share is quantised to the whole range
        q = quantised(weights, sa)
        exact = sum(w * aside[n, rnd]["delta"].astype(np.float64) for w, n in zip(q, ns)) / sum(q)
        mean = thetas[rnd - 1] - thetas[rnd]
        bound = mean_error_bound(weights, sa) + eps * (np.abs(thetas[rnd]).max() + np.abs(mean).max())
        error = np.abs(mean - exact).max()
        assert bound / 10 < error <= bound, (rnd, error, bound)
    one = thetas[1] - _theta(sim, 1)
    tolerance = mean_error_bound([float(aside[n, 1]["weight"]) for n in names], sa) + 1e-5 + 1e-4 * np.abs(_theta(sim, 1))
    assert (np.abs(one) <= tolerance).all()

    step, numel = 2 * sa.clipping_range / sa.quantization_range, thetas[0].size
    received = _vectors(probe / "server", numel)
    assert sum(v.dtype.kind in "iu" for v in received) == len(aside)  # each masked vector sent
    for (name, rnd), kept in aside.items():
        x, w = kept["delta"].astype(np.float64), float(kept["weight"])
        levels = (np.clip(quantised([w], sa)[0] * x, -sa.clipping_range, sa.clipping_range) + sa.clipping_range) / step
        for v in received:
            masked, v = v.dtype.kind in "iu", v.astype(np.float64)
            if masked:
                apart = np.abs((v - levels + sa.modulus_range / 2) % sa.modulus_range - sa.modulus_range / 2)
                assert np.mean(apart <= 1) < 1e-3, (name, rnd)
            for candidate in (x, w * x):
                assert np.mean(np.abs(v - candidate) <= step) < 1e-3, (name, rnd)

    ledger = read_metrics(config.run_path / "ledger.jsonl")
    for record, ns in zip(ledger[1:], took.values(), strict=True):
        assert record["secure_aggregation"] is True
        assert {n: o["status"] for n, o in record["oracles"].items()} == {n: "accepted" if n in ns else "absent" for n in names}
        assert all("statement" in o and "payload_sha256" not in o and o["bytes"] > 4 * numel
                   for n, o in record["oracles"].items() if n in ns)
    run = RunDir(config.run_dir)
    checked = verify_ledger(run.root, [run.receipts(n) for n in names], run.keys)
    assert checked.confirmed == {"alpha": [0, 1, 2], "beta": [0, 1, 2], "gamma": [0, 2]}  # gamma dropped with head 1
    log = run.server_log.read_text()
    assert "round 2: a SuperNode failed in secure aggregation" in log and "round 2: oracle 'gamma' sat this round out" in log
    assert torch.isfinite(torch.from_numpy(thetas[2])).all()
