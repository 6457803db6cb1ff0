"""The centralised baseline: schedule, weight decay groups, loss falls, exact resume, checkpoint checks."""

import dataclasses

import pytest
import torch
from conftest import SHARED_DATA, tiny_config

from dgpt import api
from dgpt.config import PretrainConfig
from dgpt.errors import DgptError
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint, load_state, load_weights_into
from dgpt.train.local import lr_at, make_optimizer
from dgpt.train.metrics import read_metrics


def central(tmp_path, **pretrain):
    return tiny_config(tmp_path, federation={"runtime": "central"}, pretrain=pretrain)


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_schedule_warmup_then_cosine():
    cfg = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=50, n_ctx=8, n_layer=1, n_head=2, d_model=16, d_ff=32))
    decay, no_decay = make_optimizer(model, PretrainConfig(weight_decay=0.01)).param_groups
    assert decay["weight_decay"] == 0.01 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    full = central(tmp_path / "a", steps=8, checkpoint_interval=4)
    api.pretrain(full)
    interrupted = central(tmp_path / "b", steps=8, checkpoint_interval=4)
    api.pretrain(interrupted, stop_after=4)
    assert latest_checkpoint(interrupted.run_path).name == "step_0000004"
    api.pretrain(interrupted)  # resumes at step 4
    assert train_losses(full.run_path) == train_losses(interrupted.run_path)  # bit for bit
    a = load_state(latest_checkpoint(full.run_path))["loop"]["sampler"]["generator"]
    b = load_state(latest_checkpoint(interrupted.run_path))["loop"]["sampler"]["generator"]
    assert torch.equal(a, b)


def test_checkpoint_for_a_different_model_is_refused(tmp_path):
    config = central(tmp_path, steps=2, checkpoint_interval=2)
    api.pretrain(config)
    weights = latest_checkpoint(config.run_path) / WEIGHTS
    other = GPT(GPTConfig(vocab_size=300, n_ctx=32, n_layer=3, n_head=2, d_model=32, d_ff=64))
    with pytest.raises(DgptError, match=r"model\.safetensors: checkpoint is for a different model \(n_layer 2 != 3"):
        load_weights_into(other, weights, other.config)
    # resuming the run with a changed model config is refused the same way
    changed = dataclasses.replace(config, model=dataclasses.replace(config.model, n_layer=3))
    with pytest.raises(DgptError, match="different model"):
        api.pretrain(changed)


def test_corrupt_checkpoint_state_is_reported(tmp_path):
    config = central(tmp_path, steps=2, checkpoint_interval=2)
    api.pretrain(config)
    state = latest_checkpoint(config.run_path) / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(DgptError, match="state.pt: corrupt checkpoint state"):
        load_state(state.parent)


def test_corrupt_weight_file_is_reported(tmp_path):
    config = central(tmp_path, steps=2, checkpoint_interval=2)
    api.pretrain(config)
    weights = latest_checkpoint(config.run_path) / WEIGHTS
    weights.write_bytes(b"not a safetensors file")
    (weights.parent / "checksums.json").unlink()  # unchecked, as before checksums: the weight reader names the file
    with pytest.raises(DgptError, match="model.safetensors: not a dgpt weight file"):
        api.load_pretrained(config.run_path)


@pytest.mark.skipif(not (SHARED_DATA / "pretrain").is_dir(), reason="../shared/data is absent: no real corpus")
def test_loss_falls_on_real_corpus(tmp_path):
    shakespeare = SHARED_DATA / "pretrain" / "literature_shakespeare"
    config = tiny_config(
        tmp_path,
        federation={"runtime": "central"},
        oracles=[{"name": "shakespeare", "train": [str(shakespeare / "train.txt")], "valid": [str(shakespeare / "valid.txt")]}],
        tokenizer={"vocab_size": 512},
        model={"n_layer": 2, "n_head": 4, "d_model": 64, "d_ff": 256, "n_ctx": 64},
        pretrain={"steps": 300, "batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "eval_interval": 300, "eval_windows": 16},
    )
    api.pretrain(config)
    valid = [r["loss"] for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "valid"]
    assert valid[0] > 6.0  # ~ln(512) at initialisation
    assert valid[-1] < valid[0] - 1.5
