"""The contribution ledger's records: hash-chained, canonical JSON, one per round (pure: the runtime writes them).

Every record holds `prev`, the SHA-256 of the previous record's line (the genesis record's is 64 zeros), so an
edit of any record breaks the chain at the next one. A record's line is its canonical JSON: keys sorted, no
spaces, floats as Python's repr. Parameters are hashed over a canonical byte encoding (`weights_sha256`): for
each tensor, in sorted name order, the UTF-8 name, its dtype and shape as text, and its raw little-endian bytes,
which are the bytes model.safetensors stores, so a checkpoint can be checked against the record of its round.
"""

from __future__ import annotations

import hashlib
import json

import torch

from dgpt.federation.codec import Payload

GENESIS_PREV = "0" * 64


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def payload_sha256(payload: Payload) -> str:
    """The hash of the bytes that arrived: values, then scales."""
    h = hashlib.sha256()
    for t in (payload.values, payload.scales):
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def line_of(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)


def record_sha256(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


class LedgerChain:
    """Makes each record's line, linked to the previous one."""

    def __init__(self, prev: str = GENESIS_PREV):
        self.prev = prev

    def link(self, record: dict) -> str:
        line = line_of({**record, "prev": self.prev})
        self.prev = record_sha256(line)
        return line


def check_chain(lines: list[str]) -> tuple[list[dict], str]:
    """The records of a ledger's lines and "" when the chain holds; else the records before the first broken
    one and what is wrong with it (naming its round)."""
    records, prev = [], GENESIS_PREV
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
            return records, f"line {number}: not a JSON record"
        where = f"round {record.get('round')} (line {number})" if isinstance(record, dict) else f"line {number}"
        if not isinstance(record, dict) or record.get("prev") != prev:
            before = f"round {records[-1].get('round')} (line {number - 1})" if records else "the genesis"
            return records[:-1], (f"{where} does not chain to the record before it: {before} was changed, or a record "
                                  "was removed or reordered")
        if line_of(record) != line:
            return records, f"{where}: not in canonical form (edited)"
        records.append(record)
        prev = record_sha256(line)
    return records, ""
