"""`dgpt plot`: PNGs from central, federated and fine-tuning metrics, labeled with what they show; several runs
overlaid into --out; clear errors without metrics."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

pytest.importorskip("matplotlib")

from dgpt import api  # noqa: E402
from dgpt.cli import main  # noqa: E402
from dgpt.config import dump_config  # noqa: E402
from dgpt.plot import read_run, run_charts  # noqa: E402
from dgpt.plot_compare import overlay_charts, run_names  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_pngs(folder, names, printed) -> None:
    for name in names:
        path = folder / name
        assert path.is_file(), f"{name} missing; printed: {printed}"
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        assert str(path) in printed


def plot(run_dir, names, capsys, *args) -> None:
    assert main(["plot", str(run_dir), *args]) == 0
    assert_pngs(run_dir / "plots", names, capsys.readouterr().out)


def charts(run_dir) -> dict:
    return {c.name: c for c in run_charts(read_run(run_dir)) if any(c.series.values())}


@pytest.fixture(scope="module")
def sim_and_central(tmp_path_factory):
    """A federated run and its central baseline at equal tokens (pretrain.steps = 0: derived)."""
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for runtime in ("sim", "central"):
        config = tiny_config(root / runtime, federation={"runtime": runtime}, pretrain={"steps": 0, "eval_interval": 2})
        api.pretrain(config)
        runs.append(config.run_path)
    return runs


def test_plot_federated_run(sim_and_central, capsys):
    run = sim_and_central[0]
    plot(run, ["valid_loss.png", "valid_loss_vs_tokens.png", "valid_loss_vs_bytes.png", "train_loss.png", "agreement.png",
               "contribution.png"], capsys)
    assert not (run / "plots" / "outer_scale.png").exists()  # no extrapolation, nothing to draw
    drawn = charts(run)
    assert drawn["valid_loss_vs_bytes"].xlabel.startswith("bytes communicated") and drawn["valid_loss_vs_bytes"].logx
    assert drawn["valid_loss"].ylabel == "validation L1: language-model loss (nats/token)"
    assert set(drawn["valid_loss"].series) == {"global", "alpha", "beta", "gamma"}


def test_plot_fedexp_factor(tmp_path, capsys):
    """Without warmup these oracles' first updates disagree enough for FedExP to lengthen the mean."""
    config = tiny_config(tmp_path, federation={"extrapolation": "fedexp"}, pretrain={"warmup_steps": 0})
    api.pretrain(config)
    plot(config.run_path, ["outer_scale.png", "agreement.png"], capsys)


def test_plot_central_run_has_loss_against_tokens(sim_and_central, capsys):
    run = sim_and_central[1]
    plot(run, ["train_loss.png", "valid_loss.png", "valid_loss_vs_tokens.png"], capsys)
    by_tokens = charts(run)["valid_loss_vs_tokens"]
    assert by_tokens.xlabel == "tokens trained (all oracles together)" and "(nats/token)" in by_tokens.ylabel
    assert max(x for x, _ in by_tokens.series["global"]) > 0


def test_no_flat_plots_for_one_oracle_or_a_ledger_without_values(tmp_path, capsys):
    config = tiny_config(tmp_path, names=("alpha",), docs=(120,), ledger={"method": "off"})
    api.pretrain(config)
    plot(config.run_path, ["valid_loss.png", "train_loss.png"], capsys)
    assert not (config.run_path / "plots" / "agreement.png").exists()  # one oracle: always 1
    assert not (config.run_path / "plots" / "contribution.png").exists()  # ledger.method = "off": all 0


def finetune_metrics(folder, lambda_lm=0.25, names=("a", "b")):
    """A fine-tuning run's metrics rows as RoundReport writes them, and its recorded config."""
    rows = []
    for r in range(4):
        rows.append({"round": r, "kind": "round", "loss": 1.0 / (r + 1), "oracles": {n: (i + 1.0) / (r + 1) for i, n in enumerate(names)},
                     "metrics": {n: {"accuracy": 0.5 + r / 10, "f1": 0.4 + r / 10} for n in names}, "accepted": list(names),
                     "agreement": 0.5, "tokens": 100 * r, "bytes_total": 1000 * r})
        rows += [{"round": r, "kind": "oracle", "oracle": n, "train_loss": 2.0 / (r + 1)} for n in names]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    oracles = [{"name": n, "task": {"type": "classification", "train": ["t.jsonl"]}} for n in names]
    (folder / "config.toml").write_text(dump_config(tiny_config(folder, oracles=oracles, finetune={"lambda_lm": lambda_lm})))
    return folder


def test_plot_finetune_scores_and_losses_say_what_they_are(tmp_path, capsys):
    run = finetune_metrics(tmp_path / "ft")
    plot(run, ["accuracy.png", "f1.png", "valid_loss.png", "valid_loss_vs_bytes.png", "train_loss.png"], capsys)
    drawn = charts(run)
    assert drawn["train_loss"].ylabel == "training loss L3 = L2 + 0.25·L1 (nats)"
    assert drawn["valid_loss"].ylabel.startswith("validation L2: task loss (nats/example")
    assert drawn["accuracy"].ylabel == "accuracy (validation set)" and set(drawn["accuracy"].series) == {"a", "b"}
    single = finetune_metrics(tmp_path / "one", names=("a",))
    assert "agreement" not in charts(single)


def test_plot_old_finetune_rows(tmp_path, capsys):
    """Rows with a per-oracle `accuracy` field and no recorded config still plot, labeled as fine-tuning."""
    rows = [{"round": r, "kind": "round", "loss": 1.0 / (r + 1), "oracles": {"a": 1.0 / (r + 1)}, "tokens": 10 * r,
             "bytes_total": 100 * r} for r in range(3)]
    rows += [{"round": r, "kind": "finetune_oracle", "oracle": "c", "accuracy": 0.3 + r / 20} for r in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(tmp_path, ["accuracy.png", "valid_loss.png"], capsys)
    assert "L2" in charts(tmp_path)["valid_loss"].ylabel


def test_overlay_sim_and_central_into_out(sim_and_central, tmp_path, capsys):
    out = tmp_path / "compare"
    before = [sorted(run.rglob("*")) for run in sim_and_central]
    assert main(["plot", *map(str, sim_and_central), "--out", str(out)]) == 0
    assert_pngs(out, ["valid_loss_vs_tokens.png", "valid_loss_vs_rounds.png", "valid_loss_vs_bytes.png",
                      "valid_loss_vs_tokens_alpha.png"], capsys.readouterr().out)
    assert [sorted(run.rglob("*")) for run in sim_and_central] == before  # nothing written into the runs
    drawn = {c.name: c for c in overlay_charts({"sim": read_run(sim_and_central[0]), "central": read_run(sim_and_central[1])})}
    tokens = drawn["valid_loss_vs_tokens"].series
    assert set(tokens) == {"sim", "central"}
    assert max(tokens["sim"])[0] == max(tokens["central"])[0] > 0  # equal tokens: the curves end at the same x
    assert set(drawn["valid_loss_vs_rounds"].series) == {"sim"} and "central runs have none" in drawn["valid_loss_vs_rounds"].title


def test_overlay_names_and_refusals(sim_and_central, tmp_path, capsys):
    assert run_names([tmp_path / "a" / "ft", tmp_path / "b" / "ft", tmp_path / "c"]) == ["a/ft", "b/ft", "c"]
    assert main(["plot", *map(str, sim_and_central)]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert main(["plot", str(sim_and_central[0]), str(sim_and_central[0]), "--out", str(tmp_path)]) == 2
    assert "the same run is given twice" in capsys.readouterr().err
    ft = finetune_metrics(tmp_path / "ft")
    assert main(["plot", str(sim_and_central[0]), str(ft), "--out", str(tmp_path / "x")]) == 2
    assert "cannot overlay fine-tuning runs (ft) with pre-training runs" in capsys.readouterr().err


def test_overlay_of_finetuning_runs_labels_run_and_oracle(tmp_path, capsys):
    first, second = finetune_metrics(tmp_path / "lam0.5", 0.5), finetune_metrics(tmp_path / "lam0", 0.0)
    assert main(["plot", str(first), str(second), "--out", str(tmp_path / "cmp")]) == 0
    assert_pngs(tmp_path / "cmp", ["accuracy.png", "valid_loss_vs_rounds.png"], capsys.readouterr().out)
    drawn = {c.name: c for c in overlay_charts({"lam0.5": read_run(first), "lam0": read_run(second)})}
    assert set(drawn["accuracy"].series) == {"lam0.5: a", "lam0.5: b", "lam0: a", "lam0: b"}


def test_plot_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert str(tmp_path / "metrics.jsonl") in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
