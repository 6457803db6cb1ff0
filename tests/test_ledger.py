"""The contribution ledger: Shapley values (efficiency, symmetry), the hash chain and its check against checkpoints."""

import json

import pytest
import torch
from conftest import tiny_config

from dgpt.audit import verify_ledger
from dgpt.cli import main
from dgpt.config import FederationConfig
from dgpt.errors import DgptError
from dgpt.federation.codec import Codec
from dgpt.federation.shapley import CachedValue, exact_shapley, sampled_shapley
from dgpt.federation.strategy import Strategy
from dgpt.rundir import WEIGHTS, RunDir
from dgpt.runtimes.sim import pretrain_sim


def records(config):
    return [json.loads(line) for line in RunDir(config.run_dir).ledger.read_text().splitlines()]


def comparable(rows):
    """Records without what differs between two run directories (their config's hash, hence every link and every
    statement's genesis; the keys and signatures) and the time they took."""
    def body(signed):
        return {k: v for k, v in json.loads(signed["body"]).items() if k != "genesis"}

    def oracle(row):
        return {**row, **({"statement": body(row["statement"])} if "statement" in row else {}),
                **({"reports": [body(r) for r in row["reports"]]} if "reports" in row else {})}

    return [{k: ({n: oracle(o) for n, o in v.items()} if k == "oracles" and isinstance(v, dict) else v)
             for k, v in r.items() if k not in ("cost", "prev", "config_sha256", "keys")} for r in rows]


def quadratic_round(deltas, **fed):
    """A Strategy at Theta = 0 with the loss ||Theta - target||^2, and v(S) = loss(Theta) - loss(Theta after S)."""
    numel = 6
    strategy = Strategy(FederationConfig(**fed), Codec("none", [numel]), dict.fromkeys(deltas, 1.0), torch.zeros(numel), 0)
    target = torch.linspace(-1, 1, numel)
    loss = lambda theta: float(((theta - target) ** 2).sum())  # noqa: E731
    v = CachedValue(lambda s: loss(strategy.theta) - loss(strategy.preview({n: deltas[n] for n in deltas if n in s})))
    return strategy, v


@pytest.mark.parametrize("fed", [{}, {"aggregator": "median"}, {"outer_momentum": 0.0, "outer_lr": 1.0, "extrapolation": "fedexp"}])
def test_shapley_efficiency_and_symmetry(fed):
    torch.manual_seed(0)
    twin = torch.randn(6)
    deltas = {"a": twin, "b": twin.clone(), "c": torch.randn(6), "d": -torch.randn(6)}
    strategy, v = quadratic_round(deltas, **fed)
    phi = exact_shapley(list(deltas), v)
    assert sum(phi.values()) == pytest.approx(v(frozenset(deltas)), abs=1e-9)  # efficiency: they share the whole gain
    assert phi["a"] == pytest.approx(phi["b"], abs=1e-9)  # symmetry: identical updates, identical value
    assert v.evaluations == 2 ** len(deltas) - 1
    # the coalition of everyone is the round the Strategy then applies, bit for bit
    result = strategy.aggregate({n: strategy.codec.encode(d) for n, d in deltas.items()})
    full = strategy.preview(result.deltas)
    assert torch.equal(full, strategy.apply(result, 1))


def test_sampled_shapley_estimates_the_exact_values():
    torch.manual_seed(1)
    deltas = {name: torch.randn(6) * (i + 1) / 4 for i, name in enumerate("abcdefg")}
    _, v = quadratic_round(deltas, outer_momentum=0.0, outer_lr=1.0)
    exact = exact_shapley(list(deltas), v)
    mean, stderr = sampled_shapley(list(deltas), v, 200, torch.Generator().manual_seed(0))
    for name in deltas:
        assert abs(mean[name] - exact[name]) < 5 * stderr[name] + 1e-9


def test_sim_ledger_values_every_round_and_resumes_exactly(tmp_path):
    fed = {"rounds": 3, "inner_steps": 2, "drop_prob": 0.3}
    full = tiny_config(tmp_path / "full", federation=fed)
    pretrain_sim(full)
    rows = records(full)
    assert rows[0]["kind"] == "genesis" and [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        values = [o["value"] for o in row["oracles"].values() if o["status"] == "accepted"]
        assert sum(values) == pytest.approx(row["value"]["full"], abs=1e-6)  # efficiency, per round
        assert all("value" not in o and o["bytes"] == 0 for o in row["oracles"].values() if o["status"] == "absent")
        # 2^k - 1 coalitions; the baseline at Theta is the driver's own validation of the previous round
        assert row["cost"]["evaluations"] == 2 ** len(values) - 1
    assert any(o["status"] == "absent" for row in rows[1:] for o in row["oracles"].values())
    cut = tiny_config(tmp_path / "cut", federation=fed)
    pretrain_sim(cut, stop_after_round=1)
    pretrain_sim(cut)
    assert comparable(records(cut)) == comparable(rows)
    assert verify_ledger(cut.run_dir).rounds == 3


def test_a_skipped_rounds_updates_are_carried_valued_and_resumed_exactly(tmp_path):
    """median over three oracles that each miss half the rounds: a round with fewer than 3 accepted updates makes no
    step and holds them; the next round combines them with its own (status `carried` in the ledger, valued like the
    rest). A run stopped right after a skipped round resumes with the held updates to the same records."""
    fed = {"rounds": 6, "inner_steps": 1, "drop_prob": 0.5, "aggregator": "median"}
    full = tiny_config(tmp_path / "full", federation=fed)
    pretrain_sim(full)
    rows = records(full)[1:]
    skipped = [r["round"] for r in rows if r["theta_before"] == r["theta_after"]]
    carrying = [r for r in rows if any(o["status"] == "carried" for o in r["oracles"].values())]
    assert skipped and carrying and all(r["round"] - 1 in skipped for r in carrying)
    stepped = [r for r in carrying if r["round"] not in skipped]
    assert stepped
    for row in stepped:
        valued = [o["value"] for o in row["oracles"].values() if o["status"] in ("accepted", "carried")]
        assert len(valued) >= 3 and sum(valued) == pytest.approx(row["value"]["full"], abs=1e-6)
        assert all(o["bytes"] == 0 for o in row["oracles"].values() if o["status"] == "carried")  # sent in an earlier round
    cut = tiny_config(tmp_path / "cut", federation=fed)
    pretrain_sim(cut, stop_after_round=stepped[-1]["round"] - 1)  # a skipped round: its updates held in the checkpoint
    pretrain_sim(cut)
    assert comparable(records(cut)) == comparable(records(full))
    assert verify_ledger(cut.run_dir).rounds == 6


def test_ledger_command_detects_one_byte_edits(tmp_path, capsys):
    config = tiny_config(tmp_path, federation={"rounds": 3, "inner_steps": 1})
    pretrain_sim(config)
    run = RunDir(config.run_dir)
    assert main(["ledger", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert "ledger intact: 3 rounds, 2 round checkpoints match" in out and "alpha" in out
    totals = json.loads((main(["ledger", str(run.root), "--json"]), capsys.readouterr().out)[1])["oracles"]
    assert sum(t["share"] for t in totals.values()) == pytest.approx(1.0)
    lines = run.ledger.read_text().splitlines()
    for i, line in enumerate(lines):  # one digit of every record changed in turn
        at = max(k for k, ch in enumerate(line) if ch.isdigit() and line[k - 1] == ":")
        edited = line[:at] + str((int(line[at]) + 1) % 10) + line[at + 1:]
        run.ledger.write_text("\n".join(lines[:i] + [edited] + lines[i + 1:]) + "\n")
        with pytest.raises(DgptError, match="round"):
            verify_ledger(run.root)
    run.ledger.write_text("\n".join(lines) + "\n")
    weights = run.latest_checkpoint() / WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[:-9] + bytes([good[-9] ^ 1]) + good[-8:])
    assert main(["ledger", str(run.root)]) == 2
    assert "round 3: the checkpoint's weights" in capsys.readouterr().err


def test_ledger_off_writes_records_without_values(tmp_path):
    config = tiny_config(tmp_path, federation={"rounds": 2, "inner_steps": 1}, ledger={"method": "off"})
    pretrain_sim(config)
    rows = records(config)
    assert len(rows) == 3 and all("value" not in r and r["cost"]["evaluations"] == 0 for r in rows[1:])
    assert all("value" not in o and o["tokens"] > 0 for r in rows[1:] for o in r["oracles"].values())
    assert verify_ledger(config.run_dir).oracles["beta"].value == 0.0


def test_validation_gradient_matches_finite_differences(tmp_path):
    """The first-order ledger's gradient: <g, d> equals the validation loss's slope along d."""
    from dgpt.runtimes.federated import copy_into, pretraining_work
    from dgpt.runtimes.sim import SimTransport

    config = tiny_config(tmp_path, federation={"rounds": 1, "inner_steps": 1})
    work = pretraining_work(config, SimTransport(), config.oracle_names())
    theta = torch.cat([p.detach().flatten() for p in work.params]).double()
    grads = work.gradient()
    direction = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-2
    eps = 1e-1

    def losses_at(vector):
        copy_into(work.params, vector.float())
        return {n: m["loss"] for n, m in work.evaluate().items()}

    plus, minus = losses_at(theta + eps * direction), losses_at(theta - eps * direction)
    for name, g in grads.items():
        slope = (plus[name] - minus[name]) / (2 * eps)
        assert float(g.double() @ direction) == pytest.approx(slope, rel=2e-2)


def test_first_order_ledger_tracks_the_evaluated_values(tmp_path):
    """ledger.method = "first_order": one gradient pass per round, values that add up to the round's linearised gain
    and agree with the exact (evaluated) Shapley values of the same rounds."""
    fed = {"rounds": 3, "inner_steps": 2, "outer_lr": 0.5, "outer_momentum": 0.0}
    exact = tiny_config(tmp_path / "exact", federation=fed)
    first = tiny_config(tmp_path / "first", federation=fed, ledger={"method": "first_order"})
    pretrain_sim(exact)
    pretrain_sim(first)
    for e, f in zip(records(exact)[1:], records(first)[1:]):
        assert f["theta_after"] == e["theta_after"]  # valuing does not change training
        assert f["cost"]["evaluations"] == 1 and f["value"]["method"] == "first_order"
        values = {n: o["value"] for n, o in f["oracles"].items()}
        assert sum(values.values()) == pytest.approx(f["value"]["full"], abs=1e-6)
        assert min(values, key=values.get) == min(e["oracles"], key=lambda n: e["oracles"][n]["value"])
        for name, o in e["oracles"].items():
            assert values[name] == pytest.approx(o["value"], rel=0.25)
    assert verify_ledger(first.run_dir).rounds == 3
