"""`--set federation.runtime=central` on a federated config: a baseline that trains the federated run's tokens."""

from conftest import tiny_config

from dgpt.cli import main
from dgpt.config import dump_config, load_config
from dgpt.runtimes.central import central_schedule
from dgpt.train.metrics import read_metrics


def last(rows, kind):
    return [r for r in rows if r["kind"] == kind][-1]


def test_central_at_equal_tokens_is_one_flag_away(tmp_path, capsys):
    config = tiny_config(tmp_path, pretrain={"steps": 0})  # steps left to be derived, as in a federated config
    path = tmp_path / "fed.toml"
    path.write_text(dump_config(config))
    assert main(["pretrain", str(path), "--set", f"run_dir={tmp_path / 'sim'}"]) == 0
    assert main(["pretrain", str(path), "--set", f"run_dir={tmp_path / 'central'}", "--set", "federation.runtime=central"]) == 0
    err = capsys.readouterr().err
    assert "central baseline at the federated run's tokens: 6 steps (3 rounds x 2 inner steps) of 3 x 4 windows" in err
    sim, central = read_metrics(tmp_path / "sim" / "metrics.jsonl"), read_metrics(tmp_path / "central" / "metrics.jsonl")
    assert last(central, "train")["step"] == 6
    assert last(central, "valid")["tokens"] == last(sim, "round")["tokens"] > 0


def test_steps_the_user_set_are_kept(tmp_path, caplog):
    config = load_config(None, ["federation.runtime=central", "pretrain.steps=50", "federation.rounds=4", "federation.inner_steps=5",
                                "pretrain.grad_accum=2"])
    assert central_schedule(config) is config.pretrain and caplog.records == []
    three = 'oracles=[{name = "a"}, {name = "b"}, {name = "c"}]'
    derived = central_schedule(load_config(None, ["federation.rounds=4", "federation.inner_steps=5", "pretrain.grad_accum=2", three]))
    assert (derived.steps, derived.grad_accum, derived.batch_size) == (20, 6, 16)
