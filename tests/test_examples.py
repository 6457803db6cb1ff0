"""Every config in examples/ says what it is for and how long it takes, loads, and runs one short round (sizes
made small with --set; the training text cut to the validation files so that preparing takes seconds)."""

import dataclasses
import shlex
from pathlib import Path

import pytest
from conftest import SHARED_DATA, tiny_config

from dgpt import api
from dgpt.cli import build_parser, main
from dgpt.config import load_config
from dgpt.demo import demo_config
from dgpt.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent: this example reads it")
SMALL = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.d_ff=64", "model.n_ctx=32", "tokenizer.vocab_size=300",
         "pretrain.batch_size=2", "pretrain.eval_windows=2", "pretrain.warmup_steps=1", "federation.inner_steps=2"]


def sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in overrides]


def on_valid_text(config_path: Path) -> list[str]:
    """Overrides that train each oracle on its validation file (a fraction of the text: preparing takes seconds)."""
    return [f'oracles.{i}.train=["{o.valid[0]}"]' for i, o in enumerate(load_config(config_path).oracles)]


def header(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_says_what_it_is_for_and_how_long_it_takes_and_loads(path):
    assert len(header(path).splitlines()) >= 3, f"{path.name}: no header"
    assert "Time on 2 CPU cores:" in header(path), f"{path.name}: its header does not say how long it takes"
    assert load_config(path).oracles


def test_the_demo_recipe_is_the_demos_and_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe reads runs/demo/corpus, where `dgpt demo` writes it
    demo = demo_config(tmp_path / "runs" / "demo", rounds=8, inner_steps=25)
    example = load_config(ROOT / "examples" / "demo_recipe.toml")
    assert [o.name for o in example.oracles] == [o.name for o in demo.oracles]
    for mine, theirs in zip(example.oracles, demo.oracles):
        assert [str(tmp_path / p) for p in mine.train + mine.valid] == theirs.train + theirs.valid
    assert dataclasses.replace(example, run_dir="", oracles=[]) == dataclasses.replace(demo, run_dir="", oracles=[])
    path = ROOT / "examples" / "demo_recipe.toml"
    assert main(["pretrain", str(path), *sets(*SMALL, *on_valid_text(path)), "--stop-after", "1"]) == 0
    assert [r["round"] for r in read_metrics(tmp_path / "runs" / "demo_recipe" / "metrics.jsonl") if r["kind"] == "round"] == [0, 1]


@needs_shared
def test_shared4_runs_a_round_and_its_central_baseline_matches_its_tokens(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = ROOT / "examples" / "shared4.toml"
    small = [*SMALL, *on_valid_text(path), "ledger.method=off"]
    assert main(["pretrain", str(path), *sets(*small, f"run_dir={tmp_path / 'sim'}"), "--stop-after", "1"]) == 0
    central_run = sets(*small, f"run_dir={tmp_path / 'central'}", "federation.runtime=central", "pretrain.log_interval=1")
    assert main(["pretrain", str(path), *central_run, "--stop-after", "2"]) == 0
    assert "central baseline at the federated run's tokens: 80 steps (40 rounds x 2 inner steps) of 4 x 2 windows" in capsys.readouterr().err
    sim = [r for r in read_metrics(tmp_path / "sim" / "metrics.jsonl") if r["kind"] == "round"]
    central = [r for r in read_metrics(tmp_path / "central" / "metrics.jsonl") if r["kind"] == "train"]
    assert sim[-1]["tokens"] == central[-1]["tokens"]  # one round of 2 inner steps = 2 pooled steps


@needs_shared
def test_dsft_tasks_runs_a_round(tmp_path, monkeypatch, capsys):
    pretrained = tiny_config(tmp_path / "pre", federation={"rounds": 1, "inner_steps": 1})
    api.pretrain(pretrained)
    monkeypatch.chdir(ROOT)
    path = ROOT / "examples" / "dsft_tasks.toml"
    finetune = [f"run_dir={tmp_path / 'ft'}", f"finetune.init_from={pretrained.run_path}", "finetune.inner_steps=1",
                "finetune.batch_size=4", "finetune.max_len=32", "finetune.eval_batch_size=256"]
    assert main(["finetune", str(path), *sets(*finetune), "--stop-after", "1"]) == 0
    scores = [r for r in read_metrics(tmp_path / "ft" / "metrics.jsonl") if r["kind"] == "round"][-1]["metrics"]
    assert set(scores) == {"sst2", "rte", "copa"} and all(0 <= s["accuracy"] <= 1 for s in scores.values())


@needs_shared
def test_flower2_settings_run_a_round_on_sim(tmp_path, monkeypatch):
    """Its Flower deployment is tested in test_flower.py; here its oracles and model, one round on the sim runtime."""
    monkeypatch.chdir(ROOT)
    path = ROOT / "examples" / "flower2.toml"
    overrides = [*on_valid_text(path), "federation.runtime=sim", "tokenizer.counts=[]", f"run_dir={tmp_path}", "ledger.method=off"]
    assert main(["pretrain", str(path), *sets(*overrides), "--stop-after", "1"]) == 0


def test_the_readme_walkthrough_names_real_commands_and_files():
    """Each command of README's "Evaluating and comparing runs" parses, and the configs it names exist (the
    examples' runs above show that they train)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Evaluating and comparing runs", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.startswith("dgpt ")]
    assert [c[1] for c in commands] == ["prepare", "pretrain", "pretrain", "plot", "finetune", "eval", "eval", "predict"]
    for command in commands:
        args = build_parser().parse_args(command[1:])
        if hasattr(args, "config") and args.config.endswith(".toml"):
            assert load_config(ROOT / args.config, args.overrides).oracles
