"""What every federated benchmark shares (dupt.py, poison.py, bf16_parity.py): the corpora and oracles of
../shared/data/pretrain, the tiny and quick model setups, one arm's config, fresh run directories that reuse one
prepared tokenizer and shards, the central and sim runners, and the token-weighted global validation loss.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

os.environ.setdefault("TQDM_MININTERVAL", "30")  # keep the nohup log readable; read when tqdm is imported

from dgpt import api  # noqa: E402
from dgpt.config import config_from_dict  # noqa: E402
from dgpt.logs import messages_to  # noqa: E402
from dgpt.runtimes.sim import pretrain_sim  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
ORACLES = ["literature_shakespeare", "encyclopedia_wikitext2", "technical_python_docs", "dialogue_topical_chat"]
LARGE = DATA.parent / "pretrain_large"
DATASETS = {  # --data: oracle -> folder of its train.txt / valid.txt
    "small": {n: DATA / n for n in ORACLES},
    "large": {"literature_gutenberg": LARGE / "literature_gutenberg", "encyclopedia_wikitext2": DATA / "encyclopedia_wikitext2",
              "technical_linux_kernel_docs": LARGE / "technical_linux_kernel_docs",
              "dialogue_topical_chat": DATA / "dialogue_topical_chat"},
}
SHORT = {"literature_shakespeare": "shakesp.", "encyclopedia_wikitext2": "wiki", "technical_python_docs": "pydocs",
         "dialogue_topical_chat": "dialogue"}
POISONED = "dialogue_topical_chat"  # the largest oracle: the heaviest weight under the token-weighted mean
POISON_SCALE = -10.0
VOCAB = 4096
FULL = dict(model={"preset": "tiny", "n_layer": 2, "d_model": 128, "n_head": 4, "d_ff": 512, "n_ctx": 64},
            batch=8, eval_windows=48, evals=12)
QUICK = dict(model={"preset": "tiny", "n_layer": 1, "d_model": 64, "n_head": 2, "d_ff": 256, "n_ctx": 32},
             batch=4, eval_windows=8, evals=4)


def base_config(run_dir: Path, setup: dict, steps: int, batch: int, fed: dict, eval_interval: int) -> dict:
    """One arm's config; the decentralised arms' inner AdamW may have its own lr (`--inner-lr`)."""
    lr = setup["inner_lr"] if fed.get("runtime") == "sim" else setup["lr"]
    return {
        "run_dir": str(run_dir), "seed": setup.get("seed", 1337), "model": setup["model"], "tokenizer": {"vocab_size": VOCAB},
        "oracles": [{"name": n, "train": [str(d / "train.txt")], "valid": [str(d / "valid.txt")]}
                    for n, d in DATASETS[setup.get("data", "small")].items()],
        "pretrain": {"steps": steps, "batch_size": batch, "lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 20),
                     "eval_interval": eval_interval, "eval_windows": setup["eval_windows"], "log_interval": 10**9,
                     "checkpoint_interval": 10**9, "keep_checkpoints": 1,
                     "device": setup.get("device", "cpu"), "dtype": setup.get("dtype", "float32")},
        "federation": {"outer_lr": setup["outer_lr"], "outer_momentum": setup["outer_momentum"], "nesterov": True,
                       "checkpoint_interval": 10**9, **fed},
        "ledger": {"method": "off"},  # the arms compare training, not contributions (benchmarks/ledger.py does those)
    }


def fresh_run_dir(runs: Path, name: str) -> Path:
    """An empty run dir holding a copy of the shared tokenizer and shards (prepare verifies and reuses them)."""
    run_dir = runs / name.replace(" ", "_").replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    shared = runs / "_data"
    shutil.copytree(shared / "data", run_dir / "data")
    for f in ("tokenizer.json", "tokenizer.fingerprint.json"):
        shutil.copy2(shared / f, run_dir / f)
    return run_dir


@contextmanager
def messages_as(label: str):
    """dgpt's messages printed as `  [label] message` while the block runs."""
    with messages_to(logging.StreamHandler(sys.stdout), fmt=f"  [{label}] %(message)s"):
        yield


def run_central(run_dir: Path, setup: dict, steps: int, fed: dict, poisoned: bool, oracles_per_batch: int = 4) -> list[dict]:
    """Pooled data, global batch = 4 x the per-oracle batch (the control: 1 x), `steps` steps."""
    config = config_from_dict(base_config(run_dir, setup, steps, oracles_per_batch * setup["batch"], {"runtime": "central"},
                                          max(1, steps // setup["evals"])))
    with messages_as("central"):
        api.pretrain(config)
    return [{"tokens": r["tokens"], "oracles": r["oracles"], "step": r["step"]}
            for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "valid"]


def run_sim(run_dir: Path, setup: dict, steps: int, fed: dict, poisoned: bool, iid: bool = False) -> list[dict]:
    """The sim runtime with `steps` inner steps per oracle in total: steps / H rounds. `iid`: every oracle
    trains on the pooled corpus (and keeps its own validation set), with the shared tokenizer."""
    rounds = steps // fed["inner_steps"]
    fed = {"runtime": "sim", "rounds": rounds, "eval_interval": max(1, rounds // setup["evals"]), **fed}
    raw = base_config(run_dir, setup, steps, setup["batch"], fed, 1)
    if iid:
        pooled = [o["train"][0] for o in raw["oracles"]]
        raw["oracles"] = [{**o, "train": pooled} for o in raw["oracles"]]
        raw["tokenizer"] = {"vocab_size": VOCAB, "path": str(run_dir / "tokenizer.json")}
    config = config_from_dict(raw)
    tamper = (lambda name, delta: delta * POISON_SCALE if name == POISONED else delta) if poisoned else None
    with messages_as(run_dir.name):
        pretrain_sim(config, tamper=tamper)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "round"]
    keys = ("round", "tokens", "oracles", "bytes_total", "bytes_sent", "dp_bytes", "agreement", "outer_scale")
    return [{k: r.get(k, 0) for k in keys} for r in rows if "oracles" in r]


RUNNERS = {"central": run_central, "central_one_batch": partial(run_central, oracles_per_batch=1), "sim": run_sim,
           "sim_iid": partial(run_sim, iid=True)}


def global_loss(oracles: dict[str, float], weights: dict[str, int]) -> float:
    """Token-weighted mean of per-oracle losses over the oracles in `weights`."""
    return sum(oracles[n] * weights[n] for n in weights) / sum(weights.values())

