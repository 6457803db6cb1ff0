"""The Flower ServerApp: the aggregator of a federation whose oracles are SuperNodes of other organisations.

Launched by `flwr run APP SUPERLINK --run-config 'config="/path/to/server.toml"'` (`dgpt flower-app` writes
APP). The server holds the tokenizer and the model, never any text. Each round it sends Theta and the round id
to the SuperNode of every oracle the Strategy picked (and to SuperNodes it has not met yet), and closes the
round when all of them replied, or once `federation.round_timeout_s` passed and at least
`federation.min_oracles` did: late and absent oracles sit the round out. What came back is read from the
message's arrays, checked (a reply from another round, an unknown or duplicate oracle, arrays of the wrong
kind are refused with a logged reason) and handed to the same Strategy as sim and torchrun. Round
checkpoints, `metrics.jsonl` and resuming after a restart work as in `RoundDriver`. The app's `work` says what
is trained: "pretrain" (DUPT, the whole GPT) or "finetune" (DSFT: the shared body; each oracle's head stays on
its SuperNode, which the server never sees).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch.nn.utils import parameters_to_vector

from dgpt.config import AGGREGATOR, Config, dump_config, load_config
from dgpt.config_shared import shared_toml
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError
from dgpt.fileio import write_text
from dgpt.federation.aggregate import mean_weights
from dgpt.federation.codec import Codec, Payload
from dgpt.federation.signing import public_hex, vector_sha256
from dgpt.federation.strategy import RoundResult, Strategy
from dgpt.logs import messages_to
from dgpt.runtimes.flower import secure, wire
from dgpt.runtimes.flower.exchange import Exchange, Replies, finite, signed_report
from dgpt.runtimes.contribution import Coalitions, ContributionLedger, Valuation
from dgpt.runtimes.federated import Work, copy_into
from dgpt.runtimes.identity import own_key, public_key
from dgpt.runtimes.finetune import schedule, shared_body, starting_point
from dgpt.runtimes.report import RoundRecord, RoundReport
from dgpt.runtimes.summary import score_lines, with_perplexity
from dgpt.train.evaluate import weighted_loss
from dgpt.runtimes.setup import build_model, read_run
from dgpt.rundir import WEIGHTS, RunDir
from dgpt.train.checkpoint import load_state, load_weights_into, save_checkpoint, weights_of
from dgpt.train.task_eval import METRICS

logger = logging.getLogger(__name__)
app = ServerApp()


class Aggregator:
    """The server's place among a run's processes, as the contribution ledger asks: it writes the run's files and
    holds the aggregator's key."""

    is_leader, prepares_data = True, False

    def gather_texts(self, local: dict[str, str]) -> dict[str, str]:
        return dict(local)


@dataclass
class Unrecorded:
    """A round the Strategy applied whose ledger record (and round checkpoint) waits for the validation of its
    coalitions' Thetas: they ride on the next messages to the oracles (the next round's train message, or this
    round's validation), so valuing a round costs no message of its own."""

    rnd: int
    result: RoundResult
    received: dict[str, Payload]
    statements: dict[str, dict]
    theta: str  # the hash of the Theta the round was sent
    coalitions: Coalitions | None  # None: nothing to validate (`valuation` is the round's)
    valuation: Valuation | None = None
    losses: list[dict[str, float]] = field(default_factory=list)  # each coalition's, as validated so far

    def waiting(self) -> bool:
        return self.coalitions is not None and len(self.losses) < len(self.coalitions.thetas)


def server_work(config: Config, kind: str) -> Work:
    """What the server holds of the `kind` of work: the shared model only (it trains nothing itself and validates
    through its SuperNodes). Fine-tuning's number of rounds waits for the oracles' sizes (see `finetune.schedule`)."""
    if kind == "finetune":
        tokenizer, model_config, init = starting_point(config)
        model = shared_body(config, tokenizer, model_config, init)
        run_dir = RunDir(config.run_dir)
        tokenizer.save(run_dir.tokenizer)
        write_text(run_dir.config, dump_config(config))
        return Work(model, list(model.parameters()), {}, {}, dict, 0, config.finetune.inner_steps, METRICS, "examples")
    model, _ = build_model(read_run(config, oracles=[]))  # the tokenizer and model config; no shards
    return Work(model, list(model.parameters()), {}, {}, dict, config.federation.rounds, config.federation.inner_steps)


class FlowerServer:
    ledger: ContributionLedger | None = None  # from round 1 (the oracles' first replies tell their sizes)
    unrecorded: Unrecorded | None = None

    def __init__(self, config: Config, grid: Grid, kind: str = "pretrain"):
        self.config, self.grid, self.kind, fed = config, grid, kind, config.federation
        self.run_dir = RunDir(config.run_dir)
        self.work = server_work(config, kind)
        # what every SuperNode trains with: the shared settings and the tokenizer it must hold (checked there)
        self.settings = wire.settings_record(shared_toml(config), TextTokenizer.load(self.run_dir.tokenizer).sha256)
        logger.info(f"shared settings sha256 {self.settings['sha256']}")
        self.codec = Codec(fed.compression, [p.numel() for p in self.work.params], fed.int8_block)
        self.exchange = Exchange(config.federation, grid)
        self.tokens: dict[str, float] = {}  # each oracle's trained tokens, as it last reported them
        self.epsilon: dict[str, float] = {}  # DP-SGD: each oracle's epsilon spent, as its accountant last reported it
        self.transport, self.round = Aggregator(), 0
        self.skipped: list[int] = []  # this launch's rounds that did not move Theta
        self.kept: set[str] = set()  # the oracles that keep the final model in their run directory

    def run(self) -> None:
        fed, work = self.config.federation, self.work
        self.exchange.wait_for_nodes(len(self.config.oracles))
        start, state = self._resume()
        self.round = start
        if start == 0:
            replies = self._ask(wire.EVALUATE, 0, self.config.oracle_names())
            work.sizes.update(self._sizes(replies))
            hello = self._valid(replies)  # before the ledger: these losses value nothing
        else:
            work.sizes.update(state["sizes"])
            self.tokens.update(state.get("tokens", {}))
            self.epsilon.update(state.get("epsilon", {}))
        if self.kind == "finetune":
            work.rounds, work.total_steps, _ = schedule(self.config.finetune, int(max(work.sizes.values())))
        weights = mean_weights(fed.mean_weights, work.sizes, {o.name: o.weight for o in self.config.oracles})
        self.strategy = Strategy(fed, self.codec, weights, self._theta(), self.config.seed)
        if state:
            self.strategy.load_state_dict(state["strategy"], self._theta())
        report = RoundReport(self.config, self.run_dir, work, start)
        signer = own_key(self.config, AGGREGATOR)
        keys = {AGGREGATOR: public_hex(signer), **{n: public_key(self.config, n) for n in self.config.oracle_names()}}
        self.ledger = ContributionLedger(self.config, self, start, state.get("ledger_head"), keys, signer)
        if start == 0:
            report.started(0, *hello)
        for rnd in range(start + 1, work.rounds + 1):
            record = self._round(rnd)
            report.round(record, self.strategy)
        report.finished(self.strategy)
        if self.skipped:
            logger.warning(f"round(s) {', '.join(map(str, self.skipped))} of {work.rounds} did not move the model "
                           "(no usable update; the reasons are above)")
        if start < work.rounds and record.valid:
            self._table(work.rounds, record.valid, record.scores)
        self._deliver(work.rounds)

    def evaluate(self) -> None:
        """`dgpt flower-app --eval`: the newest round checkpoint validated by every SuperNode on its own data (the
        table in the log and on the ServerApp's output), then delivered into every SuperNode's run directory."""
        self.exchange.wait_for_nodes(len(self.config.oracles))
        start, state = self._resume()
        if start == 0:
            raise DgptError(f"{self.run_dir.root}: no round checkpoint to evaluate; train first (`flwr run` the app)")
        self.work.sizes.update(state["sizes"])
        self.round = start
        self._table(start, *self.validate(keep=True))
        self._deliver(start)

    def _table(self, rnd: int, losses: dict[str, float], scores: dict[str, dict[str, float]]) -> None:
        """Each oracle's validation of round `rnd`'s model on its own data, and the global loss (token-weighted)."""
        lm = self.kind == "pretrain"
        rows = {n: {**(with_perplexity({"loss": losses[n]}) if lm else {"loss": losses[n]}), **scores.get(n, {})}
                for n in self.config.oracle_names() if n in losses}
        missing = [n for n in self.config.oracle_names() if n not in losses]
        lines = [f"round {rnd}'s model validated by each oracle on its own data:", *score_lines(rows)]
        if losses:
            lines.append(f"  global loss {weighted_loss(losses, self.work.sizes):.4f} (oracles weighted by their training {self.work.unit})")
        if missing:
            lines.append(f"  no validation from: {', '.join(missing)}")
        for line in lines:
            logger.info(line)
            print(line, flush=True)  # `flwr run --stream` and `flwr log` show the ServerApp's output

    def _deliver(self, rnd: int) -> None:
        """Round `rnd`'s model into every SuperNode's run directory (its tokenizer and config are there), where `dgpt
        eval`, `generate` and `predict` run on the organisation's own data."""
        names, head = self.config.oracle_names(), self.ledger.signed_head["hash"] if self.ledger is not None else None
        # the last validation asked the others to keep it; an oracle that has not seen the ledger's last head gets it
        missing = [n for n in names if n not in self.kept or self.exchange.told.get(n, head) != head]
        replies = self._ask(wire.MODEL, rnd, missing) if missing else Replies()
        self.kept.update(replies.contents)
        for name in missing:
            if name not in replies.contents:
                logger.warning(f"oracle '{name}' did not receive round {rnd}'s model: "
                               f"{replies.refused.get(name, 'no reply in time')} (`dgpt flower-app CONFIG --eval` sends it again)")
        logger.info(f"round {rnd}'s model delivered to {len(self.kept)} of {len(names)} oracles' run directories")

    def _round(self, rnd: int) -> RoundRecord:
        t0, fed, self.round = time.perf_counter(), self.config.federation, rnd
        participants = self.strategy.sample()
        theta = vector_sha256(self._theta())
        received, train_loss, statements = {}, {}, {}
        if fed.secure_aggregation:  # the ledger values nothing then: no coalition waits on this round's messages
            result = self._masked(rnd, participants, theta, train_loss, statements)
        else:
            replies = self._ask(wire.TRAIN, rnd, participants)  # also brings the losses the last round's record waits for
            self._record()
            for name, content in replies.contents.items():
                if name not in participants:  # it validated the last round's coalitions only
                    continue
                payload, problem = wire.payload_from(content.array_records.get("delta"), self.codec)
                if problem:
                    replies.refused[name] = problem
                    continue
                received[name] = payload
                self._note(name, content, train_loss, statements)
                logger.info(f"round {rnd}: oracle '{name}' replied with {wire.payload_bytes(content['delta']):,} bytes of arrays")
            admitted, refused = self.ledger.admit(rnd, theta, received, statements)
            result = self.strategy.aggregate(admitted)
            result.rejected.update({**{n: r for n, r in replies.refused.items() if n in participants}, **refused})
        coalitions = self.ledger.coalitions(result)  # each coalition's Theta, validated with the next messages
        valuation = None if coalitions is not None else self.ledger.value(result)
        self.load_theta(self.strategy.apply(result, self.work.steps_in(rnd)))
        self.unrecorded = Unrecorded(rnd, result, received, statements, theta, coalitions, valuation)
        if coalitions is None:
            self._record()
        if result.skipped:
            logger.warning(f"round {rnd}: {result.skipped}")
        for name in participants:
            if name not in received and name not in result.participants:  # (secure aggregation: nothing is received)
                logger.warning(f"round {rnd}: oracle '{name}' sat this round out: {result.rejected.get(name) or self.exchange.silence(name)}")
        last = rnd == self.work.rounds
        evaluated = rnd % fed.eval_interval == 0 or last
        valid, scores = self.validate(keep=last) if evaluated else ({}, {})
        if evaluated:  # its coalitions rode on the validation: recorded now, not with the next round's replies
            self._record()
        record = RoundRecord(rnd, result, train_loss, valid, scores, int(sum(self.tokens.values())))
        record.seconds, record.epsilon = time.perf_counter() - t0, dict(self.epsilon)
        figures = ", ".join(f"{k} {v}" for k, v in record.postfix().items())
        logger.info(f"round {rnd} of {self.work.rounds}: {figures or 'no figures'} ({record.seconds:.1f} s)")
        if result.skipped:
            self.skipped.append(rnd)
        return record

    def _record(self) -> None:
        """The ledger record of the round waiting for it (its coalitions' Thetas that no message carried yet are
        validated now), then its round checkpoint, which anchors that record."""
        pending = self.unrecorded
        if pending is None:
            return
        while pending.waiting():  # what did not fit in the messages that carried the rest
            self._ask(wire.CANDIDATES, self.round, self.config.oracle_names())
        self.unrecorded = None
        valuation = pending.valuation or self.ledger.valued(pending.coalitions, pending.losses)
        self.ledger.record(pending.rnd, pending.result, pending.received, valuation, pending.statements, pending.theta)
        if pending.rnd % self.config.federation.checkpoint_interval == 0 or pending.rnd == self.work.rounds:
            self._save(pending.rnd)

    def _note(self, name: str, content: RecordDict, train_loss: dict[str, float], statements: dict[str, dict]) -> None:
        """What an oracle's train reply says besides its update: its statement, train loss, tokens and (DP) epsilon."""
        if "statement" in content.config_records:
            statements[name] = dict(content.config_records["statement"])
        metrics = content.metric_records["metrics"]
        train_loss[name], self.tokens[name] = float(metrics["train_loss"]), float(metrics["tokens"])
        if isinstance(metrics.get("privacy_epsilon"), (int, float)):  # as the oracle's accountant reports it
            self.epsilon[name] = float(metrics["privacy_epsilon"])

    def _masked(self, rnd: int, participants: list[str], theta: str, train_loss: dict[str, float],
                statements: dict[str, dict]) -> RoundResult:
        """A round under secure aggregation: the oracles' updates come back only as their weighted mean (SecAgg+). Each
        reply's statement is checked as far as the aggregator can (not its payload's hash: it never sees the payload); a
        reply or statement refused taints the mean it is part of, so the round then leaves Theta where it is."""
        live, node_of = self.exchange.live(), self.exchange.node_of
        nodes = {node_of[n]: n for n in participants if node_of.get(n) in live}
        head = self.ledger.signed_head
        request = wire.request(rnd, self.kind, self._theta(), self.work.sizes, self.settings, head)
        masked = secure.masked_mean(self.grid, rnd, request, self._theta(), nodes, self.strategy.shares(list(nodes.values())),
                                    self.config)
        for failure in masked.failures:
            logger.warning(f"round {rnd}: a SuperNode failed in secure aggregation: {failure}")
        replies = Replies()
        for node, content in masked.contents.items():
            self.exchange.keep(content, node, rnd, dict.fromkeys(participants, wire.TRAIN), replies)
        for name, content in replies.contents.items():
            self.exchange.told[name] = head["hash"]
            self._note(name, content, train_loss, statements)
            clipped = content.metric_records["metrics"].get("secagg_clipped")
            if clipped:
                logger.warning(f"round {rnd}: oracle '{name}' had {clipped:.0f} coordinates clipped to secagg.clipping_range")
        arrived = [nodes[node] for node in masked.contents]
        refused = self.ledger.statements_refused(rnd, theta, dict.fromkeys(arrived), statements)
        unusable = [f"oracle '{n}': {refused.get(n) or 'its reply was refused'}" for n in arrived if n in refused or n not in replies.contents]
        problem = masked.problem or (f"{'; '.join(unusable)}, and its update is inside the mean" if unusable else "")
        bytes_received = {nodes[node]: nbytes for node, nbytes in masked.nbytes.items() if node in masked.contents}
        return self.strategy.aggregate_sum(masked.mean, arrived, bytes_received, problem)

    # --- what the contribution ledger asks of the process that drives the rounds ---------------------------------

    def validate(self, keep: bool = False) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Every reachable oracle's validation loss at the current parameters, and its other metrics (fine-tuning);
        `keep`: each oracle also keeps them as the run's model."""
        replies = self._ask(wire.EVALUATE, self.round, self.config.oracle_names(), keep=keep)
        if keep:
            self.kept = {n for n, c in replies.contents.items() if c.metric_records["metrics"].get("kept") == 1.0}
        return self._valid(replies)

    def _candidate_losses(self, replies: Replies, start: int, count: int) -> list[dict[str, float]]:
        """Each oracle's validation loss at the coalition Thetas `start` to `start + count` the messages carried, where
        its signed report states it."""
        subjects, losses = self.unrecorded.coalitions.subjects, [{} for _ in range(count)]
        for name, content in replies.contents.items():
            metrics, signed = content.metric_records["metrics"], signed_report(content)
            for j in range(count):
                loss = metrics.get(f"loss_{j}")
                problem = self.ledger.report_problem(name, signed, subjects[start + j], loss)
                if problem:
                    logger.warning(f"round {self.round}: oracle '{name}''s validation loss is not used: {problem}")
                elif finite(loss):
                    losses[j][name] = float(loss)
        return losses

    def gather(self, local: dict[str, float]) -> dict[str, float]:
        return {**self.tokens, **local}

    def load_theta(self, theta: torch.Tensor) -> None:
        copy_into(self.work.params, theta)

    def restore_theta(self) -> None:
        self.load_theta(self.strategy.theta)

    def reports(self, rnd: int) -> dict[str, list[dict]]:
        """The oracles' signed loss reports since the last record (each evaluation's reply brought one)."""
        return self.exchange.take_reports()

    def _valid(self, replies: Replies) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """The validation loss and other metrics (of the work's kind) each oracle reported; once the ledger is kept,
        a loss counts only with the oracle's signed report of it at this Theta."""
        losses, scores, theta = {}, {}, vector_sha256(self._theta())
        for name, content in replies.contents.items():
            metrics = content.metric_records["metrics"]
            found = {k: metrics.get(f"valid_{k}") for k in self.work.metric_names}
            found = {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}
            problem = self.ledger.report_problem(name, signed_report(content), theta, found.get("loss")) if self.ledger else ""
            if problem:
                logger.warning(f"round {self.round}: oracle '{name}''s validation loss is not used: {problem}")
                found.pop("loss", None)
            if "loss" in found:
                losses[name] = found.pop("loss")
            if found:
                scores[name] = found
        return losses, scores

    def _sizes(self, replies: Replies) -> dict[str, float]:
        """Each oracle's training tokens, as it declared them (absent oracles: the mean of the others, logged)."""
        sizes = {n: float(c.metric_records["metrics"]["size"]) for n, c in replies.contents.items()}
        if not sizes:
            why = "; ".join(f"'{n}': {r}" for n, r in replies.refused.items())
            raise DgptError(f"no oracle answered the server's first message{' usably (' + why + ')' if why else ''}")
        missing = [n for n in self.config.oracle_names() if n not in sizes]
        if missing:
            logger.warning(f"oracle(s) {', '.join(missing)} did not answer before round 1: weighted by the mean size")
        mean = sum(sizes.values()) / len(sizes)
        return {n: sizes.get(n, mean) for n in self.config.oracle_names()}

    def _theta(self) -> torch.Tensor:
        return parameters_to_vector(self.work.params).detach()

    def _ask(self, kind: str, rnd: int, names: list[str], keep: bool = False) -> Replies:
        """Send Theta and the round id to the oracles `names` (and to SuperNodes not met yet) and collect their replies.
        The coalition Thetas an unrecorded round waits for go along (as many as MESSAGE_BYTES allows), and to a train
        message's non-participants in a message of their own: every oracle validates them."""
        asked = dict.fromkeys(names, kind)
        head = self.ledger.signed_head if self.ledger is not None else None  # each oracle keeps it as a receipt
        content = wire.request(rnd, self.kind, self._theta(), self.work.sizes, self.settings, head, keep)  # sizes: fine-tuning's rounds
        pending, start, count = self.unrecorded, 0, 0
        if pending is not None and pending.waiting():
            start, thetas = len(pending.losses), pending.coalitions.thetas
            count = max(1, MESSAGE_BYTES // (4 * self._theta().numel()))
            wire.add_candidates(content, thetas[start:start + count], pending.rnd)
            count = min(count, len(thetas) - start)
            asked = {**dict.fromkeys(self.config.oracle_names(), wire.CANDIDATES), **asked}
        replies = self.exchange.ask(content, asked, kind, rnd, head)
        if count:
            pending.losses += self._candidate_losses(replies, start, count)
        carried = f", with {count} of round {pending.rnd}'s coalition Thetas to validate" if count else ""
        logger.info(f"round {rnd}: {len(replies.contents)} of {len(asked)} oracle(s) answered the {kind} messages in "
                    f"{replies.seconds:.2f} s{carried}")
        return replies

    def _resume(self) -> tuple[int, dict]:
        checkpoint = self.run_dir.latest_checkpoint()
        if checkpoint is None:
            return 0, {}
        load_weights_into(self.work.model, checkpoint / WEIGHTS, self.work.model.config)
        state = load_state(checkpoint)
        if "sizes" not in state:
            raise DgptError(f"{checkpoint}: not a checkpoint of a flower run (no oracle sizes in it)")
        logger.info(f"resumed from {checkpoint} at round {state['round']}")
        return state["round"], state

    def _save(self, rnd: int) -> None:
        state = {"round": rnd, "strategy": self.strategy.state_dict(), "sizes": dict(self.work.sizes),
                 "tokens": dict(self.tokens), "epsilon": dict(self.epsilon), "ledger_head": self.ledger.head}
        model = self.work.model
        save_checkpoint(self.run_dir.root, "round", rnd, weights_of(model), model.config, state,
                        self.config.pretrain.keep_checkpoints, final=rnd == self.work.rounds)


MESSAGE_BYTES = 1 << 30  # the most candidate Thetas one message carries, in bytes


@contextmanager
def _log_to(path):
    """dgpt's messages in the run directory while the ServerApp runs (Flower owns its process's output)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with messages_to(logging.FileHandler(path, encoding="utf-8"), fmt="%(asctime)s %(levelname)s %(message)s"):
        yield


@app.main()
def main(grid: Grid, context: Context) -> None:
    path, kind = context.run_config.get("config"), context.run_config.get("work", "pretrain")
    action = context.run_config.get("action", "train")
    if not isinstance(path, str) or not path:
        raise DgptError("flwr run needs --run-config 'config=\"/path/to/dgpt.toml\"' (the server's dgpt config)")
    if kind not in wire.WORKS or action not in ("train", "evaluate"):
        raise DgptError(f"the app's work is {kind!r} and action {action!r}; expected one of {', '.join(wire.WORKS)} "
                        "and train or evaluate")
    config = load_config(path)
    with _log_to(RunDir(config.run_dir).server_log):
        try:
            server = FlowerServer(config, grid, kind)
            server.run() if action == "train" else server.evaluate()
        except DgptError as e:
            logger.error(str(e))
            raise
