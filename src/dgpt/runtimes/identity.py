"""Each party's Ed25519 identity on disk, and an oracle's side of the ledger: what it signs, the receipts it keeps.

A party (an oracle, or the aggregator) keeps its private key in its own run directory, `RUN/keys/<party>.key`
(0600; a Flower SuperNode may name another file), and the config names every party's public key
(`oracles[].public_key`, `ledger.public_key`). A public key the config does not name is read from
`RUN/keys/<party>.pub`; a party that finds neither makes its pair there with `dgpt keygen`'s code. Keys made
inside one run directory only simulate separate parties (sim, tests): whoever holds the directory holds them all.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dgpt.config import AGGREGATOR, Config
from dgpt.errors import DgptError
from dgpt.federation.codec import Payload
from dgpt.federation.ledger import line_of
from dgpt.federation.signing import (check_public_hex, head_problem, key_from_pem, new_key, private_pem, public_hex,
                                     receipt_action, report_body, sign, train_body)
from dgpt.fileio import write_text
from dgpt.rundir import RunDir
from dgpt.train.metrics import read_metrics


def keygen(out: str | Path, name: str) -> tuple[Path, Path]:
    """A new key pair: OUT/NAME.key (PKCS8 PEM, 0600) and OUT/NAME.pub (the raw public key in hex)."""
    private, public = Path(out) / f"{name}.key", Path(out) / f"{name}.pub"
    if private.exists():
        raise DgptError(f"{private}: a private key is there already; it is not overwritten")
    key = new_key()
    write_text(private, private_pem(key).decode(), mode=0o600)
    write_text(public, public_hex(key) + "\n")
    return private, public


def read_public(path: str | Path, party: str) -> str:
    try:
        return check_public_hex(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DgptError(f"{path}: {party}'s public key not found (`dgpt keygen` makes a pair; name its .pub in the "
                        "config or copy it there)") from None
    except (OSError, ValueError, UnicodeError) as e:
        raise DgptError(f"{path}: not an Ed25519 public key of {party} ({type(e).__name__})") from None


def named_public(config: Config, party: str) -> str:
    """The public key file the config names for `party` ("" if none)."""
    if party == AGGREGATOR:
        return config.ledger.public_key
    return next((o.public_key for o in config.oracles if o.name == party), "")


def public_key(config: Config, party: str) -> str:
    """`party`'s public key: the file the config names, else the run directory's copy."""
    return read_public(named_public(config, party) or RunDir(config.run_dir).public_key(party), party)


def own_key(config: Config, party: str, path: str = "") -> Ed25519PrivateKey:
    """This process's private key as `party` (`path`: another file than RUN/keys/<party>.key); made when neither it
    nor a public key in the config exists (simulated parties), checked against the config's public key otherwise."""
    run, named = RunDir(config.run_dir), named_public(config, party)
    file = Path(path) if path else run.private_key(party)
    if not file.exists():
        if path or named:
            raise DgptError(f"{file}: {party}'s private key not found (the config names its public key {named!r})")
        keygen(run.keys, party)
    try:
        key = key_from_pem(file.read_bytes())
    except (OSError, ValueError) as e:
        raise DgptError(f"{file}: not an Ed25519 private key ({type(e).__name__})") from None
    if named and public_hex(key) != read_public(named, party):
        raise DgptError(f"{file}: {party}'s private key does not match the public key the config names ({named})")
    return key


def identities(config: Config, transport, local: list[str]) -> tuple[dict[str, str], dict[str, Ed25519PrivateKey]]:
    """Every party's public key (each process tells those of its own parties, checked against the config's) and this
    process's private keys: its oracles', and the aggregator's in the leader."""
    own = {p: own_key(config, p) for p in local + ([AGGREGATOR] if transport.is_leader else [])}
    keys = transport.gather_texts({p: public_hex(k) for p, k in own.items()})
    for party in [AGGREGATOR, *config.oracle_names()]:
        if party not in keys:
            raise DgptError(f"no process holds the key of {party}")
        named = named_public(config, party)
        if named and read_public(named, party) != keys[party]:
            raise DgptError(f"{named}: {party} signs with another key than this file holds")
    return {p: keys[p] for p in [AGGREGATOR, *config.oracle_names()]}, own


def append_line(path: Path, line: str) -> None:
    """One whole line per write, flushed to disk: a crash leaves at most a partial last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


class Witness:
    """One oracle's side of the ledger: it signs what it claims, and keeps the aggregator's signed heads as receipts
    in its own state directory, refusing a head that does not extend the last one it holds."""

    def __init__(self, name: str, key: Ed25519PrivateKey, receipts: Path, aggregator: str):
        self.name, self.key, self.path, self.aggregator = name, key, receipts, aggregator
        self.receipts = read_metrics(receipts) if receipts.is_file() else []
        if self.receipts and not receipts.read_text(encoding="utf-8").endswith("\n"):  # a crash cut the last line
            write_text(receipts, "".join(line_of(r) + "\n" for r in self.receipts))
        self.pending: list[dict] = []  # what it reported since its last report statement

    @property
    def genesis(self) -> str:
        return self.receipts[-1]["genesis"] if self.receipts else ""

    def receive(self, head: dict) -> None:
        """Check the aggregator's head and keep it; a forked history stops this oracle with one line."""
        problem = head_problem(head, self.aggregator)
        action = problem or receipt_action(self.receipts, head)
        if action == "same":
            return
        if action != "keep":
            raise DgptError(f"oracle '{self.name}': round {head.get('round') if isinstance(head, dict) else '?'}: "
                            f"{action} (receipts {self.path}); this oracle stops")
        append_line(self.path, line_of(head))
        self.receipts.append(head)

    def train_statement(self, rnd: int, theta: str, payload: Payload, tokens: int, train_loss: float,
                        epsilon: float | None = None) -> dict:
        return sign(self.key, train_body(self.genesis, rnd, self.name, theta, payload, tokens, train_loss, epsilon))

    def note(self, entry: dict) -> None:
        self.pending.append(entry)

    def report(self, rnd: int) -> dict | None:
        """Everything it reported since its last report, signed (None when nothing)."""
        if not self.pending:
            return None
        signed, self.pending = sign(self.key, report_body(self.genesis, rnd, self.name, self.pending)), []
        return signed
