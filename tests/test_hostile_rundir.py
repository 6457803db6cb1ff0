"""A run directory is input like any other. A symbolic link in it that leads out is refused in one line naming
the link, by every command that writes the run and every command that reads one received from elsewhere, before
anything is written; the link's target is left byte for byte as it was, and nothing is deleted through a link.
A received checkpoint that claims a model or a fine-tuning batch that cannot fit is one line with the estimate."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config
from taskdata import write_task

from dgpt.cli import main
from dgpt.config import config_from_dict, dump_config
from dgpt.errors import DgptError
from dgpt.fileio import remove_tree
from dgpt.fileio import write_checksums
from dgpt.model.config import GPTConfig
from dgpt.rundir import CHECKSUMS, WEIGHTS, RunDir
from dgpt.train.checkpoint import read_model_config, save_weights

ROUND = "checkpoints/round_0000001"


def tree(root: Path) -> dict[str, bytes]:
    """Every entry under root, links as links (their target text), files by their bytes."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            found[key] = (b"-> " + os.readlink(path).encode()) if path.is_symlink() else (path.read_bytes() if path.is_file() else b"/")
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained one round of two (so that pretraining it again writes), and its config file."""
    tmp = tmp_path_factory.mktemp("links")
    config = tiny_config(tmp, federation={"rounds": 2, "inner_steps": 1}, pretrain={"keep_checkpoints": 1})
    path = tmp / "config.toml"
    path.write_text(dump_config(config))
    assert main(["-q", "pretrain", str(path), "--stop-after", "1"]) == 0
    return path, config.run_path


@pytest.fixture
def received(trained, tmp_path):
    """A copy of the trained run, its config pointed at the copy, and a folder outside it to link to."""
    path, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    config = tmp_path / "config.toml"
    config.write_text(path.read_text().replace(f'run_dir = "{run}"', f'run_dir = "{copy}"'))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("theirs")
    return config, copy, outside


def link(run: Path, where: str, outside: Path) -> Path:
    """run/where made a link to a copy of itself in `outside` (or to `outside` itself when it does not exist)."""
    at = run / where
    target = outside / at.name
    if at.exists():
        shutil.move(at, target)
    else:
        target = outside
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)
    return at


WRITERS = [  # (link, command); {cfg} the run's config
    ("data", ["prepare", "{cfg}"]),
    ("checkpoints", ["pretrain", "{cfg}"]),
    (f"{ROUND}/state.pt", ["pretrain", "{cfg}"]),
    ("metrics.jsonl", ["pretrain", "{cfg}"]),
    ("oracles", ["pretrain", "{cfg}"]),
    ("pretoken_counts", ["count-pretokens", "{cfg}", "--oracle", "alpha"]),
    ("checkpoints", ["finetune", "{cfg}"]),
    ("config.toml", ["flower-app", "{cfg}", "--set", "federation.runtime=flower"]),
    ("plots", ["plot", "{run}"]),
    ("corpus", ["demo", "--run-dir", "{run}"]),
]
READERS = [  # a run received from elsewhere: {run} its directory
    (f"{ROUND}/model.safetensors", ["eval", "{run}"]),
    ("data/alpha/valid_0000.bin", ["eval", "{run}"]),
    ("data/alpha/manifest.json", ["info", "{run}"]),
    ("config.toml", ["info", "{run}"]),
    ("tokenizer.json", ["generate", "{run}", "--prompt", "the", "--max-new-tokens", "2"]),
    ("checkpoints", ["generate", "{run}", "--max-new-tokens", "2"]),
    ("oracles/alpha/round_0000001.pt", ["predict", "{run}", "--oracle", "alpha", "--input", "{cfg}", "--output", "{out}"]),
    ("ledger.jsonl", ["ledger", "{run}"]),
    (ROUND, ["ledger", "{run}"]),
    ("metrics.jsonl", ["plot", "{run}"]),
    (f"{ROUND}/model.safetensors", ["export", "{run}", "--format", "hf", "{out}"]),
]


@pytest.mark.parametrize("where, argv", WRITERS + READERS, ids=[f"{a[0]}-{w.replace('/', '_')}" for w, a in WRITERS + READERS])
def test_a_link_out_of_the_run_is_refused_and_its_target_unchanged(received, capsys, where, argv):
    config, run, outside = received
    at = link(run, where, outside)
    before, theirs = tree(run), tree(outside)
    names = {"cfg": str(config), "run": str(run), "out": str(config.parent / "out")}
    capsys.readouterr()
    assert main(["-q", *(a.format(**names) for a in argv)]) == 2, argv
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dgpt: error: {at}: a symbolic link to "), lines
    assert tree(outside) == theirs and tree(run) == before and not (config.parent / "out").exists()


def test_links_that_stay_inside_are_followed_and_rotation_deletes_only_the_link(received, capsys):
    config, run, _ = received
    kept = run / "elsewhere"
    kept.mkdir()
    (kept / "keep.txt").write_text("mine")
    (run / "checkpoints" / "round_0000000").symlink_to(Path("..") / "elsewhere")  # the oldest "checkpoint"
    shutil.move(run / "config.toml", run / "elsewhere" / "config.toml")
    (run / "config.toml").symlink_to(Path("elsewhere") / "config.toml")
    assert main(["-q", "info", str(run)]) == 0
    assert main(["-q", "pretrain", str(config)]) == 0  # round 2; keep_checkpoints = 1 rotates the older two out
    assert [p.name for p in RunDir(run).list_checkpoints()] == ["round_0000002"]
    assert tree(kept) == {"keep.txt": b"mine", "config.toml": (run / "elsewhere" / "config.toml").read_bytes()}


def test_remove_tree_never_deletes_through_a_link(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "f").write_text("theirs")
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    (doomed / "to_dir").symlink_to(outside / "sub")
    (doomed / "to_file").symlink_to(outside / "sub" / "f")
    alias = tmp_path / "alias"
    alias.symlink_to(outside)
    before = tree(outside)
    remove_tree(doomed)
    remove_tree(alias)
    assert not doomed.exists() and not alias.is_symlink() and tree(outside) == before


def test_rundir_names_the_link_that_leads_out(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "data").symlink_to("/etc")
    run = RunDir(tmp_path / "run")
    with pytest.raises(DgptError, match=f"^{tmp_path}/run/data: a symbolic link to /etc, outside the run directory"):
        run.oracle_data("alpha")
    with pytest.raises(DgptError, match="run/data: a symbolic link to /etc"):
        run.check_links()
    assert run.metrics == tmp_path / "run" / "metrics.jsonl"


def test_a_received_checkpoint_claiming_an_impossible_shape_is_one_line(received, capsys):
    _, run, _ = received
    checkpoint = run / ROUND
    claimed = GPTConfig(**{**read_model_config(checkpoint / WEIGHTS).to_dict(), "d_model": 1_000_000, "n_head": 1})
    save_weights(checkpoint / WEIGHTS, {}, claimed)  # metadata is all a reader looks at before building the model
    write_checksums(checkpoint, CHECKSUMS)
    before = tree(run)
    for argv in (["generate", str(run), "--max-new-tokens", "2"], ["eval", str(run)]):
        capsys.readouterr()
        assert main(["-q", *argv]) == 2, argv
        line, = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"dgpt: error: {checkpoint / WEIGHTS}: ") and "for the weights alone, more than the" in line, line
    assert tree(run) == before


def test_a_finetuning_batch_that_cannot_fit_is_refused_before_anything_is_written(received, capsys):
    _, run, _ = received
    tmp = run.parent
    config = config_from_dict({
        "run_dir": str(tmp / "ft"), "oracles": [{"name": "alpha", "task": write_task(tmp / "tasks", "classification")}],
        "finetune": {"init_from": str(run), "batch_size": 10**9, "rounds": 1, "inner_steps": 1}})
    path = tmp / "ft.toml"
    path.write_text(dump_config(config))
    assert main(["-q", "finetune", str(path)]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert "finetune.batch_size 1,000,000,000 sequences of 32 tokens: training needs about" in line
    assert "more than the" in line and "physical memory on this machine" in line and not (tmp / "ft").exists()


@pytest.mark.parametrize("where, argv", [
    ("data/alpha/manifest.json", ["info", "{run}"]),
    (f"{ROUND}/{CHECKSUMS}", ["generate", "{run}", "--max-new-tokens", "2"]),
    ("metrics.jsonl", ["plot", "{run}"]),
    ("ledger.jsonl", ["ledger", "{run}"]),
])
def test_a_received_json_file_nested_too_deeply_is_one_line(received, capsys, where, argv):
    config, run, _ = received
    (run / where).write_text("[" * 100_000 + "\n")
    capsys.readouterr()
    code = main(["-q", *(a.format(cfg=config, run=run) for a in argv)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dgpt: error: ")]
    assert code == 2 and len(errors) == 1 and "unexpected" not in errors[0], errors  # after warnings (a skipped checkpoint)
