"""A hostile config or command line, a second writer, a crash mid-write, a full disk: nothing escapes the run
directory, nothing complete is lost, and each ends in one `dgpt: error:` line. (The fuzz test is in test_fuzz_cli.py.)"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from dgpt import api
from dgpt.cli import main
from dgpt.config import dump_config, load_config
from dgpt.errors import DgptError
from dgpt.interop.hf import import_hf
from dgpt.model.config import PRESETS, GPTConfig
from dgpt.model.memory import check_training_fits
from dgpt.rundir import CHECKSUMS, WEIGHTS, RunDir
from dgpt.runlock import run_lock
from dgpt.train.checkpoint import load_weights_into
from dgpt.train.metrics import MetricsLog, read_metrics

PYTHON = [sys.executable]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgpt: error: "), err
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def write_config(tmp_path: Path, **sections) -> tuple[Path, object]:
    config = tiny_config(tmp_path, **sections)
    path = tmp_path / "config.toml"
    path.write_text(dump_config(config))
    return path, config


# --- 1. paths: nothing outside the run directory -----------------------------------------------------------

def test_oracle_named_like_a_path_writes_and_deletes_nothing_outside(tmp_path, capsys):
    path, config = write_config(tmp_path / "a")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    text = path.read_text().replace('name = "alpha"', 'name = "../../victim"')
    path.write_text(text)
    assert main(["prepare", str(path)]) == 2
    assert "oracles[0].name '../../victim' is not allowed" in one_error_line(capsys.readouterr().err)
    assert tree(victim) == {"keep.txt": b"mine"} and not config.run_path.exists()


@pytest.mark.parametrize("name", ["../../x", "..", "/etc/x", "a/b", ".hidden"])
def test_count_pretokens_and_predict_refuse_oracle_names_that_are_paths(tmp_path, capsys, name):
    path, config = write_config(tmp_path)
    before = tree(tmp_path)
    assert main(["count-pretokens", str(path), "--oracle", name]) == 2
    assert repr(name) in one_error_line(capsys.readouterr().err)
    config.run_path.mkdir(exist_ok=True)
    assert main(["predict", str(config.run_path), "--oracle", name, "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
    one_error_line(capsys.readouterr().err)
    assert tree(tmp_path) == before


def test_rundir_paths_stay_inside():
    run = RunDir("/r/run")
    assert run._inside("data", "alpha") == Path("/r/run/data/alpha")
    for parts in (("..", "x"), ("data", "..", "..", "x"), ("/etc",), (".",)):
        with pytest.raises(DgptError, match="outside the run directory"):
            run._inside(*parts)


def test_hf_index_may_only_name_files_in_its_own_directory(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(DgptError, match=r"weight_map names '\.\./outside\.safetensors', not a file of"):
        import_hf(hf, tmp_path / "out")


# --- 2. the run lock ----------------------------------------------------------------------------------------

HOLD = "import sys, time\nfrom dgpt.runlock import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"


def hold_lock(run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    holder = subprocess.Popen([*PYTHON, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env or ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    path, config = write_config(tmp_path)
    holder = hold_lock(config.run_path)
    try:
        second = subprocess.run([*PYTHON, "-m", "dgpt", "prepare", str(path)], capture_output=True, text=True, env=ENV)
        line = one_error_line(second.stderr)
        assert second.returncode == 2 and f"in use by pid {holder.pid} on {socket.gethostname()} since" in line
        assert not (config.run_path / "data").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["prepare", str(path)]) == 0  # the holder is gone: its lock is stale
    assert f"stale run lock of pid {holder.pid}" in capsys.readouterr().err
    assert not RunDir(config.run_path).lock.exists() and (config.run_path / "data" / "alpha").is_dir()


def test_ranks_of_one_torchrun_job_share_the_lock_and_other_jobs_do_not(tmp_path, monkeypatch):
    job = {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job1", "MASTER_ADDR": "h", "MASTER_PORT": "29400"}
    holder = hold_lock(tmp_path, {**ENV, **job})
    try:
        monkeypatch.setenv("RANK", "1")
        for key in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.setenv(key, job[key])
        with run_lock(tmp_path):  # rank 1 joins
            pass
        assert json.loads(RunDir(tmp_path).lock.read_text())["pid"] == holder.pid  # still the holder's
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job2")
        with pytest.raises(DgptError, match=f"in use by pid {holder.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_taking_the_lock_removes_temporary_files_of_interrupted_writes(tmp_path):
    old_file = tmp_path / "checkpoints" / ".round_0000003.k2j4h5g6.tmp"
    old_file.mkdir(parents=True)
    (old_file / WEIGHTS).write_bytes(b"half")
    old_tmp = tmp_path / ".metrics.jsonl.abcd1234.tmp"
    old_tmp.write_text("x")
    past = time.time() - 60
    for p in (old_file, old_tmp):
        os.utime(p, (past, past))
    lookalike = tmp_path / ".notes.tmp"  # not a name an atomic write makes
    lookalike.write_text("mine")
    with run_lock(tmp_path):
        fresh = tmp_path / ".config.toml.zzzz9999.tmp"  # written after the lock was taken: kept
        fresh.write_text("y")
    assert not old_file.exists() and not old_tmp.exists() and lookalike.exists() and fresh.exists()


# --- 3. checkpoints: checksums, fallback, torn metrics ----------------------------------------------------------

def central(tmp_path, steps):
    return tiny_config(tmp_path, federation={"runtime": "central"},
                       pretrain={"steps": steps, "checkpoint_interval": 2, "eval_interval": 2, "keep_checkpoints": 2})


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_and_resumes_as_if_uninterrupted(tmp_path, caplog):
    clean = central(tmp_path / "clean", 6)
    api.pretrain(clean)
    config = central(tmp_path / "crash", 6)
    api.pretrain(config, stop_after=4)
    run = RunDir(config.run_dir)
    assert json.loads((run.checkpoint("step", 4) / CHECKSUMS).read_text())["sha256"].keys() == {WEIGHTS, "state.pt"}
    flip_byte(run.checkpoint("step", 4) / WEIGHTS)
    assert run.latest_checkpoint() == run.checkpoint("step", 2)
    assert "step_0000004: corrupt checkpoint (model.safetensors does not match its SHA-256" in caplog.text
    api.pretrain(config)  # resumes from step 2, rewrites step 4, goes on to 6
    ours, theirs = api.load_pretrained(config.run_dir, "cpu")[0], api.load_pretrained(clean.run_dir, "cpu")[0]
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["step"] for r in read_metrics(run.metrics) if r["kind"] == "valid"] == [0, 2, 4, 6]


def test_every_checkpoint_corrupt_is_one_line_and_old_checkpoints_without_checksums_load(tmp_path, capsys):
    config = central(tmp_path, 2)
    api.pretrain(config)
    checkpoint = RunDir(config.run_dir).latest_checkpoint()
    (checkpoint / CHECKSUMS).unlink()  # as written before checksums were kept
    model, _ = api.load_pretrained(config.run_dir, "cpu")
    load_weights_into(model, checkpoint / WEIGHTS, model.config)
    api.pretrain(central(tmp_path, 4))  # resumes from it, writes step_4 with checksums
    run = RunDir(config.run_dir)
    flip_byte(run.checkpoint("step", 4) / "state.pt")
    assert run.latest_checkpoint() == checkpoint  # the one before, unchecked
    shutil.rmtree(checkpoint)
    capsys.readouterr()
    assert main(["generate", config.run_dir, "--max-new-tokens", "2"]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert "step_0000004: corrupt checkpoint" in warning and "every checkpoint is corrupt" in one_error_line(error)


def test_metrics_log_tolerates_a_torn_last_line_and_names_a_bad_one(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert "line 3 is cut short" in caplog.text
    log = MetricsLog(path, resume_after=2)
    log.log(step=3, loss=1.0)
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DgptError, match="metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(path)


def test_truncated_or_missing_oracle_state_is_one_line(tmp_path, capsys):
    path, config = write_config(tmp_path, federation={"rounds": 2, "inner_steps": 1})
    assert main(["-q", "pretrain", str(path), "--stop-after", "1"]) == 0
    capsys.readouterr()
    state = RunDir(config.run_dir).oracle_state("beta", 1)
    state.write_bytes(state.read_bytes()[:50])
    assert main(["-q", "pretrain", str(path)]) == 2
    assert "round_0000001.pt: unreadable oracle state" in one_error_line(capsys.readouterr().err)
    state.unlink()
    assert main(["-q", "pretrain", str(path)]) == 2
    assert "round_0000001.pt: oracle state file missing" in one_error_line(capsys.readouterr().err)


# --- 5. the environment: a full disk, permissions ------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_disk_full_during_a_checkpoint_is_one_line_and_the_last_checkpoint_survives(tmp_path):
    config = central(tmp_path, 2)
    api.pretrain(config)
    run = RunDir(config.run_dir)
    before = tree(run.checkpoint("step", 2))
    path = tmp_path / "more.toml"
    path.write_text(dump_config(config))
    # a file size limit below the weight file's size: writing step_4 fails like a full disk does
    done = subprocess.run([*PYTHON, "-m", "dgpt", "-q", "pretrain", str(path), "--set", "pretrain.steps=4"], capture_output=True, text=True, env=ENV,
                          preexec_fn=_file_size_limit(20_000))
    errors = [line for line in done.stderr.splitlines() if "dgpt: error:" in line or "Traceback" in line]
    line = errors[0][errors[0].index("dgpt: error:"):]  # after the progress bar
    assert len(errors) == 1 and done.returncode == 2 and "step_0000004/model.safetensors: file too large" in line and "intact" in line
    assert run.latest_checkpoint() == run.checkpoint("step", 2) and tree(run.checkpoint("step", 2)) == before
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]  # no half-written checkpoint left


def test_permission_denied_is_one_line(tmp_path, capsys, monkeypatch):
    path, config = write_config(tmp_path)

    def denied(*args, dir=None, **kwargs):  # what mkstemp raises in a directory the user may not write
        raise PermissionError(13, "Permission denied", f"{dir}/.x.tmp")

    monkeypatch.setattr("dgpt.fileio.tempfile.mkstemp", denied)
    assert main(["-q", "prepare", str(path)]) == 2
    assert one_error_line(capsys.readouterr().err).endswith(f"{config.run_path}/.x.tmp: permission denied")


def test_written_files_get_the_umask_permissions(tmp_path):
    from dgpt.fileio import write_text

    before = os.umask(0o022)
    try:
        write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


# --- 4. config values out of range ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.lr=-1", "'pretrain.lr' must be > 0, got -1.0"),
        ("pretrain.lr=inf", "'pretrain.lr' must be a finite number, got inf"),
        ("pretrain.lr=nan", "'pretrain.lr' must be a finite number"),
        ("pretrain.checkpoint_interval=0", "'pretrain.checkpoint_interval' must be >= 1, got 0"),
        ("pretrain.keep_checkpoints=-1", "'pretrain.keep_checkpoints' must be >= 1"),
        ("pretrain.warmup_steps=-5", "'pretrain.warmup_steps' must be >= 0"),
        ("pretrain.grad_clip=-1", "'pretrain.grad_clip' must be >= 0"),
        ("federation.clip_norm=-0.5", "'federation.clip_norm' must be >= 0"),
        ("federation.timeout_s=0", "'federation.timeout_s' must be in (0, 1e+07] seconds"),
        ("model.n_ctx=0", "'model.n_ctx' must be >= 1, got 0"),
        ("model.embd_dropout=1.5", "'model.embd_dropout' must be in [0, 1), got 1.5"),
        ("model.n_head=3", "[model]: d_model 128 is not divisible by n_head 3"),
        ("pretrain.device=\"gpu\"", "'pretrain.device' must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("finetune.beta2=1.0", "'finetune.beta2' must be in [0, 1)"),
        ("tokenizer.vocab_size=100", "'tokenizer.vocab_size' must be >= 261"),
        ("oracles.0.weight=-2", "'oracles[0].weight' must be >= 0"),
        ("federation.aggregator=\"krum\"", "federation.aggregator' is 'krum'"),
        ("federation.inner_steps=0", "inner_steps' must be >= 1"),
        ("federation.compression=\"fp8\"", "federation.compression' is 'fp8'"),
        ("federation.extrapolation=\"adam\"", "federation.extrapolation' is 'adam'; expected one of none, fedexp"),
        ("federation.mean_weights=\"given\"", "have no weight"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path, override, message):
    path = tmp_path / "c.toml"
    path.write_text('[[oracles]]\nname = "a"\ntrain = ["x.txt"]\n')
    with pytest.raises(DgptError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        load_config(path, [override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    path, _ = write_config(tmp_path)
    assert main(["-q", "pretrain", str(path), "--set", "pretrain.device=\"cuda\""]) == 2
    assert "device 'cuda' is not available" in one_error_line(capsys.readouterr().err)


def test_predict_output_naming_a_directory_is_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "--oracle", "a", "--input", "x.jsonl", "--output", str(tmp_path)]) == 2
    assert "--output is a directory" in one_error_line(capsys.readouterr().err)


# --- 6. inputs that would exhaust memory or the parser ------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "arrays or inline tables nested too deeply to read"),
    ("x = " + "{y = " * 3000 + "1" + "}" * 3000 + "\n", "arrays or inline tables nested too deeply to read"),
    ("# " + "x" * (1 << 20) + "\n", "bytes; a config is at most 1,048,576"),
])
def test_a_config_that_exhausts_the_parser_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["info", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"dgpt: error: {path}: ") and message in line


@pytest.mark.parametrize("override, message", [
    ("model.n_ctx=100000000", "[model]: 12,801,"),
    ("model.d_model=1000000", "[model]: 16,012,"),
    ("federation.rounds=100000000000000000000000", "'federation.inner_steps' x 'pretrain.grad_accum' = 5e+25: a run of more than 1e+10"),
    ("pretrain.steps=20000000000", "'pretrain.steps' x 'pretrain.grad_accum' = 2e+10"),
    ("pretrain.grad_accum=1000000000000", "'federation.rounds' x 'federation.inner_steps' x 'pretrain.grad_accum' = 5e+15"),
    ("federation.timeout_s=1e300", "'federation.timeout_s' must be in (0, 1e+07] seconds, got 1e+300"),
    ("finetune.epochs=1e12", "'finetune.epochs' = 1e+12"),
])
def test_absurd_shapes_and_schedules_are_refused_when_the_config_is_read(tmp_path, override, message):
    with pytest.raises(DgptError, match=re.escape(message)):
        load_config(None, [override])


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, capsys):
    path, config = write_config(tmp_path)
    assert main(["-q", "pretrain", str(path), "--set", "pretrain.batch_size=100000000"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "pretrain.batch_size 100,000,000 sequences of 32 tokens: training needs about" in line
    assert "physical memory on this machine" in line and not config.run_path.exists()


def test_the_memory_estimate_accepts_gpt1_on_24_gib():
    gpt1 = GPTConfig(vocab_size=40478, **PRESETS["gpt1"])
    check_training_fits(gpt1, 16, 512, 4, 24 * 2**30, "24 GiB", "pretrain.batch_size 16")  # four oracles in one process
    with pytest.raises(DgptError, match=r"pretrain.batch_size 96 sequences of 512 tokens: training needs about 32\.3 GiB"):
        check_training_fits(gpt1, 96, 512, 1, 24 * 2**30, "24 GiB", "pretrain.batch_size 96")
    check_training_fits(gpt1, 64, 512, 1, 24 * 2**30, "24 GiB", "pretrain.batch_size 64")
    with pytest.raises(DgptError, match=r"activations and per-example gradients 48\.1 GiB"):  # DP-SGD: 64 x 4P more
        check_training_fits(gpt1, 64, 512, 1, 24 * 2**30, "24 GiB", "pretrain.batch_size 64", private=True)
