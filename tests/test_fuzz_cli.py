"""Generated bad configs and arguments through the CLI: each ends with exit status 2, exactly one stderr line
`dgpt: error: ...`, and the run directory byte-for-byte as it was (no file written, none deleted)."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgpt.cli import main
from dgpt.config import dump_config
from dgpt.config_ranges import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, RANGES

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
NOT_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])


def bad_values(rule) -> st.SearchStrategy:
    """Values that break a RANGES rule (ints for the integer keys, floats for the others)."""
    if rule is AT_LEAST_1:
        return st.integers(max_value=0)
    if rule is AT_LEAST_0:
        return st.integers(max_value=-1) | st.floats(max_value=-1e-9, allow_nan=False) | NOT_FINITE
    if rule is POSITIVE:
        return st.floats(max_value=0.0, allow_nan=False) | NOT_FINITE
    if rule is FRACTION:
        return st.floats(min_value=1.0) | st.floats(max_value=-1e-9) | NOT_FINITE
    raise ValueError(rule)


def toml(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    return repr(value)


INT_KEYS = {k for k, rule in RANGES.items() if rule is AT_LEAST_1 and not k.startswith("oracles")}
RANGE_OVERRIDES = st.one_of(*[
    bad_values(rule).map(lambda v, k=key: f"{k}={toml(int(v) if k in INT_KEYS and math.isfinite(v) else v)}")
    for key, rule in RANGES.items() if not key.startswith("oracles") and rule in (AT_LEAST_0, AT_LEAST_1, POSITIVE, FRACTION)
])
OTHER_OVERRIDES = st.one_of(
    st.sampled_from(["model.preset=huge", "federation.runtime=cloud", "federation.aggregator=krum", "pretrain.dtype=fp8",
                     "pretrain.steps=\"many\"", "seed=-1", "seed=99999999999", "model.n_head=5", "tokenizer.vocab_size=7",
                     "ledger.exact_max=40", "ledger.permutations=1", "finetune.max_len=2", "pretrain.device=tpu",
                     "federation.trim_fraction=0.5", "oracles.0.name=\"../../victim\"", "oracles.1.name=\"a/b\"",
                     "oracles.0.name=\".hidden\"", "oracles.0.weight=-1", "run_dir=\"\"", "nosuchsection.key=1",
                     "pretrain=3", "noequals",
                     # impossible shapes and schedules, values that exhaust the parser
                     "model.n_ctx=100000000", "model.d_model=1000000", "federation.rounds=100000000000000000000000",
                     "pretrain.steps=99999999999", "pretrain.grad_accum=1000000000000", "federation.timeout_s=1e300",
                     "seed=" + "[" * 3000 + "]" * 3000, "run_dir=" + "{a=" * 3000]),
    st.from_regex(r"pretrain\.[a-z]{3,8}z=1", fullmatch=True),  # unknown keys
)
COMMANDS = [["info"], ["prepare"], ["pretrain"], ["finetune"], ["eval"], ["count-pretokens", "--oracle", "alpha"]]
BAD_ARGS = [
    ["generate", "{run}", "--num-samples", "0"], ["generate", "{run}", "--num-samples", "100000"],
    ["generate", "{run}", "--top-k", "-3"], ["generate", "{run}", "--temperature", "-1"],
    ["generate", "{run}", "--top-p", "0"], ["generate", "{run}", "--top-p", "nan"],
    ["generate", "{run}", "--max-new-tokens", "0"], ["generate", "{run}", "--max-new-tokens", "x"],
    ["generate", "{run}", "--device", "cuda:7"], ["generate", "{run}", "--seed", "-1"],
    ["predict", "{run}", "--oracle", "../..", "--input", "{cfg}", "--output", "{out}"],
    ["predict", "{run}", "--oracle", "alpha", "--input", "{cfg}", "--output", "{run}"],
    ["predict", "{run}", "--oracle", "alpha", "--input", "{cfg}", "--output", "{out}", "--batch-size", "0"],
    ["count-pretokens", "{cfg}", "--oracle", "../../x"], ["count-pretokens", "{cfg}", "--oracle", "alpha", "--min-count", "0"],
    ["pretrain", "{cfg}", "--stop-after", "0"], ["eval", "{run}", "--max-windows", "-1"], ["demo", "--rounds", "0"],
    ["export", "{run}", "--format", "onnx", "{out}"], ["plot"], ["nosuchcommand"], ["pretrain", "{cfg}", "--bogus"],
    ["info", "{cfg}", "--set", "pretrain.lr=-1"], ["predict", "{run}", "--oracle", "nosuch", "--input", "{cfg}", "--output", "{out}"],
]


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared, trained run (one round) and its config file."""
    tmp = tmp_path_factory.mktemp("fuzz")
    config = tiny_config(tmp, federation={"rounds": 1, "inner_steps": 1})
    path = tmp / "config.toml"
    path.write_text(dump_config(config))
    assert main(["-q", "pretrain", str(path)]) == 0
    return path, config.run_path


def assert_refused(argv: list[str], run: Path, capsys) -> None:
    before = digest(run.parent)
    capsys.readouterr()
    assert main(argv) == 2, argv
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgpt: error: "), (argv, lines)
    assert digest(run.parent) == before, argv


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(COMMANDS), overrides=st.lists(RANGE_OVERRIDES | OTHER_OVERRIDES, min_size=1, max_size=3))
def test_bad_configs_are_refused_in_one_line_and_change_nothing(prepared, capsys, command, overrides):
    path, run = prepared
    target = str(run) if command[0] == "eval" else str(path)
    assert_refused(["-q", command[0], target, *command[1:], *[a for o in overrides for a in ("--set", o)]], run, capsys)


@pytest.mark.parametrize("argv", BAD_ARGS)
def test_bad_arguments_are_refused_in_one_line_and_change_nothing(prepared, capsys, argv):
    path, run = prepared
    names = {"run": str(run), "cfg": str(path), "out": str(run.parent / "out.jsonl")}
    assert_refused(["-q", *(a.format(**names) for a in argv)], run, capsys)


@pytest.mark.parametrize("argv", [["generate", "{run}", "--num-samples", "0"], ["pretrain", "{cfg}", "--set", "model.n_ctx=0"]])
def test_no_traceback_reaches_stderr_of_a_process(prepared, argv):
    path, run = prepared
    before = digest(run.parent)
    done = subprocess.run([sys.executable, "-m", "dgpt", *(a.format(run=run, cfg=path) for a in argv)],
                          capture_output=True, text=True, env=ENV)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("dgpt: error: "), done.stderr
    assert digest(run.parent) == before


LINK_COMMANDS = [["prepare", "{cfg}"], ["pretrain", "{cfg}"], ["info", "{run}"], ["eval", "{run}"], ["ledger", "{run}"],
                 ["generate", "{run}", "--max-new-tokens", "2"], ["plot", "{run}"]]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(min_value=0), command=st.sampled_from(LINK_COMMANDS))
def test_any_entry_of_a_run_made_a_link_out_changes_nothing_outside(prepared, capsys, pick, command):
    """Any file or folder of a trained run replaced by a link to a copy outside it: a writer refuses the run, a
    reader either never needs the entry or refuses it, naming the link; the copy outside stays as it was."""
    path, run = prepared
    with tempfile.TemporaryDirectory() as tmp:
        copy, outside = Path(tmp) / "run", Path(tmp) / "outside"
        shutil.copytree(run, copy)
        entries = sorted(p for p in copy.rglob("*") if p.name != "dgpt.lock")
        at = entries[pick % len(entries)]
        outside.mkdir()
        shutil.move(at, outside / at.name)
        at.symlink_to(outside / at.name)
        config = Path(tmp) / "config.toml"
        config.write_text(path.read_text().replace(f'run_dir = "{run}"', f'run_dir = "{copy}"'))
        before = digest(outside)
        capsys.readouterr()
        code = main(["-q", *(a.format(cfg=config, run=copy) for a in command)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert digest(outside) == before, (at, command)
        if command[0] in ("prepare", "pretrain") or code != 0:
            assert code == 2 and len(lines) == 1 and lines[0].startswith(f"dgpt: error: {at}: a symbolic link to "), (at, lines)
