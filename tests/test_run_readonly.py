"""Commands that read a run write nothing into it (plot: only its plots), and read the directory they are given."""

import hashlib
import shutil

import pytest
from conftest import tiny_config
from taskdata import write_task

from dgpt import api
from dgpt.cli import main
from dgpt.config import config_from_dict
from dgpt.rundir import RunDir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("trained"), federation={"rounds": 2, "inner_steps": 1})
    api.pretrain(config)
    return config.run_path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("finetuned")
    oracles = [{"name": kind, "task": write_task(root, kind)} for kind in ("classification", "similarity")]
    config = config_from_dict({"run_dir": str(root / "run"), "oracles": oracles, "finetune": {
        "init_from": str(trained), "rounds": 1, "inner_steps": 1, "batch_size": 4}}, "<test>")
    api.finetune(config)
    return config.run_path


def contents(root) -> dict[str, str]:
    """Every file and folder under root -> the sha256 of its bytes ('dir' for a folder)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in root.rglob("*")}


def writes(root) -> dict[str, tuple[int, int]]:
    """Every file under root -> (inode, mtime): changed by any rewrite, even one of the same bytes."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("run, command", [
    ("trained", ["eval", "--max-windows", "2"]), ("trained", ["eval", "--full"]), ("trained", ["info"]),
    ("trained", ["generate", "--max-new-tokens", "4"]), ("finetuned", ["eval"]), ("finetuned", ["info"]),
])
def test_reading_a_run_leaves_it_byte_identical(request, capsys, run, command):
    run = request.getfixturevalue(run)
    before, written = contents(run), writes(run)
    assert main([command[0], str(run), *command[1:]]) == 0
    assert contents(run) == before  # no file changed, added or removed
    assert writes(run) == written  # nor rewritten


def test_plot_writes_only_the_plots(trained, capsys):
    pytest.importorskip("matplotlib")
    before = contents(trained)
    assert main(["plot", str(trained)]) == 0
    plots = RunDir(trained).plots.name
    assert {k: v for k, v in contents(trained).items() if not k.startswith(plots)} == before


def test_a_moved_run_is_read_where_it_is(trained, tmp_path, capsys):
    original, moved = tmp_path / "original", tmp_path / "moved"
    shutil.copytree(trained, original)
    shutil.copytree(original, moved)
    shutil.rmtree(original)  # its config.toml still names the directory it was trained in
    assert api.load_run_config(moved).run_dir == str(moved)
    assert main(["eval", str(moved), "--max-windows", "2"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ("alpha", "beta", "gamma")) and "perplexity" in table
    assert main(["info", str(moved)]) == 0
    info = capsys.readouterr().out
    assert f"run_dir     {moved}" in info and "alpha: train" in info and str(RunDir(moved).checkpoint("round", 2)) in info
    assert not original.exists()
