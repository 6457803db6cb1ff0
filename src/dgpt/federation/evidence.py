"""What a ledger's signatures prove, checked record by record (pure: `dgpt ledger` reads the files).

Each check returns "" or what is wrong; record checks also name the oracle. A record must carry the signed
statement of every oracle it accepted, agreeing with what the record says it received (payload hash, size,
tokens) and with the round and Theta; every report must be that oracle's; and every value must be what the
signed losses (or first-order inner products) give when recomputed the way the ledger computes them.
"""

from __future__ import annotations

import math

import torch

from dgpt.federation.ledger import record_sha256
from dgpt.federation.shapley import CachedValue, exact_shapley, sampled_shapley
from dgpt.federation.signing import current_receipts, head_problem, opened
from dgpt.train.evaluate import weighted_loss

# the recomputation repeats the ledger's arithmetic; a tolerance keeps it independent of summation order
REL_TOL, ABS_TOL = 1e-9, 1e-12


def head_of_record_problem(head, record: dict, line: str, genesis: str, aggregator: str) -> str:
    problem = head_problem(head, aggregator)
    if problem:
        return problem
    expected = {"round": record.get("round"), "hash": record_sha256(line), "prev": record.get("prev"), "genesis": genesis}
    if any(head[k] != v for k, v in expected.items()):
        return "its signed head is not this record's"
    return ""


def record_problem(record: dict, genesis: str, keys: dict[str, str], sizes: dict[str, float]) -> tuple[str, str]:
    """(oracle, what is wrong) for the first statement, report or value of a round record that does not hold."""
    rnd, entries = record.get("round"), {}
    for name, row in record.get("oracles", {}).items():
        problem, entries[name] = _statements_problem(name, row, record, genesis, keys.get(name, ""))
        if problem:
            return name, problem
    if "value" in record:
        return _value_problem(record, entries, sizes)
    return "", "" if rnd is not None else ("", "a round record without a round")


def _statements_problem(name: str, row: dict, record: dict, genesis: str, key: str) -> tuple[str, list[dict]]:
    """What is wrong with an oracle's statement and reports in a record, and the entries its reports hold."""
    if row.get("status") == "accepted":  # a refused statement stays as it came, with the reason it was refused
        if "statement" not in row:
            return "accepted without a signed statement", []
        body, problem = opened(row["statement"], key)
        if problem:
            return f"its statement: {problem}", []
        expected = {"kind": "train", "genesis": genesis, "round": record["round"], "oracle": name,
                    "theta": record.get("theta_sent"), "payload_sha256": row.get("payload_sha256"),
                    "bytes": row.get("bytes"), "tokens": row.get("tokens")}
        if record.get("secure_aggregation"):  # the aggregator saw only the masked sum: nothing to match the hash with
            del expected["payload_sha256"], expected["bytes"]
        wrong = [k for k, v in expected.items() if body.get(k) != v]
        if wrong:
            return f"its signed statement does not match the record ({', '.join(wrong)})", []
    entries = []
    for signed in row.get("reports", []):
        body, problem = opened(signed, key)
        if problem:
            return f"its report: {problem}", []
        if body.get("kind") != "report" or body.get("oracle") != name or body.get("genesis") != genesis \
                or not isinstance(body.get("entries"), list):
            return "a report that is not this oracle's for this run", []
        entries += [e for e in body["entries"] if isinstance(e, dict)]
    return "", entries


def _value_problem(record: dict, entries: dict[str, list[dict]], sizes: dict[str, float]) -> tuple[str, str]:
    """Recompute the round's values from the signed losses (or inner products) and compare them with the record's."""
    value = record["value"]
    names = value.get("oracles", [])
    coalitions = {frozenset(members): subject for members, subject in value.get("coalitions", [])}
    first_order = value.get("method") == "first_order"
    key, number, plural = ("move", "product", "inner products") if first_order else ("theta", "loss", "losses")
    said = {n: {} for n in sizes}  # oracle -> subject -> the last number it signed for it
    for name, found in entries.items():
        for entry in found:
            if isinstance(entry.get(key), str) and isinstance(entry.get(number), (int, float)):
                said.setdefault(name, {})[entry[key]] = float(entry[number])

    def measured(subject: str) -> float:
        return weighted_loss({n: said[n][subject] for n in sizes if subject in said.get(n, {})}, sizes)

    def v(s: frozenset) -> float:
        if s not in coalitions:
            raise KeyError(s)
        if first_order:
            return -measured(coalitions[s])
        return measured(record.get("theta_sent", "")) - measured(coalitions[s])

    cached = CachedValue(v)
    try:
        if "sampled" in value:
            orders = torch.Generator().manual_seed(int(value["sampled"]["seed"]))
            phi, _ = sampled_shapley(names, cached, int(value["sampled"]["permutations"]), orders)
        else:
            phi = exact_shapley(names, cached)
        full = cached(frozenset(names))
    except KeyError as e:
        return "", f"coalition {sorted(e.args[0])} is valued but not in the record"
    for name in names:
        recorded = record["oracles"].get(name, {}).get("value")
        if not _same(recorded, phi[name]):
            return name, f"its value {recorded} does not follow from the signed {plural} (they give {phi[name]})"
    if not _same(value.get("full"), full):
        return "", f"the round's gain {value.get('full')} does not follow from the signed {plural} (they give {full})"
    return "", ""


def _same(recorded, computed: float) -> bool:
    return isinstance(recorded, (int, float)) and math.isclose(recorded, computed, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def receipts_problem(receipts: list[dict], hashes: dict[int, str], aggregator: str, genesis: str) -> tuple[list[int], list[int], str]:
    """The rounds an oracle's receipts confirm, the rounds replayed after a resume (receipts superseded), and the first
    receipt that the ledger (`hashes`: round -> record hash) does not hold."""
    for receipt in receipts:
        problem = head_problem(receipt, aggregator)
        if problem:
            return [], [], f"round {receipt.get('round') if isinstance(receipt, dict) else '?'}: {problem}"
        if receipt["genesis"] != genesis:
            return [], [], f"round {receipt['round']}: a receipt of another run (or of a rewritten genesis)"
    standing, replayed = current_receipts(receipts)
    for rnd in sorted(standing):
        if rnd not in hashes:
            return [], [], f"round {rnd}: the ledger has no record of this round, whose signed head this oracle holds (removed)"
        if hashes[rnd] != standing[rnd]["hash"]:
            return [], [], f"round {rnd}: the ledger's record is not the one whose signed head this oracle holds (rewritten)"
    return sorted(standing), replayed, ""
