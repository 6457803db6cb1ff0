"""The Flower ClientApp: one oracle, on its own organisation's SuperNode.

Its SuperNode names it: `flower-supernode --node-config 'config="dgpt.toml" oracle="alpha" run-dir="runs/org_a"'`
(run-dir optional: the config's run_dir otherwise; relative paths are the SuperNode's working directory's). Only
the local keys of that file are read (`dgpt.config_shared`: run directory, device, the oracle's data paths); every
setting the parties share comes from the server's message, and a tokenizer that is not the server's is refused.
A ClientApp that cannot take part replies with the reason, which the server logs. On
Flower's simulation engine, whose virtual SuperNodes carry only a `partition-id`, SuperNode i is the i-th
`[[oracles]]` entry of the app's config, in the app's run directory. The
run directory is the oracle's own: its prepared shards (`dgpt prepare --oracle`, with the federation's
tokenizer) and its private state (`oracles/<name>/round_N.pt`: inner AdamW, sampler position,
RNG), which never leaves the machine. Nothing here reads another oracle's data.

Flower starts the ClientApp afresh for each message, so everything an oracle carries from one round to the
next is on its disk. A train message brings Theta and the round id; the oracle resumes from its newest state
before that round (a server that restarted from an older checkpoint replays rounds exactly), trains H steps on
the round's schedule, saves its state and replies with its encoded pseudo-gradient, its token count and loss.

The oracle signs with its own key (`RUN/keys/<name>.key` in its run directory, or the file `--node-config
signing-key="..."` names): each train reply carries its `statement` (what it trained from, what it sends), each
evaluate reply a signed report of the loss it gives. Every message brings the aggregator's signed `head` of the
newest ledger record, which the oracle checks against the aggregator's public key and keeps in
`oracles/<name>/receipts.jsonl`; a head that does not extend its receipts stops it (its reply says why).

Fine-tuning (the message's work is "finetune") trains the same way, with the oracle's own task and head: the head
is part of its state file and never sent; only the shared body's pseudo-gradient is. The SuperNode needs the
config's `finetune.init_from` (the pre-trained run: tokenizer and model shape) and its task's files; the
number of rounds, hence its learning-rate schedule, comes from every oracle's size, which the server sends.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dgpt.config import AGGREGATOR, Config, dump_config, load_config
from dgpt.config_shared import with_local
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError
from dgpt.federation.codec import Codec
from dgpt.federation.signing import vector_sha256
from dgpt.fileio import atomic_path, torch_save, write_text
from dgpt.logs import messages_to
from dgpt.train.checkpoint import save_checkpoint, weights_of
from dgpt.runtimes.flower import secure, wire
from dgpt.runtimes.federated import Work, copy_into, load_oracle_state, pretraining_work, train_round
from dgpt.runtimes.finetune import finetune_work
from dgpt.runtimes.identity import Witness, own_key, public_key
from dgpt.rundir import RunDir, check_oracle_name

logger = logging.getLogger(__name__)
app = ClientApp(mods=[secure.secure_mod])  # Flower's SecAgg+ for the train messages of its workflow
KEEP_STATES = 3  # an oracle keeps its newest few states: enough for a server that resumes from an older checkpoint


class OwnData:
    """The `Transport` view of a SuperNode: it holds one oracle's data and sees no other's, only the sizes the
    server sent (none before round 1)."""

    is_leader, prepares_data = False, False

    def __init__(self, sizes: dict[str, float]):
        self.sizes = sizes

    def gather_scalars(self, local: dict[str, float]) -> dict[str, float]:
        return {**self.sizes, **local}


class Oracle:
    """This SuperNode's oracle: its config, its Work (model, inner loop, data) and its private state files."""

    def __init__(self, context: Context, message: Message):
        self.round, self.kind = _round_of(message)
        node_config = dict(context.node_config)
        path, name = _identity(node_config, dict(context.run_config))
        local = load_config(path)
        if isinstance(node_config.get("run-dir"), str):  # this organisation's copy of the run: shards and private state
            local = dataclasses.replace(local, run_dir=node_config["run-dir"])
        shared, tokenizer_sha256 = wire.settings_from(message.content.config_records.get("settings"))
        self.virtual = name is None  # a virtual SuperNode of the simulation engine: the app's run directory
        if name is None:
            name = _nth_oracle(local, node_config["partition-id"], path)
        self.name = check_oracle_name(name, "--node-config oracle")
        self.config: Config = with_local(shared, local, name)
        if name not in self.config.oracle_names():
            raise DgptError(f"the server's settings have no oracle '{name}' (declared: {', '.join(self.config.oracle_names())})")
        if self.kind not in wire.WORKS:
            raise DgptError(f"the server asked for {self.kind!r}; this SuperNode's dgpt knows {', '.join(wire.WORKS)}")
        _check_tokenizer(self.config, self.kind, tokenizer_sha256)
        sizes = message.content.metric_records.get("sizes")
        transport = OwnData({k: float(v) for k, v in sizes.items()} if sizes is not None else {})
        self.work: Work = (finetune_work if self.kind == "finetune" else pretraining_work)(self.config, transport, [name])
        fed = self.config.federation
        self.codec = Codec(fed.compression, [p.numel() for p in self.work.params], fed.int8_block)
        self.run_dir = RunDir(self.config.run_dir)
        signing = node_config.get("signing-key")  # this SuperNode's private key, if not RUN/keys/<name>.key
        key = own_key(self.config, name, signing if isinstance(signing, str) else "")
        head = message.content.config_records.get("head")  # none before the ledger's genesis
        self.witness = None
        if head is not None:
            self.witness = Witness(name, key, self.run_dir.receipts(name), public_key(self.config, AGGREGATOR))
            self.witness.receive(dict(head))

    def forget(self, rnd: int) -> None:
        """Delete the states of round `rnd` and later: rounds a server restarted from an older checkpoint redoes."""
        for later, path in self.run_dir.oracle_states(self.name).items():
            if later >= rnd:
                path.unlink()

    def restore(self, before: int) -> None:
        """The oracle's newest state from before round `before` (none yet: as it starts)."""
        states = {r: path for r, path in self.run_dir.oracle_states(self.name).items() if r < before}
        if states:
            position = (before - 1) * self.work.inner_steps  # where the run stands (a finished run's schedule ended there)
            self.work.loops[self.name].load_state_dict(load_oracle_state(states[max(states)]), position)

    def save(self, rnd: int) -> None:
        with atomic_path(self.run_dir.oracle_state(self.name, rnd)) as tmp:
            torch_save(self.work.loops[self.name].state_dict(), tmp)
        states = self.run_dir.oracle_states(self.name)
        for old in sorted(states)[:-KEEP_STATES]:
            states[old].unlink()

    def keep(self) -> bool:
        """The model in `work.params` (round `self.round`'s) as this run directory's newest checkpoint, with the
        tokenizer and the config it was trained with: what `dgpt eval`, `generate` and `predict` read (fine-tuning:
        the oracle's head is in its state file of that round). On the simulation engine the run directory is the
        server's, whose checkpoint this is."""
        target = self.run_dir.checkpoint("round", self.round)
        if self.virtual or target.is_dir():
            return True
        tokenizer = _tokenizer_path(self.config, self.kind)
        if tokenizer != self.run_dir.tokenizer:
            write_text(self.run_dir.tokenizer, tokenizer.read_text(encoding="utf-8"))
        write_text(self.run_dir.config, dump_config(self.config))
        model = self.work.model
        save_checkpoint(self.run_dir.root, "round", self.round, weights_of(model), model.config,
                        {"round": self.round, "received": True}, self.config.pretrain.keep_checkpoints)
        logger.info(f"round {self.round}: oracle '{self.name}' keeps the federation's model in {target}")
        return True

    def report(self) -> dict | None:
        """The signed report of the losses this message's answer gives (None: none, or no ledger yet)."""
        return self.witness.report(self.round) if self.witness is not None else None

    def size(self) -> dict[str, float]:
        return {"size": float(self.work.sizes[self.name])}

    def theta(self, message: Message) -> torch.Tensor:
        """The Theta the message carries, checked against this oracle's model."""
        return wire.theta_from(message.content.array_records.get("theta"), sum(p.numel() for p in self.work.params))


def _identity(node_config: dict, run_config: dict) -> tuple[str, str | None]:
    """The config path and oracle name a SuperNode's --node-config gives (name None: a simulation engine's node)."""
    path, name = node_config.get("config"), node_config.get("oracle")
    if isinstance(path, str) and isinstance(name, str):
        return path, name
    if isinstance(node_config.get("partition-id"), int) and isinstance(run_config.get("config"), str):
        return run_config["config"], None
    raise DgptError("this SuperNode needs --node-config 'config=\"/path/to/dgpt.toml\" oracle=\"NAME\"'")


def _nth_oracle(config: Config, index: int, path: str) -> str:
    names = config.oracle_names()
    if not 0 <= index < len(names):
        raise DgptError(f"{path}: simulated SuperNode {index} has no oracle ({len(names)} declared): run the simulation "
                        f"with num-supernodes={len(names)}")
    return names[index]


def _tokenizer_path(config: Config, kind: str) -> Path:
    """This SuperNode's tokenizer: its run's (fine-tuning: the pre-trained run's, or tokenizer.path)."""
    ft = config.finetune
    if kind == "pretrain":
        return RunDir(config.run_dir).tokenizer
    return RunDir(ft.init_from).tokenizer if ft.init_from else Path(config.tokenizer.path)


def _check_tokenizer(config: Config, kind: str, server_sha256: str) -> None:
    """This SuperNode's tokenizer must be the server's."""
    path = _tokenizer_path(config, kind)
    if not path.is_file():
        raise DgptError(f"{path}: no tokenizer; prepare this oracle's shards with the federation's tokenizer first")
    mine = TextTokenizer.load(path).sha256
    if mine != server_sha256:
        raise DgptError(f"{path} is not the server's tokenizer (sha256 {mine[:12]} vs {server_sha256[:12]}): prepare this "
                        "oracle's shards with the federation's tokenizer")


def _round_of(message: Message) -> tuple[int, str]:
    asked = message.content.config_records.get("round")
    if asked is None or not isinstance(asked.get("round"), int) or not isinstance(asked.get("work"), str):
        raise DgptError("the server's message carries no round id")
    return asked["round"], asked["work"]


def _answer(message: Message, context: Context, handle: Callable[[Oracle, Message], RecordDict]) -> Message:
    """The handler's reply, or (it cannot take part) the reason, for the server to log: a DgptError's line, else the
    exception's type and message (its traceback in this SuperNode's log). dgpt's messages go to the SuperNode's
    output, with how long the answer took and how long the process took to start (imports included)."""
    t0, age = time.perf_counter(), _process_age()
    with messages_to(logging.StreamHandler(), fmt="%(asctime)s %(levelname)s %(message)s"):
        try:
            content = handle(Oracle(context, message), message)
        except Exception as e:
            if not isinstance(e, DgptError):
                logger.exception("the ClientApp failed")
            asked, oracle = message.content.config_records.get("round"), context.node_config.get("oracle")
            rnd = asked.get("round") if asked is not None else None
            reason = str(e) if isinstance(e, DgptError) else f"{type(e).__name__}: {e}"
            logger.error(f"round {rnd}: oracle {oracle!r} cannot take part: {reason}")
            content = wire.refusal(rnd if isinstance(rnd, int) else -1, oracle if isinstance(oracle, str) else "", reason)
        said = content.config_records["round"]
        started = f", {age:.2f} s after its ClientApp process started" if age is not None else ""
        logger.info(f"round {said['round']}: oracle {said['oracle']!r} answered the {message.metadata.message_type} "
                    f"message in {time.perf_counter() - t0:.2f} s{started}")
    return Message(content, reply_to=message)


def _process_age() -> float | None:
    """Seconds since this process started (Linux: /proc; None elsewhere)."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def _train(oracle: Oracle, message: Message) -> RecordDict:
    """H inner steps from the Theta of round `rnd`; the reply: the encoded pseudo-gradient, tokens and loss (and the
    losses of the candidate Thetas the message carried)."""
    rnd, theta = oracle.round, oracle.theta(message)
    if oracle.config.federation.secure_aggregation and not secure.masking():
        raise DgptError("the federation's settings ask for secure aggregation, but this train message did not come "
                        "through SecAgg+: this oracle sends its update only masked")
    losses = _validate_candidates(oracle, message)
    oracle.forget(rnd)
    oracle.restore(rnd)
    loop = oracle.work.loops[oracle.name]
    before = loop.tokens
    t0 = time.perf_counter()
    delta, loss = train_round(oracle.work, oracle.name, theta, rnd)
    seconds = time.perf_counter() - t0
    oracle.save(rnd)
    payload = oracle.codec.encode(delta)
    logger.info(f"round {rnd}: oracle '{oracle.name}' trained {oracle.work.steps_in(rnd)} steps in {seconds:.2f} s, "
                f"loss {loss:.4f}, sends {payload.nbytes:,} bytes")
    # DP-SGD: the epsilon this oracle's own accountant says it has spent (a statement of the oracle, like its loss)
    spent = {"privacy_epsilon": loop.privacy.epsilon()} if loop.privacy is not None else {}
    statement = oracle.witness and oracle.witness.train_statement(
        rnd, vector_sha256(theta), payload, loop.tokens - before, loss, spent.get("privacy_epsilon"))
    masked = secure.masked_metrics(message, delta, oracle.config.secagg)
    metrics = {**oracle.size(), "train_loss": loss, "tokens": float(loop.tokens), **spent, **losses, **masked}
    return wire.reply(rnd, oracle.name, metrics, payload, statement, oracle.report())


def _evaluate(oracle: Oracle, message: Message) -> RecordDict:
    """The oracle's validation metrics of the Theta it was sent (round 0: also how the server learns who it is), and
    of the candidate Thetas the message carried. Fine-tuning validates with the oracle's head as it was after that
    round."""
    losses = _validate_candidates(oracle, message)
    if oracle.kind == "finetune":
        oracle.restore(oracle.round + 1)
    theta = oracle.theta(message)
    copy_into(oracle.work.params, theta)
    found = {k: float(v) for k, v in oracle.work.evaluate().get(oracle.name, {}).items()}
    if oracle.witness is not None and math.isfinite(found.get("loss", math.nan)):
        oracle.witness.note({"theta": vector_sha256(theta), "loss": found["loss"]})
    metrics = {**oracle.size(), **{f"valid_{k}": v for k, v in found.items()}, **losses}
    if wire.asks_to_keep(message.content):  # the run's last validation: keep the model too (no message of its own)
        metrics["kept"] = float(oracle.keep())
    return wire.reply(oracle.round, oracle.name, metrics, report=oracle.report())


def _candidates(oracle: Oracle, message: Message) -> RecordDict:
    """The oracle's validation loss at each candidate Theta the message carries (the ledger's coalitions)."""
    losses = _validate_candidates(oracle, message)
    return wire.reply(oracle.round, oracle.name, {**oracle.size(), **losses}, report=oracle.report())


def _validate_candidates(oracle: Oracle, message: Message) -> dict[str, float]:
    """The oracle's validation loss at each candidate Theta the message carries, as metrics loss_0, loss_1, ...
    (fine-tuning: with its head as it was after their round); each noted for its signed report."""
    valued, thetas = wire.candidates_from(message.content, sum(p.numel() for p in oracle.work.params))
    if thetas and oracle.kind == "finetune":
        oracle.restore(valued + 1)
    losses = {}
    for j, theta in enumerate(thetas):
        copy_into(oracle.work.params, theta)
        loss = oracle.work.evaluate().get(oracle.name, {}).get("loss")
        if loss is not None and math.isfinite(loss):
            losses[f"loss_{j}"] = float(loss)
            if oracle.witness is not None:
                oracle.witness.note({"theta": vector_sha256(theta), "loss": float(loss)})
    return losses


def _keep_model(oracle: Oracle, message: Message) -> RecordDict:
    copy_into(oracle.work.params, oracle.theta(message))
    return wire.reply(oracle.round, oracle.name, {**oracle.size(), "kept": float(oracle.keep())})


@app.train()
def train(message: Message, context: Context) -> Message:
    if not secure.masking():
        return _answer(message, context, _train)
    secure.open_fitins(message)  # under SecAgg+ the request comes as a FitIns, the reply goes as a FitRes it masks
    return Message(secure.as_fitres(_answer(message, context, _train).content), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _answer(message, context, _evaluate)


@app.evaluate(wire.CANDIDATES.split(".")[1])
def candidates(message: Message, context: Context) -> Message:
    return _answer(message, context, _candidates)


@app.query(wire.MODEL.split(".")[1])
def keep_model(message: Message, context: Context) -> Message:
    return _answer(message, context, _keep_model)
