"""`dgpt plot`: PNGs from central, federated and fine-tuning metrics; clear errors without metrics."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

pytest.importorskip("matplotlib")

from dgpt import api  # noqa: E402
from dgpt.cli import main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_pngs(run_dir, names, capsys) -> None:
    assert main(["plot", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    for name in names:
        path = run_dir / "plots" / name
        assert path.is_file(), f"{name} missing; printed: {printed}"
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        assert str(path) in printed


def test_plot_federated_run(tmp_path, capsys):
    config = tiny_config(tmp_path)
    api.prepare(config)
    api.pretrain(config)
    assert_pngs(config.run_path, ["valid_loss.png", "valid_loss_vs_tokens.png", "valid_loss_vs_bytes.png",
                                  "train_loss.png", "agreement.png", "contribution.png"], capsys)
    assert not (config.run_path / "plots" / "outer_scale.png").exists()  # no extrapolation, nothing to draw


def test_plot_fedexp_factor(tmp_path, capsys):
    """Without warmup these oracles' first updates disagree enough for FedExP to lengthen the mean."""
    config = tiny_config(tmp_path, federation={"extrapolation": "fedexp"}, pretrain={"warmup_steps": 0})
    api.prepare(config)
    api.pretrain(config)
    assert_pngs(config.run_path, ["outer_scale.png", "agreement.png"], capsys)


def test_plot_central_run(tmp_path, capsys):
    config = tiny_config(tmp_path, federation={"runtime": "central"})
    api.prepare(config)
    api.pretrain(config)
    assert_pngs(config.run_path, ["train_loss.png", "valid_loss.png"], capsys)


def test_plot_finetune_scores(tmp_path, capsys):
    """Fine-tuning rows: `metrics: {oracle: {accuracy, f1}}` per round, and a per-oracle `accuracy` field."""
    rows = [{"round": r, "kind": "round", "loss": 1.0 / (r + 1), "oracles": {"a": 1.0 / (r + 1), "b": 2.0 / (r + 1)},
             "metrics": {"a": {"accuracy": 0.5 + r / 10, "f1": 0.4 + r / 10}, "b": {"accuracy": 0.6}},
             "tokens": 100 * r, "bytes_total": 1000 * r} for r in range(4)]
    rows += [{"round": r, "kind": "finetune_oracle", "oracle": "c", "accuracy": 0.3 + r / 20} for r in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_pngs(tmp_path, ["accuracy.png", "f1.png", "valid_loss.png", "valid_loss_vs_bytes.png"], capsys)


def test_plot_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert str(tmp_path / "metrics.jsonl") in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err

