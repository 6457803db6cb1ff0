"""Extending a finished run (its rounds or steps raised): it continues from its last round, with the learning-rate
schedule re-planned from where it stands, and the finished run's last checkpoint is kept for good."""

import dataclasses

import pytest
import torch
from conftest import extended, rounds, tiny_config

from dgpt import api
from dgpt.audit import verify_ledger
from dgpt.config import PretrainConfig
from dgpt.data.loader import WindowSampler
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT
from dgpt.rundir import FINAL, RunDir
from dgpt.train.checkpoint import save_checkpoint, weights_of
from dgpt.train.local import InnerLoop, Rewarm, lr_at
from dgpt.train.metrics import read_metrics

FED = {"rounds": 3, "inner_steps": 2, "outer_lr": 0.7, "outer_momentum": 0.9}


def final_loss(config) -> float:
    return rounds(config)[-1]["loss"]


def test_rewarm_from_min_lr_then_decay_to_the_new_end():
    """A finished run stands at min_lr: its extension climbs back to lr over warmup_steps, then decays to min_lr at
    the new end; a shortened schedule holds the LR where it stood, then decays; with no re-plan nothing changes."""
    cfg = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="linear")
    rewarm = Rewarm.at(100, cfg, 100, None, 200)
    assert rewarm == Rewarm(100, pytest.approx(0.1), 1.0, 10)
    assert lr_at(100, cfg, 200, rewarm) == pytest.approx(0.1 + 0.9 / 10)
    assert lr_at(109, cfg, 200, rewarm) == pytest.approx(1.0)
    assert lr_at(155, cfg, 200, rewarm) == pytest.approx(0.55)
    assert lr_at(200, cfg, 200, rewarm) == pytest.approx(0.1)
    again = Rewarm.at(200, cfg, 200, rewarm, 300)  # extended twice: from min_lr again
    assert again.lr == pytest.approx(0.1) and lr_at(209, cfg, 300, again) == pytest.approx(1.0)
    shorter = Rewarm.at(50, cfg, 100, None, 80)
    assert shorter.peak == shorter.lr == pytest.approx(lr_at(50, cfg, 100))
    assert lr_at(55, cfg, 80, shorter) == pytest.approx(shorter.lr) and lr_at(80, cfg, 80, shorter) == pytest.approx(0.1)
    assert lr_at(55, cfg, 100, None) == lr_at(55, cfg, 100)
    short = Rewarm.at(100, cfg, 100, None, 110)  # a short extension warms up over half of it, and still ends at min_lr
    assert short.warmup == 5 and lr_at(104, cfg, 110, short) == pytest.approx(1.0)
    assert lr_at(110, cfg, 110, short) == pytest.approx(0.1)


def test_a_loop_replans_only_when_its_end_moved(tmp_path):
    """The schedule's end travels in the loop's state: a resumed loop with the same end keeps it (and a state saved
    before it was kept); a raised end re-plans from the position given, or the old end if that came first."""
    cfg = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, batch_size=2)
    model = GPT(GPTConfig(vocab_size=50, n_ctx=8, n_layer=1, n_head=2, d_model=16, d_ff=32))
    sampler = WindowSampler([(torch.arange(100, dtype=torch.int32) % 50).numpy()], 8, 0, "a")

    def loop(total):
        return InnerLoop(model, cfg, sampler, total, torch.device("cpu"), 0)

    first = loop(6)
    for _ in range(6):
        first.train_step()
    state = first.state_dict()
    same = loop(6)
    same.load_state_dict(state)
    assert same.rewarm is None
    old = {k: v for k, v in state.items() if k != "schedule"}
    same.load_state_dict(old)
    assert same.rewarm is None
    longer = loop(12)
    longer.load_state_dict(state, position=8)  # a finished run is re-planned from its end, wherever it is asked
    assert longer.rewarm == Rewarm(6, pytest.approx(0.1), 1.0, 2)
    longer.train_step()
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.55)
    resumed = loop(12)
    resumed.load_state_dict(longer.state_dict())
    assert resumed.rewarm == longer.rewarm


def test_extending_a_finished_sim_run(tmp_path):
    """3 rounds, then the same run raised to 6: it continues from round 3 (not from scratch), ends no worse than the
    3-round run and within 2% of a fresh 6-round run (continuing the old schedule's plan instead, the LR jumped from
    min_lr to mid-decay at round 4: +3.9% here). The 3-round run's checkpoint survives rotation; the ledger holds all
    6 rounds."""
    config = tiny_config(tmp_path / "ext", federation=FED)
    api.pretrain(config)
    three = final_loss(config)
    longer = extended(config, rounds=6)
    summary = api.pretrain(longer)
    assert summary.done == 6 and [r["round"] for r in rounds(longer)] == [0, 1, 2, 3, 4, 5, 6]
    fresh = tiny_config(tmp_path / "fresh", federation={**FED, "rounds": 6})
    api.pretrain(fresh)
    assert final_loss(longer) <= three
    assert final_loss(longer) <= 1.02 * final_loss(fresh)
    run = RunDir(config.run_dir)
    kept = [p.name for p in run.list_checkpoints()]
    assert kept == ["round_0000003", "round_0000005", "round_0000006"]  # keep_checkpoints = 2, and the finished run's
    assert (run.checkpoint("round", 3) / FINAL).is_file() and (run.checkpoint("round", 6) / FINAL).is_file()
    assert sorted(run.oracle_states("alpha")) == [3, 5, 6]
    assert verify_ledger(config.run_dir).rounds == 6
    assert api.pretrain(longer).done == 6  # nothing left to train


def test_extending_a_finished_central_run(tmp_path):
    """pretrain.steps raised: the central run continues from its last step, re-warmed from min_lr."""
    pre = {"steps": 8, "min_lr": 3e-4, "checkpoint_interval": 2, "keep_checkpoints": 1}
    config = tiny_config(tmp_path / "ext", federation={"runtime": "central"}, pretrain=pre)
    api.pretrain(config)
    longer = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, steps=12))
    assert api.pretrain(longer).done == 12
    lrs = {r["step"]: r["lr"] for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(lrs) == list(range(1, 13))  # steps 1-8, then 9-12: not from scratch
    assert lrs[8] == pytest.approx(lr_at(7, config.pretrain, 8))
    assert lrs[9] == pytest.approx(3e-4 + (3e-3 - 3e-4) / 2) and lrs[10] == pytest.approx(3e-3)  # warmup_steps = 2
    assert [p.name for p in RunDir(config.run_dir).list_checkpoints()] == ["step_0000008", "step_0000012"]


def test_rotation_keeps_a_final_checkpoint(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, n_ctx=8, n_layer=1, n_head=2, d_model=16, d_ff=32))
    for n in range(1, 6):
        save_checkpoint(tmp_path, "round", n, weights_of(model), model.config, {"round": n}, keep=2, final=n == 2)
    assert [p.name for p in RunDir(tmp_path).list_checkpoints()] == ["round_0000002", "round_0000004", "round_0000005"]
