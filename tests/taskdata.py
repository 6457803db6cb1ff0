"""Small synthetic labeled tasks (JSONL) for the fine-tuning tests, in the words of conftest's oracles."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import _WORDS


def _sentence(rng: random.Random, domain: str, lo: int = 3, hi: int = 9) -> str:
    return " ".join(rng.choice(_WORDS[domain]) for _ in range(rng.randint(lo, hi)))


def _rows(kind: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.sample(["alpha", "beta", "gamma"], 2)
        if kind == "classification":
            rows.append({"text": _sentence(rng, a), "label": a})
        elif kind == "entailment":
            same = rng.random() < 0.5
            rows.append({"premise": _sentence(rng, a), "hypothesis": _sentence(rng, a if same else b), "label": int(not same)})
        elif kind == "similarity":
            same = rng.random() < 0.5
            rows.append({"text_a": _sentence(rng, a), "text_b": _sentence(rng, a if same else b), "label": int(same)})
        elif kind == "regression":
            same = rng.random() < 0.5
            rows.append({"text_a": _sentence(rng, a), "text_b": _sentence(rng, a if same else b), "label": 4.0 * same + rng.random()})
        else:
            k = rng.randrange(2)
            choices = [_sentence(rng, b), _sentence(rng, b)]
            choices[k] = _sentence(rng, a)
            rows.append({"context": _sentence(rng, a), "question": "effect", "choices": choices, "label": k})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task(root: Path, kind: str, n_train: int = 40, n_valid: int = 12, seed: int = 0) -> dict:
    """{type, train, valid[, regression]} for an [oracles.task] table, files written under root/kind/."""
    rng = random.Random(seed)
    train = write_jsonl(root / kind / "train.jsonl", _rows(kind, n_train, rng))
    valid = write_jsonl(root / kind / "valid.jsonl", _rows(kind, n_valid, rng))
    task = {"type": "similarity" if kind == "regression" else kind, "train": [str(train)], "valid": [str(valid)]}
    if kind == "regression":
        task["regression"] = True
    return task
