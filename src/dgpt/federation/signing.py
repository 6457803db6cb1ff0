"""Who said what in the contribution ledger: Ed25519 keys, signed statements, signed heads and receipts (pure).

A signed statement is {"body": canonical JSON text, "signature": hex}: the signature is over the body's UTF-8
bytes, so a statement is stored and checked verbatim. Oracles sign what they claim each round (a `train`
statement: the run's genesis hash, the round, the hash of the Theta they trained from, their payload's SHA-256
and size, tokens and train loss; `report` statements: every validation loss, or first-order inner product,
they reported, each tied to the hash of what it was computed at). The aggregator signs each record's head
(its round, its hash, the hash it chains to and the genesis hash); oracles keep those heads as receipts and refuse a head that
does not extend the last one they hold (Certificate Transparency's signed tree heads are the model).
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dgpt.federation.codec import Payload
from dgpt.federation.ledger import line_of, payload_sha256

HEAD_FIELDS = ("round", "hash", "prev", "genesis", "signature")


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PKCS8 PEM bytes (ValueError when they are not one)."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def check_public_hex(text: str) -> str:
    """The 64-hex-digit public key a .pub file holds (ValueError otherwise)."""
    text = text.strip()
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    return text


def sign(key: Ed25519PrivateKey, body: dict) -> dict:
    text = line_of(body)
    return {"body": text, "signature": key.sign(text.encode()).hex()}


def signature_holds(public: str, text: str, signature: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(bytes.fromhex(signature), text.encode())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def opened(signed, public: str) -> tuple[dict | None, str]:
    """The body of a signed statement and "" when its signature holds under `public`; else None and what is wrong."""
    if not isinstance(signed, dict) or set(signed) != {"body", "signature"} or not all(isinstance(v, str) for v in signed.values()):
        return None, "not a signed statement ({body, signature})"
    if not signature_holds(public, signed["body"], signed["signature"]):
        return None, "its signature does not verify under its public key"
    try:
        body = json.loads(signed["body"])
    except ValueError:
        return None, "its body is not JSON"
    return (body, "") if isinstance(body, dict) else (None, "its body is not a JSON object")


def vector_sha256(vector: torch.Tensor) -> str:
    """The hash of a flat float32 parameter vector (what a Flower message carries as Theta) or of a move."""
    return hashlib.sha256(vector.detach().float().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# --- statements --------------------------------------------------------------------------------------------------

def train_body(genesis: str, rnd: int, oracle: str, theta: str, payload: Payload, tokens: int, train_loss: float,
               epsilon: float | None = None) -> dict:
    """`epsilon`: with DP-SGD, what the oracle's own accountant says it has spent."""
    body = {"kind": "train", "genesis": genesis, "round": rnd, "oracle": oracle, "theta": theta,
            "payload_sha256": payload_sha256(payload), "bytes": payload.nbytes, "tokens": tokens,
            "train_loss": train_loss if math.isfinite(train_loss) else None}  # JSON has no NaN
    return body if epsilon is None else {**body, "privacy_epsilon": epsilon}


def report_body(genesis: str, rnd: int, oracle: str, entries: list[dict]) -> dict:
    """`entries`: {"theta": hash, "loss": x} (a validation loss) or {"move": hash, "product": x} (first order)."""
    return {"kind": "report", "genesis": genesis, "round": rnd, "oracle": oracle, "entries": entries}


def train_problem(body: dict, genesis: str, rnd: int, oracle: str, theta: str, payload: Payload | None) -> str:
    """What is wrong with an oracle's train statement for the payload that arrived ("" when nothing). `payload` None:
    the aggregator never saw it (secure aggregation), and the payload's hash stays the oracle's word."""
    expected = {"kind": "train", "genesis": genesis, "oracle": oracle}
    for key, value in expected.items():
        if body.get(key) != value:
            return f"its statement is for another {'run' if key == 'genesis' else key} ({key} {body.get(key)!r})"
    if body.get("round") != rnd:
        return f"its statement is for round {body.get('round')!r}, not {rnd}"
    if body.get("theta") != theta:
        return "its statement is for another Theta than the one this round sent"
    if payload is not None and (body.get("payload_sha256") != payload_sha256(payload) or body.get("bytes") != payload.nbytes):
        return "its statement names another payload than the one that arrived"
    if not isinstance(body.get("tokens"), int) or "train_loss" not in body:
        return "its statement lacks its tokens or train loss"
    return ""


# --- heads and receipts ------------------------------------------------------------------------------------------

def head_text(head: dict) -> str:
    return line_of({"kind": "head", **{k: head[k] for k in HEAD_FIELDS[:-1]}})


def sign_head(key: Ed25519PrivateKey, rnd: int, hash_: str, prev: str, genesis: str) -> dict:
    head = {"round": rnd, "hash": hash_, "prev": prev, "genesis": genesis}
    return {**head, "signature": key.sign(head_text(head).encode()).hex()}


def head_problem(head, public: str) -> str:
    """What is wrong with a signed head's form or signature ("" when nothing)."""
    if not isinstance(head, dict) or set(head) != set(HEAD_FIELDS) or not isinstance(head["round"], int) \
            or not all(isinstance(head[k], str) for k in HEAD_FIELDS[1:]):
        return f"not a signed head ({', '.join(HEAD_FIELDS)})"
    if not signature_holds(public, head_text(head), head["signature"]):
        return f"the head of round {head['round']} is not signed by the aggregator's key"
    return ""


def receipt_action(receipts: list[dict], head: dict) -> str:
    """What an oracle holding `receipts` (oldest first) does with a new, well-signed head: "keep" (append it),
    "same" (it holds it already) or a problem (the head forks its history). A head at a round it already holds
    is kept again only when it equals its receipt of that round (a resume from an older checkpoint replays the
    rounds after it; `replayed_rounds` tells them apart). A gap (an oracle that missed rounds) cannot be checked
    here; its receipts still pin the head, which `dgpt ledger --receipts` checks."""
    if not receipts:
        return "keep"
    last = receipts[-1]
    if head["genesis"] != last["genesis"]:
        return f"the head of round {head['round']} belongs to another run (genesis {head['genesis'][:12]}...)"
    if head == last:
        return "same"
    if head["round"] == last["round"] + 1:
        return "keep" if head["prev"] == last["hash"] else (
            f"the head of round {head['round']} does not extend this oracle's receipt of round {last['round']}: "
            "the ledger's history was rewritten")
    if head["round"] > last["round"]:
        return "keep"
    held = [r for r in receipts if r["round"] == head["round"]]
    if held and held[-1] == head:
        return "keep"
    return (f"the head of round {head['round']} is not the one this oracle holds for that round: the ledger's history "
            "was rewritten")


def current_receipts(receipts: list[dict]) -> tuple[dict[int, dict], list[int]]:
    """round -> the receipt that stands for it, and the rounds replayed after a resume (a receipt at a round at or
    before the one before it supersedes the receipts of the later rounds)."""
    standing: dict[int, dict] = {}
    replayed: list[int] = []
    for receipt in receipts:
        later = [r for r in standing if r > receipt["round"]]
        replayed += later
        for r in later:
            del standing[r]
        standing[receipt["round"]] = receipt
    return standing, sorted(set(replayed))
