"""Shared fixtures: small synthetic oracles, tiny model configs, and the real data when present."""

from __future__ import annotations

import os

# torch's OpenMP threads spin while they wait for each other; on a busy 2-core machine that makes
# every step many times slower. Passive waiting costs nothing measurable on an idle one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from dgpt.config import Config, FederationConfig, config_from_dict  # noqa: E402
from dgpt.federation.codec import Codec  # noqa: E402
from dgpt.federation.strategy import Strategy  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# "domains" with different vocabularies so that oracles are non-IID (the first three in most tests)
_WORDS = {
    "alpha": "the king queen castle sword knight lord lady crown battle horse".split(),
    "beta": "function return value list dict string integer error module class".split(),
    "gamma": "hello thanks yes no maybe movie music game friend weekend".split(),
    "delta": "river mountain forest rain snow cloud wind stone field valley".split(),
    "epsilon": "price market bank loan trade stock money buyer seller profit".split(),
}


def write_corpus(root: Path, name: str, docs: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    words = _WORDS[name]
    paths = []
    for split, count in (("train", docs), ("valid", max(docs // 8, 4))):
        text = "\n\n".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(count)
        )
        path = root / name / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def tiny_config(tmp_path: Path, names=("alpha", "beta", "gamma"), docs=(120, 80, 160), **sections) -> Config:
    """A 2-layer, d_model 32 model on small synthetic oracles of unequal size; sections override. fp32 (not the
    default "auto", bf16 on CPUs that have it): the tests compare runtimes and resumes to float tolerance."""
    oracle_rows = []
    for i, (name, n) in enumerate(zip(names, docs)):
        train, valid = write_corpus(tmp_path / "corpus", name, n, seed=i)
        oracle_rows.append({"name": name, "train": [str(train)], "valid": [str(valid)]})
    data = {
        "run_dir": str(tmp_path / "run"),
        "seed": 7,
        "model": {"preset": "tiny", "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "n_ctx": 32},
        "tokenizer": {"vocab_size": 300},
        "oracles": oracle_rows,
        "pretrain": {"steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_windows": 4,
                     "log_interval": 1, "eval_interval": 4, "checkpoint_interval": 4, "dtype": "float32"},
        "federation": {"runtime": "sim", "rounds": 3, "inner_steps": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return config_from_dict(data, "<test>")


def strategy(weights, numel, kind="none", **fed) -> Strategy:
    """A Strategy over `numel` parameters at Theta = 0, `kind` the codec's compression, `fed` FederationConfig fields."""
    return Strategy(FederationConfig(**fed), Codec(kind, [numel]), weights, torch.zeros(numel), seed=0)


def extended(config: Config, **federation) -> Config:
    """The same run with [federation] keys changed (its rounds raised: the run extended)."""
    return dataclasses.replace(config, federation=dataclasses.replace(config.federation, **federation))


def rounds(config: Config, kind: str = "round") -> list[dict]:
    """The run's metrics rows of one kind."""
    return [r for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == kind]


def host_config(tmp_path: Path, host: str, holds: set[str], **tiny) -> Config:
    """`tiny_config` as one host sees it: its own run_dir, and no text of the oracles it does not hold."""
    config = tiny_config(tmp_path, **tiny)
    absent = tmp_path / f"not_on_{host}"
    oracles = [o if o.name in holds else dataclasses.replace(o, train=[str(absent / "train.txt")], valid=[str(absent / "valid.txt")])
               for o in config.oracles]
    return dataclasses.replace(config, run_dir=str(tmp_path / host), oracles=oracles)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield
