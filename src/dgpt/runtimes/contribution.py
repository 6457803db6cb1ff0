"""The contribution ledger of a federated run: what each oracle gave in each round, valued, in `ledger.jsonl`.

Every process builds the same records from what the aggregator received (so each host's round checkpoint can
anchor the chain's head); the leader appends them. An oracle's value in a round is its Shapley value for the
round's gain in global validation loss: for each coalition S of the round's accepted oracles, Theta is moved as
if only S's updates had arrived (same rule, same outer state, nothing committed) and every oracle evaluates it
on its own validation windows, reporting only a loss. Nothing about an oracle's data leaves it.
`ledger.method = "first_order"` replaces the evaluations by a linear estimate: each oracle computes the gradient of
its validation loss at Theta once per round and reports, for each coalition's move, only the inner product.

Every claim is signed by the party that makes it (`dgpt.federation.signing`): an oracle's statement of what it
trained and sent is checked here before its payload counts (`admit`), its signed reports of every loss or inner
product it gave are stored verbatim with the coalitions they value, and the aggregator's signature of each record's
head goes to `ledger_heads.jsonl` and to every oracle, which keeps it as a receipt.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dgpt.config import AGGREGATOR, Config, dump_config
from dgpt.errors import DgptError
from dgpt.fileio import write_text
from dgpt.federation.codec import Payload
from dgpt.federation.ledger import LedgerChain, check_chain, line_of, payload_sha256, record_sha256, weights_sha256
from dgpt.federation.shapley import CachedValue, exact_shapley, sampled_shapley
from dgpt.federation.signing import opened, sign_head, train_problem, vector_sha256
from dgpt.federation.strategy import RoundResult
from dgpt.rundir import RunDir
from dgpt.runtimes.identity import append_line
from dgpt.train.checkpoint import weights_of
from dgpt.train.evaluate import weighted_loss


@dataclass
class Valuation:
    """Each accepted oracle's value in one round (the loss reduction it is credited with) and what it cost."""

    values: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)  # sampled Shapley only
    full: float | None = None  # v(all accepted): the round's whole gain, the values' sum (exact Shapley)
    evaluations: int = 0  # validation passes over every oracle
    seconds: float = 0.0
    # what anyone recomputes the values from: the oracles valued (in order), each coalition with the hash of what
    # its signed losses (Theta_S) or inner products (the move Theta_S - Theta) were computed at, sampled orders' seed
    evidence: dict = field(default_factory=dict)


@dataclass
class Coalitions:
    """The coalitions a round's values need (the empty one first) and the Theta each is validated at, with its hash;
    `seconds`: what previewing them cost."""

    names: list[str]
    members: list[frozenset]
    thetas: list[torch.Tensor]
    subjects: list[str]
    seconds: float


class ContributionLedger:
    def __init__(self, config: Config, driver, start: int, head: str | None, keys: dict[str, str],
                 signer: Ed25519PrivateKey | None):
        """`driver`: the RoundDriver (its work, transport and strategy); `head`: the chain head the resumed
        round checkpoint recorded (None: a new run, or a checkpoint written before the ledger existed); `keys`: every
        party's public key; `signer`: the aggregator's private key (in the process that writes the ledger)."""
        self.config, self.driver, self.path = config, driver, RunDir(config.run_dir).ledger
        self.heads_path, self.keys, self.signer = RunDir(config.run_dir).ledger_heads, keys, signer
        self.method = config.ledger.method
        if self.method == "first_order" and driver.work.gradient is None:
            raise DgptError(f"ledger.method = 'first_order' needs the oracles' validation gradients, which the "
                            f"{config.federation.runtime} runtime does not carry; use 'shapley' or 'off'")
        self.seen = self._tokens()
        self.theta_hash = weights_sha256(weights_of(driver.work.model))
        self.baseline: tuple[str, float] = ("", float("nan"))  # (Theta's hash, global validation loss there)
        if head is None:
            self.chain = LedgerChain()
            genesis = {"round": start, "kind": "genesis", "config_sha256": record_sha256(dump_config(config)),
                       "oracles": config.oracle_names(), "theta": self.theta_hash, "method": self.method,
                       "keys": keys, "sizes": dict(driver.work.sizes)}
            lines = [self.chain.link(genesis)]
        else:
            self.chain = LedgerChain(head)
            lines = self._kept(start, head)
        self._rewrite(lines)
        heads = [self._head(line, lines[0]) for line in lines] if self.signer is not None else []
        if self.driver.transport.is_leader:
            write_text(self.heads_path, "".join(line_of(h) + "\n" for h in heads))
        self.signed_head = self._share(heads[-1] if heads else None)
        self.genesis = self.signed_head["genesis"]

    @property
    def head(self) -> str:
        return self.chain.prev

    def admit(self, rnd: int, theta: str, received: dict[str, Payload], statements: dict[str, dict]) -> tuple[dict, dict]:
        """The payloads whose oracle's signed statement holds and names this round, this Theta and these very bytes;
        and the others' oracles with why not (they are rejected like a bad payload)."""
        refused = self.statements_refused(rnd, theta, received, statements)
        return {n: p for n, p in received.items() if n not in refused}, refused

    def statements_refused(self, rnd: int, theta: str, received: dict[str, Payload | None],
                           statements: dict[str, dict]) -> dict[str, str]:
        """The oracles of `received` whose signed statement does not hold or name this round, this Theta and (unless the
        payload is None: secure aggregation, where the aggregator never sees it) these very bytes, with why."""
        refused = {}
        for name, payload in received.items():
            body, problem = opened(statements[name], self.keys[name]) if name in statements else (None, "it sent no statement")
            problem = problem or train_problem(body, self.genesis, rnd, name, theta, payload)
            if problem:
                refused[name] = f"statement refused: {problem}"
        return refused

    def report_problem(self, name: str, signed: dict | None, theta: str, loss: float | None) -> str:
        """What is wrong with an oracle's signed report of its validation loss at `theta` ("" when it holds)."""
        if loss is None or not math.isfinite(loss):
            return ""
        body, problem = opened(signed, self.keys[name]) if signed is not None else (None, "no signed report of it")
        if problem:
            return problem
        if body.get("oracle") != name or body.get("genesis") != self.genesis \
                or {"theta": theta, "loss": loss} not in body.get("entries", []):
            return "its signed report does not state this loss at this Theta"
        return ""

    def value(self, result: RoundResult) -> Valuation:
        """Shapley values of the round's accepted oracles (call before the Strategy applies the round)."""
        if self.method == "off" or result.update is None:
            return Valuation()
        t0, names, subjects = time.perf_counter(), result.accepted, {}
        v, passes = (self._first_order if self.method == "first_order" else self._evaluated)(result, subjects)
        if v is None:  # no oracle has validation data: nothing to value with
            self.driver.restore_theta()
            return Valuation(evaluations=passes, seconds=time.perf_counter() - t0)
        valuation = self._shapley(names, v, subjects)
        self.driver.restore_theta()
        coalitions = v.evaluations if self.method == "shapley" else 0  # first order: inner products, no passes
        valuation.evaluations, valuation.seconds = passes + coalitions, time.perf_counter() - t0
        return valuation

    def coalitions(self, result: RoundResult) -> Coalitions | None:
        """For a driver that has the oracles validate many Thetas in one message (flower): every coalition the round's
        Shapley values need, with the Theta it is validated at, the empty one (Theta itself) first; None when there is
        nothing to value. Call before the Strategy applies the round; `valued` then needs no Strategy."""
        if self.method != "shapley" or result.update is None:
            return None
        t0, visited = time.perf_counter(), CachedValue(lambda s: 0.0)
        self._shapley(result.accepted, visited, {})  # exact: every coalition; sampled: those its seeded orders visit
        members = list(visited.cache)  # the empty coalition first
        thetas = [self.driver.strategy.preview(_coalition(result, s)) for s in members]
        return Coalitions(result.accepted, members, thetas, [vector_sha256(t) for t in thetas], time.perf_counter() - t0)

    def valued(self, coalitions: Coalitions, losses: list[dict[str, float]]) -> Valuation:
        """The values from every oracle's validation loss at each coalition's Theta (`losses`, in `coalitions`' order)."""
        t0, sizes = time.perf_counter(), self.driver.work.sizes
        loss = {s: weighted_loss(found, sizes) for s, found in zip(coalitions.members, losses, strict=True)}
        baseline, cost = loss[frozenset()], len(coalitions.members)
        if baseline != baseline:  # no oracle validated Theta: nothing to value with
            return Valuation(evaluations=cost, seconds=coalitions.seconds + time.perf_counter() - t0)
        subjects = dict(zip(coalitions.members, coalitions.subjects))
        valuation = self._shapley(coalitions.names, CachedValue(lambda s: baseline - loss[s]), subjects)
        valuation.evaluations, valuation.seconds = cost, coalitions.seconds + time.perf_counter() - t0
        return valuation

    def _shapley(self, names: list[str], v: CachedValue, subjects: dict) -> Valuation:
        """Exact or sampled Shapley values from v, with the evidence (`subjects`: each coalition's hash)."""
        valuation = Valuation(evidence={"oracles": names})
        if len(names) <= self.config.ledger.exact_max:
            valuation.values = exact_shapley(names, v)
        else:
            seed, permutations = self.config.seed * 31 + len(self.seen), self.config.ledger.permutations
            orders = torch.Generator().manual_seed(seed)
            valuation.values, valuation.stderr = sampled_shapley(names, v, permutations, orders)
            valuation.evidence["sampled"] = {"seed": seed, "permutations": permutations}
        valuation.full = v(frozenset(names))
        valuation.evidence["coalitions"] = [[[n for n in names if n in s], subjects[s]] for s in v.cache if s and s in subjects]
        return valuation

    def validated(self, losses: dict[str, float]) -> None:
        """The driver's validation at the current Theta: the next round's baseline needs no pass of its own (unless
        the oracles' private heads train in between)."""
        if losses and not self.driver.work.private_heads:  # the parameters are the Theta whose hash `record` (or the start) just took
            self.baseline = (self.theta_hash, weighted_loss(losses, self.driver.work.sizes))

    def _evaluated(self, result: RoundResult, subjects: dict) -> tuple[CachedValue | None, int]:
        """v(S) = the global validation loss at Theta minus the loss at Theta moved by S's updates alone; and the
        validation passes spent outside the coalitions (the baseline at Theta, unless the driver just validated it)."""
        strategy, (cached_hash, baseline), passes = self.driver.strategy, self.baseline, 0
        if cached_hash != self.theta_hash:
            baseline, passes = self._loss(strategy.theta), 1
        if baseline != baseline:
            return None, passes

        def drop(s: frozenset) -> float:
            theta = strategy.preview(_coalition(result, s))
            subjects[s] = vector_sha256(theta)
            return baseline - self._loss(theta)

        return CachedValue(drop), passes

    def _first_order(self, result: RoundResult, subjects: dict) -> tuple[CachedValue | None, int]:
        """v(S) ~ -<g, Theta_S - Theta>, g the token-weighted gradient of the validation loss at Theta: each oracle
        computes its own gradient once and reports only inner products with the candidate moves."""
        strategy = self.driver.strategy
        self.driver.restore_theta()
        grads = self.driver.work.gradient()
        if not self.driver.gather({n: 1.0 for n in grads}):
            return None, 1

        def gain(s: frozenset) -> float:
            move = strategy.preview(_coalition(result, s)) - strategy.theta
            subjects[s] = vector_sha256(move)
            products = {n: float(g @ move) for n, g in grads.items()}
            self.driver.witness({"move": subjects[s]}, "product", products)
            return -weighted_loss(self.driver.gather(products), self.driver.work.sizes)

        return CachedValue(gain), 1

    def record(self, rnd: int, result: RoundResult, received: dict[str, Payload], valuation: Valuation,
               statements: dict[str, dict], theta_sent: str) -> None:
        """Append the round's record, with the oracles' signed statements and reports verbatim, and sign its head
        (call after the Strategy applied the round)."""
        seen, before, reports = self._tokens(), self.theta_hash, self.driver.reports(rnd)
        self.theta_hash = weights_sha256(weights_of(self.driver.work.model))
        oracles = {}
        for name in self.config.oracle_names():
            row = {"tokens": int(seen.get(name, 0) - self.seen.get(name, 0)), "bytes": result.bytes_received.get(name, 0),
                   "status": "carried" if name in result.carried else "accepted" if name in result.accepted
                   else "rejected" if name in result.rejected else "absent"}
            if name in received:
                row["payload_sha256"] = payload_sha256(received[name])
            if name in result.rejected:
                row["reason"] = result.rejected[name]
            if name in result.norms:
                row["norm"] = result.norms[name]
            if name in valuation.values:
                row["value"] = valuation.values[name]
            if name in valuation.stderr:
                row["stderr"] = valuation.stderr[name]
            if name in statements:
                row["statement"] = statements[name]
            if reports.get(name):
                row["reports"] = reports[name]
            oracles[name] = row
        self.seen = seen
        record = {"round": rnd, "kind": "round", "theta_before": before, "theta_after": self.theta_hash,
                  "theta_sent": theta_sent, "oracles": oracles,
                  "cost": {"evaluations": valuation.evaluations, "seconds": round(valuation.seconds, 6)}}
        if self.config.federation.secure_aggregation:  # no payload reached the aggregator: its hash is the oracle's word
            record["secure_aggregation"] = True
        if result.skipped:
            record["skipped"] = result.skipped
        if valuation.full is not None:
            record["value"] = {"method": self.method, "full": valuation.full, **valuation.evidence}
        line = self.chain.link(record)
        self._append(self.path, line)
        head = self._head(line, "") if self.signer is not None else None
        if head is not None:
            self._append(self.heads_path, line_of(head))
        self.signed_head = self._share(head)

    def _head(self, line: str, genesis_line: str) -> dict:
        """The aggregator's signature of a record's head (the genesis: `line` itself when `genesis_line` is it)."""
        record = json.loads(line)
        genesis = record_sha256(genesis_line) if genesis_line else self.genesis
        return sign_head(self.signer, record["round"], record_sha256(line), record["prev"], genesis)

    def _share(self, head: dict | None) -> dict:
        """The signed head, from the process that holds the aggregator's key to every process."""
        return json.loads(self.driver.transport.gather_texts({AGGREGATOR: line_of(head)} if head else {})[AGGREGATOR])

    def _loss(self, theta: torch.Tensor) -> float:
        """The token-weighted global validation loss at `theta` (every oracle evaluates it on its own windows)."""
        self.driver.load_theta(theta)
        return weighted_loss(self.driver.validate()[0], self.driver.work.sizes)

    def _tokens(self) -> dict[str, float]:
        return self.driver.gather({n: float(loop.tokens) for n, loop in self.driver.work.loops.items()})

    def _append(self, path, line: str) -> None:
        """A crash leaves at most a partial last line, dropped on resume."""
        if self.driver.transport.is_leader:
            append_line(path, line)

    def _rewrite(self, lines: list[str]) -> None:
        if self.driver.transport.is_leader:
            write_text(self.path, "".join(line + "\n" for line in lines))

    def _kept(self, start: int, head: str) -> list[str]:
        """The leader's records up to round `start`, which must end where the round checkpoint says the chain did."""
        if not self.driver.transport.is_leader:
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        records, problem = check_chain(lines)
        kept = [line for line, r in zip(lines, records) if r["round"] <= start]
        if not kept or record_sha256(kept[-1]) != head:
            why = problem or "it does not hold the record the checkpoint anchors"
            raise DgptError(f"{self.path}: cannot resume the ledger at round {start}: {why}")
        if "keys" not in records[0]:
            raise DgptError(f"{self.path}: cannot resume: this run began before dgpt signed its ledger; start a new run")
        changed = [p for p, k in self.keys.items() if records[0]["keys"].get(p) != k]
        if changed:
            raise DgptError(f"{self.path}: cannot resume: the run began with other keys for {', '.join(changed)} "
                            "(a party's key must stay the same for a whole run)")
        return kept


def _coalition(result: RoundResult, members: frozenset) -> dict[str, torch.Tensor]:
    """The coalition's updates in the round's order (a set's order differs between processes: the sums would too)."""
    return {n: result.deltas[n] for n in result.accepted if n in members}
