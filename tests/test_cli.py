"""The `dgpt` command line end to end, and its one-line errors for bad input."""

import subprocess
import sys

import pytest
from conftest import tiny_config

from dgpt import api
from dgpt.cli import main
from dgpt.config import dump_config
from dgpt.train.metrics import read_metrics


@pytest.fixture
def config_file(tmp_path):
    config = tiny_config(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(dump_config(config))
    return path, config


def test_prepare_pretrain_eval_generate_info(config_file, capsys):
    path, config = config_file
    assert main(["prepare", str(path)]) == 0
    assert "alpha: train" in capsys.readouterr().err  # messages go to stderr, results to stdout
    assert main(["pretrain", str(path), "--set", "federation.rounds=2", "--set", "federation.inner_steps=2"]) == 0
    out, err = capsys.readouterr()
    assert "final global validation loss" in out and "synchronous data parallel would have moved" in err
    rows = read_metrics(config.run_path / "metrics.jsonl")
    assert [r["round"] for r in rows if r["kind"] == "round"] == [0, 1, 2]
    assert (config.run_path / "config.toml").is_file() and (config.run_path / "tokenizer.json").is_file()

    assert main(["eval", str(config.run_path)]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ("alpha", "beta", "gamma")) and "perplexity" in table

    assert main(["generate", str(config.run_path), "--prompt", "the king", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert main(["generate", str(config.run_path), "--prompt", "the king", "--min-new-tokens", "6", "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.strip()) > len("the king")
    assert main(["generate", str(config.run_path), "--min-new-tokens", "9", "--max-new-tokens", "8"]) == 2
    assert capsys.readouterr().err == "dgpt: error: min_new_tokens 9 exceeds max_new_tokens 8\n"

    assert main(["info", str(config.run_path)]) == 0
    info = capsys.readouterr().out
    assert "parameters" in info and "alpha: train" in info and "round_0000002" in info


def test_central_runtime_from_the_command_line(config_file, capsys):
    path, config = config_file
    assert main(["pretrain", str(path), "--set", "federation.runtime=central", "--set", "pretrain.steps=3"]) == 0
    steps = [r["step"] for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3]


def test_messages_go_to_stderr_and_quiet_or_verbose_choose_which(config_file, capsys):
    path, _ = config_file
    result = subprocess.run([sys.executable, "-m", "dgpt", "prepare", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "alpha: train" in result.stderr and result.stdout == ""
    assert main(["-q", "prepare", str(path)]) == 0
    assert capsys.readouterr() == ("", "")  # no INFO line
    assert main(["prepare", str(path), "--quiet"]) == 0  # after the command too
    assert capsys.readouterr() == ("", "")
    assert main(["-v", "prepare", str(path)]) == 0
    assert "tokenizer: reused" in capsys.readouterr().err
    assert main(["info", str(path), "-v"]) == 0
    assert "alpha: train" in capsys.readouterr().out


def test_unexpected_error_is_one_line_unless_verbose(config_file, capsys, monkeypatch):
    path, _ = config_file

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nand more")

    monkeypatch.setattr(api, "prepare", broken)
    assert main(["prepare", str(path)]) == 1
    assert capsys.readouterr().err == "dgpt: error: unexpected RuntimeError: boom (rerun with -v for the traceback)\n"
    with pytest.raises(RuntimeError, match="boom"):
        main(["-v", "prepare", str(path)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "pretrain.stepz=3"], "unknown config key 'pretrain.stepz'"),
        (["--set", "pretrain.steps=\"many\""], "'pretrain.steps' must be int"),
        (["--set", "model.preset=huge"], "'model.preset' is 'huge'; expected one of tiny, small, gpt1"),
        (["--set", "federation.runtime=cloud"], "'federation.runtime' is 'cloud'"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(config_file, capsys, args, message):
    path, _ = config_file
    assert main(["-q", "pretrain", str(path), *args]) == 2  # -q: the shards prepared before [model] is read say nothing
    err = capsys.readouterr().err.strip()
    assert err.startswith("dgpt: error:") and message in err and "\n" not in err


def test_unknown_key_in_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nn_layers = 3\n")
    assert main(["info", str(path)]) == 2
    assert f"{path}: unknown config key 'model.n_layers'" in capsys.readouterr().err


def test_missing_config_and_missing_run(tmp_path, capsys):
    assert main(["pretrain", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: config file not found" in capsys.readouterr().err
    assert main(["generate", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_demo_runs_offline_end_to_end(tmp_path, capsys):
    run = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "dgpt", "demo", "--run-dir", str(run), "--rounds", "2", "--inner-steps", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for oracle in ("stdlib_text_net", "stdlib_numeric_data", "stdlib_source"):
        assert oracle in out
    assert "valid loss before" in out and "samples:" in out and "synchronous data parallel" in out
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "round"]
    assert all(rows[-1]["oracles"][n] < rows[0]["oracles"][n] for n in rows[0]["oracles"])
    receipts = sorted(str(p) for p in run.glob("oracles/*/receipts.jsonl"))
    assert len(receipts) == 3 and main(["ledger", str(run), "--receipts", *receipts, "--keys", str(run / "keys")]) == 0
    assert "receipts of 'stdlib_source' confirm rounds 0-2" in capsys.readouterr().out


def test_prepare_and_count_pretokens_do_not_load_torch(config_file):
    """Preparing an oracle's data (often a data owner's first step, on a machine without a GPU stack) costs no torch
    import: the config's model shape is checked without it."""
    path, config = config_file
    code = ("import sys; from dgpt.cli import main; "
            f"assert main(['prepare', {str(path)!r}]) == 0; "
            f"assert main(['count-pretokens', {str(path)!r}, '--oracle', 'alpha', '--out', {str(path.parent / 'a.json')!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (config.run_path / "tokenizer.json").is_file() and (path.parent / "a.json").is_file()
