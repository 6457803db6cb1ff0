"""Optional TensorBoard logging: every metrics.jsonl row mirrored as scalars."""

import pytest
from conftest import tiny_config

from dgpt import api
from dgpt.train.metrics import read_metrics


def test_tensorboard_scalars_mirror_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, federation={"rounds": 2, "inner_steps": 1}, log={"tensorboard": True})
    api.pretrain(config)
    events = EventAccumulator(str(config.run_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"round/loss", "round/oracles/alpha", "oracle/beta/valid_loss"} <= set(tags)
    rows = [r for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "round"]
    assert [e.value for e in events.Scalars("round/loss")] == pytest.approx([r["loss"] for r in rows])
