"""`dgpt ledger RUN_DIR [--receipts FILE ...] [--keys DIR]`: check a run's contribution ledger and total what each
oracle gave.

The chain must hold record by record (each `prev` is the SHA-256 of the line before), each record's head must
carry the aggregator's signature, each round must start from the parameters the round before ended with, every
accepted oracle's signed statement must match its record, every value must follow from the signed losses, and
where a round checkpoint is kept its weights must hash to the record's `theta_after` and its state must anchor
that very record (`ledger_head`). The public keys are the genesis record's, checked against `--keys DIR`
(`PARTY.pub` files) when given; each `--receipts` file (an oracle's receipts.jsonl) must find every signed head
it holds in the ledger at its round, which is what a rewriting aggregator cannot fake. The first thing that does
not match ends the check naming its round (and oracle). Reads the run, writes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from dgpt.errors import DgptError
from dgpt.config import AGGREGATOR
from dgpt.federation.evidence import head_of_record_problem, receipts_problem, record_problem
from dgpt.federation.ledger import check_chain, record_sha256, weights_sha256
from dgpt.rundir import WEIGHTS, RunDir, checkpoint_number
from dgpt.runtimes.identity import read_public
from dgpt.train.metrics import read_metrics
from dgpt.train.checkpoint import load_state


@dataclass
class OracleTotal:
    rounds: int = 0  # rounds it sent an update in (accepted or rejected)
    accepted: int = 0
    tokens: int = 0
    bytes: int = 0
    value: float = 0.0  # cumulative contribution: the sum of its per-round values (validation loss reduction)
    share: float = 0.0  # its value over the sum of every oracle's


@dataclass
class LedgerSummary:
    rounds: int
    head: str  # SHA-256 of the last record: publish it and anyone holding the ledger can check it
    checkpoints_checked: int
    oracles: dict[str, OracleTotal] = field(default_factory=dict)
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # oracle -> (round, cumulative value)
    keys_checked: list[str] = field(default_factory=list)  # parties whose genesis key matched a --keys file
    confirmed: dict[str, list[int]] = field(default_factory=dict)  # receipts file -> the rounds its heads confirm
    replayed: dict[str, list[int]] = field(default_factory=dict)  # receipts file -> rounds redone after a resume


def verify_ledger(run_dir: str | Path, receipts: list[Path] = (), keys_dir: Path | None = None) -> LedgerSummary:
    """Check a run's ledger against itself, its signatures, the oracles' receipts and its round checkpoints; raise
    DgptError on the first mismatch."""
    run = RunDir(run_dir)
    path = run.ledger
    if not path.is_file():
        raise DgptError(f"{path}: not found; is {run.root} a federated run?")
    lines = path.read_text(encoding="utf-8").splitlines()
    records, problem = check_chain(lines)
    if problem:
        raise DgptError(f"{path}: {problem}")
    if not records or records[0].get("kind") != "genesis":
        raise DgptError(f"{path}: the first record is not a genesis record")
    genesis, keys = records[0], records[0].get("keys")
    if not isinstance(keys, dict) or AGGREGATOR not in keys or not all(n in keys for n in genesis.get("oracles", [])):
        raise DgptError(f"{path}: the genesis record names no signing keys (a ledger written before dgpt signed them)")
    checked_keys = _check_keys(keys, keys_dir, path) if keys_dir is not None else []
    genesis_hash = record_sha256(lines[0])
    heads = read_metrics(run.ledger_heads) if run.ledger_heads.is_file() else []
    for i, (record, line) in enumerate(zip(records, lines)):
        problem = head_of_record_problem(heads[i], record, line, genesis_hash, keys[AGGREGATOR]) if i < len(heads) \
            else "no signed head"
        if problem:
            raise DgptError(f"{run.ledger_heads}: round {record['round']}: {problem}")
    hashes = {r["round"]: record_sha256(line) for r, line in zip(records, lines)}
    confirmed, replayed = {}, {}
    for file in receipts:
        label = _receipts_label(Path(file))
        if not Path(file).is_file():
            raise DgptError(f"{file}: no receipts file")
        confirmed[label], replayed[label], problem = receipts_problem(read_metrics(Path(file)), hashes, keys[AGGREGATOR], genesis_hash)
        if problem:
            raise DgptError(f"{file}: oracle '{label}': {problem}")
    sizes = genesis.get("sizes", {})
    previous = genesis.get("theta")
    for record in records[1:]:
        if record.get("theta_before") != previous:
            raise DgptError(f"{path}: round {record['round']}: theta_before is not the parameters the round before ended with")
        previous = record.get("theta_after")
        oracle, problem = record_problem(record, genesis_hash, keys, sizes)
        if problem:
            raise DgptError(f"{path}: round {record['round']}: " + (f"oracle '{oracle}': " if oracle else "") + problem)
    by_round = {r["round"]: (r, line) for r, line in zip(records, lines)}
    checked = sum(_check_checkpoint(checkpoint, by_round, path) for checkpoint in run.list_checkpoints())
    summary = _totals(records, record_sha256(lines[-1]), checked)
    summary.keys_checked, summary.confirmed, summary.replayed = checked_keys, confirmed, replayed
    return summary


def _check_keys(keys: dict[str, str], keys_dir: Path, path: Path) -> list[str]:
    """The parties whose `PARTY.pub` in `keys_dir` is the key the genesis names (a different one is an error)."""
    found = sorted(p for p in Path(keys_dir).glob("*.pub") if p.stem in keys)
    if not found:
        raise DgptError(f"{keys_dir}: no PARTY.pub file of this run's parties ({', '.join(keys)})")
    for pub in found:
        if read_public(pub, pub.stem) != keys[pub.stem]:
            raise DgptError(f"{path}: the genesis names another key for {pub.stem} than {pub}: the ledger was rewritten, "
                            "or the key is not this run's")
    return [p.stem for p in found]


def _receipts_label(file: Path) -> str:
    """The oracle a receipts file belongs to: its state directory's name (RUN/oracles/NAME/receipts.jsonl)."""
    return file.parent.name if file.name == "receipts.jsonl" else file.stem


def _check_checkpoint(checkpoint: Path, by_round: dict, path: Path) -> int:
    """1 when a round checkpoint matches its round's record (0 for checkpoints of other kinds)."""
    if not checkpoint.name.startswith("round_"):
        return 0
    rnd = checkpoint_number(checkpoint)
    if rnd not in by_round:
        raise DgptError(f"{path}: round {rnd} has a checkpoint ({checkpoint}) but no record")
    record, line = by_round[rnd]
    try:
        weights = load_file(str(checkpoint / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise DgptError(f"{checkpoint / WEIGHTS}: unreadable ({e})") from None
    if weights_sha256(weights) != record.get("theta_after"):
        raise DgptError(f"{path}: round {rnd}: the checkpoint's weights ({checkpoint / WEIGHTS}) do not hash to the "
                        "record's theta_after (the checkpoint or the record was changed)")
    head = load_state(checkpoint).get("ledger_head")
    if head is not None and head != record_sha256(line):
        raise DgptError(f"{path}: round {rnd}: the record is not the one the checkpoint anchors (ledger_head in "
                        f"{checkpoint}): the record was changed")
    return 1


def _totals(records: list[dict], head: str, checked: int) -> LedgerSummary:
    names = records[0].get("oracles", [])
    totals = {n: OracleTotal() for n in names}
    curve: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in records[1:]:
        for name, row in record.get("oracles", {}).items():
            total = totals.setdefault(name, OracleTotal())
            total.rounds += row.get("status") in ("accepted", "rejected")
            total.accepted += row.get("status") == "accepted"
            total.tokens += int(row.get("tokens", 0))
            total.bytes += int(row.get("bytes", 0))
            total.value += float(row.get("value", 0.0))
            curve[name].append((record["round"], total.value))
    whole = sum(t.value for t in totals.values())
    for total in totals.values():
        total.share = total.value / whole if whole else 0.0
    return LedgerSummary(len(records) - 1, head, checked, totals, dict(curve))
