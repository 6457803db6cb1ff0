"""What the signed contribution ledger costs per round at 5 oracles: seconds of signing and verifying, bytes of
ledger and receipts. Called by `python benchmarks/ledger.py --signing` (alone on the machine; `--quick`: a smoke
run that prints the table and writes nothing).

A short real sim run (5 oracles of synthetic text, a 2-layer d_model 32 model, exact Shapley: 31 coalitions per
round) gives real records, heads and receipts; each signing or checking step is then timed on them, as many
times as `repeats`, and the median per round is reported. Signing and verifying cost the same at any model size
(they cover hashes); hashing the payload and the parameters grows with the model and is timed by the ledger's
own `cost.seconds` in the rounds of `benchmarks/ledger.py`.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from dgpt import api
from dgpt.config import AGGREGATOR, config_from_dict
from dgpt.federation.evidence import head_of_record_problem, record_problem
from dgpt.federation.ledger import line_of, record_sha256
from dgpt.federation.signing import head_problem, new_key, opened, sign, sign_head
from dgpt.rundir import RunDir
from dgpt.runtimes.identity import append_line
from dgpt.train.metrics import read_metrics

ORACLES = 5
WORDS = "the a king river code table music sea light stone rain word list value night song city field".split()


def synthetic_run(root: Path, rounds: int):
    """A finished 5-oracle sim run on random sentences (each oracle its own share of the vocabulary)."""
    rng, oracles = random.Random(0), []
    for i in range(ORACLES):
        words = WORDS[i * 3: i * 3 + 8]
        for split, docs in (("train", 60), ("valid", 8)):
            path = root / "corpus" / f"o{i}" / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(docs)) + "\n")
        oracles.append({"name": f"o{i}", "train": [str(root / "corpus" / f"o{i}" / "train.txt")],
                        "valid": [str(root / "corpus" / f"o{i}" / "valid.txt")]})
    config = config_from_dict({
        "run_dir": str(root / "run"), "oracles": oracles, "tokenizer": {"vocab_size": 300},
        "model": {"preset": "tiny", "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "n_ctx": 32},
        "pretrain": {"batch_size": 4, "eval_windows": 4, "dtype": "float32"},
        "federation": {"runtime": "sim", "rounds": rounds, "inner_steps": 1}, "log": {"progress_interval_s": 0},
    }, "<signing benchmark>")
    api.pretrain(config)
    return RunDir(config.run_dir)


def per_round(step, rows: list[tuple[dict, str]], repeats: int) -> float:
    """Median over `repeats` of the mean seconds `step(record, line)` takes per round record."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for record, line in rows:
            step(record, line)
        times.append((time.perf_counter() - t0) / len(rows))
    return statistics.median(times)


def signing_cost(root: Path, rounds: int = 4, repeats: int = 50) -> str:
    """Markdown tables: seconds of each signing and checking step per round, and bytes per round."""
    run = synthetic_run(root, rounds)
    lines = run.ledger.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    genesis, keys, sizes = record_sha256(lines[0]), records[0]["keys"], records[0]["sizes"]
    heads = {h["round"]: h for h in read_metrics(run.ledger_heads)}
    signer, receipts = new_key(), Path(tempfile.mkdtemp()) / "receipts.jsonl"

    def oracles_sign(record, line):
        for row in record["oracles"].values():
            for signed in ([row["statement"]] if "statement" in row else []) + row.get("reports", []):
                sign(signer, json.loads(signed["body"]))

    def aggregator_checks_and_signs(record, line):
        for name, row in record["oracles"].items():
            if "statement" in row:
                opened(row["statement"], keys[name])
        sign_head(signer, record["round"], record_sha256(line), record["prev"], genesis)

    def oracles_keep_receipts(record, line):
        for _ in range(ORACLES):
            head_problem(heads[record["round"]], keys[AGGREGATOR])
            append_line(receipts, line_of(heads[record["round"]]))

    def audit(record, line):
        head_of_record_problem(heads[record["round"]], record, line, genesis, keys[AGGREGATOR])
        record_problem(record, genesis, keys, sizes)

    rows = list(zip(records[1:], lines[1:]))
    table = ["| per round, 5 oracles | seconds |", "|---|---|"]
    for label, step in (("every oracle signs its statement and its loss report", oracles_sign),
                        ("the aggregator checks every statement and signs the head", aggregator_checks_and_signs),
                        ("every oracle checks the head and appends its receipt (fsync)", oracles_keep_receipts),
                        ("`dgpt ledger` checks the record: signatures, statements, values recomputed", audit)):
        table.append(f"| {label} | {per_round(step, rows, repeats):.6f} |")
    bare = [len(line_of({**r, "oracles": {n: {k: v for k, v in o.items() if k not in ("statement", "reports")}
                                          for n, o in r["oracles"].items()}})) + 1 for r in records[1:]]
    signed = [len(line) + 1 for line in lines[1:]]
    head = statistics.mean(len(line_of(h)) + 1 for r, h in heads.items() if r > 0)
    table += ["", "| per round, 5 oracles | bytes |", "|---|---|",
              f"| ledger record | {statistics.mean(signed):,.0f} |",
              f"| of which the oracles' signed statements and loss reports | {statistics.mean(signed) - statistics.mean(bare):,.0f} |",
              f"| signed head (ledger_heads.jsonl) | {head:,.0f} |",
              f"| each oracle's receipts.jsonl | {head:,.0f} |"]
    return "\n".join(table)
