"""`dgpt eval` and `dgpt info` on every kind of run, and the summary every training run closes with."""

import contextlib
import dataclasses
import io
import json

import pytest
import torch
from conftest import tiny_config
from taskdata import write_task

from dgpt import api
from dgpt.cli import main
from dgpt.config import config_from_dict, dump_config
from dgpt.data.shards import read_manifest
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT
from dgpt.rundir import RunDir
from dgpt.train.evaluate import perplexity, weighted_loss
from dgpt.train.metrics import read_metrics

KINDS = ("classification", "entailment", "regression", "multiple_choice")
N_CTX = 32


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pre-LN run: its checkpoint's model differs from what a config without [model] would build."""
    config = tiny_config(tmp_path_factory.mktemp("pre"), federation={"rounds": 2, "inner_steps": 2}, model={"ln": "pre"})
    summary = api.pretrain(config)
    return config, summary


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained):
    root = tmp_path_factory.mktemp("ft")
    oracles = [{"name": kind, "task": write_task(root / "tasks", kind, seed=i)} for i, kind in enumerate(KINDS)]
    config = config_from_dict({"run_dir": str(root / "run"), "seed": 5, "oracles": oracles, "finetune": {
        "init_from": str(pretrained[0].run_path), "rounds": 2, "inner_steps": 2, "batch_size": 8, "lr": 1e-3}}, "<test>")
    path = root / "ft.toml"
    path.write_text(dump_config(config))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["finetune", str(path)]) == 0
    return config, out.getvalue()


def valid_windows(run, name):
    """Every validation window of one shard of T tokens: the windows start every n_ctx tokens while n_ctx + 1 fit."""
    tokens = read_manifest(RunDir(run).oracle_data(name))["splits"]["valid"]["tokens"]
    return -(-(tokens - N_CTX - 1) // N_CTX), tokens


def test_eval_of_a_pretraining_run_is_per_oracle_and_global_and_says_what_it_covered(pretrained, capsys):
    config, _ = pretrained
    run = config.run_path
    assert main(["eval", str(run)]) == 0  # pretrain.eval_windows = 4 windows per oracle
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"checkpoint  {RunDir(run).checkpoint('round', 2)}"
    for name in config.oracle_names():
        every, tokens = valid_windows(run, name)
        assert any(line.split()[0] == name and f"4 of {every:,} windows ({4 * N_CTX:,} of {tokens:,} validation tokens)" in line
                   for line in lines[2:])
    assert main(["eval", str(run), "--full"]) == 0
    full = api.evaluate(config, full=True)
    assert capsys.readouterr().out.splitlines() == full.lines()
    train = {n: read_manifest(RunDir(run).oracle_data(n))["splits"]["train"]["tokens"] for n in config.oracle_names()}
    losses = {n: s["loss"] for n, s in full.scores.items()}
    assert full.loss == pytest.approx(weighted_loss(losses, train))  # training-token weights, as in training
    for name in config.oracle_names():
        every, _ = valid_windows(run, name)
        assert full.covered[name].startswith(f"{every:,} of {every:,} windows")
        assert full.scores[name]["perplexity"] == pytest.approx(perplexity(losses[name]))
    assert main(["eval", str(run), "--full", "--max-windows", "2"]) == 2  # one or the other
    assert "not allowed with argument" in capsys.readouterr().err


def test_eval_of_a_finetuning_run_rescores_each_head_on_its_validation_set(finetuned, capsys):
    config, out = finetuned
    logged = [r for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "round" and "metrics" in r][-1]
    result = api.evaluate(api.load_run_config(config.run_path))
    assert set(result.scores) == set(KINDS) and result.loss is None
    assert set(result.scores["classification"]) == {"loss", "accuracy", "macro_f1"}  # three labels
    assert set(result.scores["entailment"]) == {"loss", "accuracy", "f1"}  # two
    assert set(result.scores["regression"]) == {"loss", "pearson", "spearman"}
    assert set(result.scores["multiple_choice"]) == {"loss", "accuracy"}
    for name, scores in result.scores.items():  # the same figures as the run's last validation
        assert scores["loss"] == pytest.approx(logged["oracles"][name], rel=1e-5)
        assert {k: v for k, v in scores.items() if k != "loss"} == pytest.approx(logged["metrics"][name], rel=1e-5)
        assert result.covered[name].startswith("12 ")  # write_task's 12 validation examples
    # the training summary printed the same scores
    assert "final global validation loss" in out and "(L2) at round 2 of 2 (sim)" in out
    for printed, rescored in zip(out.splitlines()[1:5], result.lines()[1:5], strict=True):
        assert rescored == f"{printed}  {result.covered[printed.split()[0]]}"
    assert main(["eval", str(config.run_path)]) == 0
    assert capsys.readouterr().out.splitlines() == result.lines()


def test_info_reads_the_model_from_the_checkpoint_and_each_oracles_head(pretrained, finetuned, tmp_path, capsys):
    config, _ = finetuned
    assert main(["info", str(config.run_path)]) == 0
    info = capsys.readouterr().out
    model = json.loads(info.split("model       ")[1].splitlines()[0].split("  ", 1)[1])
    assert model["ln"] == "pre" and model["n_layer"] == 2  # the checkpoint's, not [model]'s defaults (post-LN, 4 layers)
    with torch.device("meta"):
        params = GPT(GPTConfig(**model)).num_params()
    assert f"model       {params:,} parameters (from {RunDir(config.run_path).checkpoint('round', 2)})" in info
    assert "kind        fine-tuning" in info and "not prepared" not in info
    assert "oracle      classification: classification (3 labels: alpha, beta, gamma); head at round_0000002: 4 steps" in info
    assert "oracle      regression: similarity (regression); head at round_0000002" in info
    assert "oracle      multiple_choice: multiple_choice (2 choices)" in info
    pre, _ = pretrained
    fresh = tmp_path / "fresh.toml"  # not yet fine-tuned: the model it starts from, no heads
    fresh.write_text(dump_config(dataclasses.replace(config, run_dir=str(tmp_path / "fresh"))))
    assert main(["info", str(fresh)]) == 0
    info = capsys.readouterr().out
    assert f"parameters (from {RunDir(pre.run_path).checkpoint('round', 2)})" in info and '"ln": "pre"' in info
    assert info.count("no trained head yet") == len(KINDS)
    assert main(["info", str(pre.run_path)]) == 0
    info = capsys.readouterr().out
    assert "kind        pre-training" in info and '"ln": "pre"' in info and "alpha: train" in info


def test_every_runtime_closes_with_the_same_summary(pretrained, tmp_path, capsys):
    config, sim = pretrained
    rows = [r for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "round"]
    assert (sim.runtime, sim.unit, sim.done, sim.validated, sim.total) == ("sim", "round", 2, 2, 2)
    assert sim.loss == pytest.approx(rows[-1]["loss"]) and sim.bytes_total == rows[-1]["bytes_total"] > 0
    assert sim.tokens == rows[-1]["tokens"] == 3 * 2 * 2 * 4 * N_CTX  # 3 oracles x 2 rounds x H 2 x batch 4 windows
    assert {n: s["loss"] for n, s in sim.oracles.items()} == pytest.approx(rows[-1]["oracles"])
    central = tiny_config(tmp_path, federation={"runtime": "central"})  # pretrain.steps = 8
    path = tmp_path / "central.toml"
    path.write_text(dump_config(central))
    assert main(["pretrain", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    valid = [r for r in read_metrics(central.run_path / "metrics.jsonl") if r["kind"] == "valid"][-1]
    assert lines[0] == f"final global validation loss {valid['loss']:.4f} (perplexity {perplexity(valid['loss']):.2f}) at step 8 of 8 (central)"
    assert [line.split()[0] for line in lines[1:4]] == ["alpha", "beta", "gamma"]
    assert lines[4].startswith(f"trained {8 * 4 * N_CTX:,} tokens in ") and lines[4].endswith("no communication (central: the oracles' data pooled)")
    assert len(lines) == len(sim.lines()) == 5
    # run again: nothing left to train, the checkpoint is validated for the summary and nothing is logged
    before = (central.run_path / "metrics.jsonl").read_text()
    assert main(["pretrain", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == lines[0]
    assert (central.run_path / "metrics.jsonl").read_text() == before
