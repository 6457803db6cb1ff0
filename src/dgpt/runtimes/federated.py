"""The round driver shared by every decentralized runtime.

Each process holds some oracles (sim: all of them; torchrun: one per rank). A round: the Strategy picks
who takes part; every participating local oracle starts from Theta, runs H inner steps with its own
optimizer and data, and encodes its pseudo-gradient Delta_j = Theta - Theta_j; the transport moves the
encoded payloads; the Strategy checks, combines and applies them, identically in every process.

What is trained comes from a `Work` factory: pre-training (`pretraining_work`, below) or fine-tuning
(`dgpt.runtimes.finetune`). Only `Work.params` are sent and aggregated; whatever else an oracle's loop
trains (its task head) stays in that loop and in the oracle's own state file.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch.nn.utils import parameters_to_vector

from dgpt.config import AGGREGATOR, Config
from dgpt.data.loader import WindowSampler
from dgpt.errors import DgptError
from dgpt.federation.aggregate import mean_weights
from dgpt.federation.codec import Codec, Payload
from dgpt.federation.ledger import line_of
from dgpt.federation.signing import vector_sha256
from dgpt.federation.strategy import Strategy
from dgpt.model.gpt import GPT
from dgpt.progress import Progress
from dgpt.runtimes.contribution import ContributionLedger
from dgpt.runtimes.identity import Witness, identities
from dgpt.runtimes.report import RoundRecord, RoundReport
from dgpt.runtimes.setup import build_model, load_run
from dgpt.runtimes.summary import RunSummary
from dgpt.rundir import WEIGHTS, RunDir, checkpoint_number
from dgpt.train.checkpoint import load_state, load_weights_into, save_checkpoint, weights_of
from dgpt.fileio import atomic_path, torch_save
from dgpt.train.evaluate import Validator, weighted_loss
from dgpt.train.local import InnerLoop, LoopSettings, move_optimizer_state

logger = logging.getLogger(__name__)
PARKED = torch.device("cpu")  # where idle oracles keep their optimizer state


class Transport(Protocol):
    """Moves what the driver sends between the processes of a run."""

    name: str  # the runtime, as its summary names it
    is_leader: bool  # writes metrics and the global checkpoint
    prepares_data: bool  # whether this process may (re)build the shards

    def gather_scalars(self, local: dict[str, float]) -> dict[str, float]:
        """Every oracle's value from the processes that hold them (NaN for an oracle that gave none)."""

    def gather_texts(self, local: dict[str, str]) -> dict[str, str]:
        """Every process's texts by name (each names only its own: its oracles', the leader's the aggregator's)."""

    def sent(self, name: str, payload: Payload, codec: Codec) -> Payload:
        """What this process sends as oracle `name`'s update (the oracle then signs it)."""

    def exchange(self, sent: dict[str, Payload], participants: list[str], codec: Codec) -> dict[str, Payload]:
        """The payload of every participant, as it arrived at the aggregator (this process's oracles in `sent`)."""

    def barrier(self) -> None: ...

    def each_filesystem(self, write: Callable[[], None], written: Callable[[], bool]) -> None:
        """Call `write` once on every filesystem the processes see (`written`: already there)."""


@dataclass
class Work:
    """What the round driver trains in this process."""

    model: GPT  # the shared body, written to the round checkpoints
    params: list[torch.Tensor]  # exactly what every oracle sends and the aggregator sees
    loops: dict[str, InnerLoop]  # this process's oracles
    sizes: dict[str, float]  # every oracle's training tokens (or examples): the weights of the mean
    evaluate: Callable[[], dict[str, dict[str, float]]]  # this process's oracles -> {metric: value}, "loss" first
    rounds: int
    inner_steps: int  # H
    metric_names: tuple[str, ...] = ("loss",)
    unit: str = "tokens"  # what `sizes` count: tokens (pre-training, a language-model loss) or examples (fine-tuning)
    total_steps: int = 0  # each oracle's steps over the whole run; 0 = rounds x H (else the last round is shorter)
    # this process's oracles -> the gradient of their validation loss at the current parameters (flat, over `params`)
    gradient: Callable[[], dict[str, torch.Tensor]] | None = None
    private_heads: bool = False  # evaluation also uses state outside `params` that trains every round (DSFT heads)

    def steps_in(self, rnd: int) -> int:
        """H, or in the last round what is left of `total_steps`."""
        return min(self.inner_steps, (self.total_steps or self.rounds * self.inner_steps) - (rnd - 1) * self.inner_steps)


def pretraining_work(config: Config, transport: Transport, local_names: list[str]) -> Work:
    """DUPT: the whole GPT is shared; each oracle's loop samples windows of its own shards."""
    fed, cfg = config.federation, config.pretrain
    setup = load_run(config, oracles=local_names, prepare_data=transport.prepares_data)
    n_ctx = setup.model_config.n_ctx
    model, forward = build_model(setup)
    all_names, settings = config.oracle_names(), LoopSettings.of(cfg)
    loops = {}
    for name in local_names:
        seed = oracle_seed(config.seed, all_names.index(name))
        sampler = WindowSampler(setup.train[name], n_ctx, seed, name)
        loops[name] = InnerLoop(model, settings, sampler, fed.rounds * fed.inner_steps, setup.device, seed, forward)
        if config.privacy.enabled:
            loops[name].make_private(config.privacy, name)
    sizes = transport.gather_scalars({n: float(loops[n].sampler.num_tokens) for n in local_names})
    validator = Validator({n: setup.valid[n] for n in local_names}, n_ctx, cfg.eval_windows, cfg.batch_size)

    def evaluate() -> dict[str, dict[str, float]]:
        return {name: {"loss": loss} for name, loss in validator(model, setup.device, cfg.dtype).items()}

    params = list(model.parameters())

    def gradient() -> dict[str, torch.Tensor]:
        return validator.gradients(model, params, setup.device, cfg.dtype)

    return Work(model, params, loops, sizes, evaluate, fed.rounds, fed.inner_steps, gradient=gradient)


def oracle_seed(seed: int, index: int) -> int:
    """Each oracle's own stream of batches and dropout masks, the same in every runtime."""
    return seed * 1009 + 7919 * (index + 1)


def load_oracle_state(path, mmap: bool = False) -> dict:
    """An oracle's private state file (read with weights_only: nothing is unpickled; `mmap`: tensors mapped, not read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise DgptError(f"{path}: oracle state file missing") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise DgptError(f"{path}: unreadable oracle state ({type(e).__name__})") from None


@torch.no_grad()
def copy_into(params: list[torch.Tensor], vector: torch.Tensor) -> None:
    """Write a flat vector into the parameters (a copy: torch's vector_to_parameters would alias it)."""
    for p, chunk in zip(params, vector.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


def train_round(work: Work, name: str, theta: torch.Tensor, rnd: int) -> tuple[torch.Tensor, float]:
    """One oracle's share of round `rnd`: H inner steps from Theta (fewer in a shorter last round); its pseudo-gradient
    Theta - Theta_j and mean loss."""
    if work.steps_in(rnd) <= 0:
        raise DgptError(f"round {rnd} is past the end of this oracle's schedule ({work.rounds} rounds)")
    loop = work.loops[name]
    copy_into(work.params, theta)
    loop.step = (rnd - 1) * work.inner_steps  # an oracle that missed rounds keeps to the schedule
    move_optimizer_state(loop.optimizer, theta.device)
    losses = [loop.train_step() for _ in range(work.steps_in(rnd))]
    move_optimizer_state(loop.optimizer, PARKED)
    return theta - parameters_to_vector(work.params).detach(), sum(losses) / len(losses)


def train_federated(
    config: Config, transport: Transport, local_names: list[str], *, stop_after_round: int | None = None,
    work: Callable[[Config, Transport, list[str]], Work] = pretraining_work,
) -> RunSummary:
    """Run the work's rounds, resuming from the newest round checkpoint; returns the run's summary."""
    return RoundDriver(config, transport, work(config, transport, local_names)).run(stop_after_round)


class RoundDriver:
    def __init__(self, config: Config, transport: Transport, work: Work):
        self.config, self.transport, self.work = config, transport, work
        self.run_dir = RunDir(config.run_dir)
        fed = config.federation
        self.codec = Codec(fed.compression, [p.numel() for p in work.params], fed.int8_block)
        weights = mean_weights(fed.mean_weights, work.sizes, {o.name: o.weight for o in config.oracles})
        self.strategy = Strategy(fed, self.codec, weights, self._theta(), config.seed)
        self.start, ledger_head = self._resume()
        self.report = RoundReport(config, self.run_dir, work, self.start) if transport.is_leader else None
        keys, own = identities(config, transport, list(work.loops))
        self.witnesses = {n: Witness(n, own[n], self.run_dir.receipts(n), keys[AGGREGATOR]) for n in work.loops}
        self.ledger = ContributionLedger(config, self, self.start, ledger_head, keys, own.get(AGGREGATOR))

    def run(self, stop_after: int | None) -> RunSummary:
        work, fed = self.work, self.config.federation
        t_start = time.perf_counter()
        self._deliver_head()
        valid, scores = self.validate()
        self.ledger.validated(valid)
        validated = done = self.start
        if self.report is not None:
            self.report.started(self.start, valid, scores)
        bar = Progress(work.rounds, self.start, "round", self.config.log.progress_interval_s,
                       tokens=0 if self.start == 0 else None, enabled=self.transport.is_leader)
        for rnd in range(self.start + 1, work.rounds + 1):
            t0 = time.perf_counter()
            participants, theta = self.strategy.sample(), vector_sha256(self.strategy.theta)
            trained = {n: self._train_oracle(n, rnd, theta) for n in work.loops if n in participants}
            received = self.transport.exchange({n: p for n, (p, _, _) in trained.items()}, participants, self.codec)
            statements = self.gather_signed({n: s for n, (_, _, s) in trained.items()})
            admitted, refused = self.ledger.admit(rnd, theta, received, statements)
            result = self.strategy.aggregate(admitted)
            result.rejected.update(refused)
            valuation = self.ledger.value(result)
            self.load_theta(self.strategy.apply(result, work.steps_in(rnd)))
            self.ledger.record(rnd, result, received, valuation, statements, theta)
            self._deliver_head()
            evaluated = rnd % fed.eval_interval == 0 or rnd == work.rounds
            now = self.validate() if evaluated else ({}, {})
            self.ledger.validated(now[0])
            if evaluated:
                (valid, scores), validated = now, rnd
            record = RoundRecord(rnd, result, self.gather({n: loss for n, (_, loss, _) in trained.items()}), *now)
            record.tokens, record.epsilon = self._tokens(), self._epsilon()
            record.seconds = time.perf_counter() - t0
            for name, why in result.rejected.items():
                logger.warning(f"round {rnd}: oracle '{name}' was left out of this round: {why}")
            if result.skipped:
                logger.warning(f"round {rnd}: {result.skipped}")
            if self.report is not None:
                self.report.round(record, self.strategy)
            if rnd % fed.checkpoint_interval == 0 or rnd == work.rounds or rnd == stop_after:
                self._save(rnd)
            bar.update(record.tokens, **record.postfix())
            done = rnd
            if stop_after is not None and rnd >= stop_after:
                break
        bar.close()
        if self.report is not None:
            self.report.finished(self.strategy)
        sent = self.strategy.bytes
        return RunSummary(
            self.transport.name, "round", done, work.rounds, validated, weighted_loss(valid, work.sizes),
            {n: {"loss": loss, **scores.get(n, {})} for n, loss in valid.items()}, self._tokens(), sent.total,
            sent.dp_bytes, time.perf_counter() - t_start, language_model=work.unit == "tokens",
            epsilon=self._epsilon(), delta=self.config.privacy.delta,
        )

    def _tokens(self) -> int:
        """Tokens trained so far by every oracle."""
        return int(sum(self.gather({n: float(loop.tokens) for n, loop in self.work.loops.items()}).values()))

    def _epsilon(self) -> dict[str, float]:
        """DP-SGD: every oracle's epsilon spent so far, from its own accountant ({} without [privacy])."""
        if not self.config.privacy.enabled:
            return {}
        return self.gather({n: loop.privacy.epsilon() for n, loop in self.work.loops.items()})

    def _theta(self) -> torch.Tensor:
        return parameters_to_vector(self.work.params).detach()

    def load_theta(self, theta: torch.Tensor) -> None:
        copy_into(self.work.params, theta)

    def restore_theta(self) -> None:
        """Back to the Strategy's Theta (after the parameters held an oracle's or a trial's)."""
        self.load_theta(self.strategy.theta)

    def gather(self, local: dict[str, float]) -> dict[str, float]:
        """Every oracle's value from the processes that hold them (oracles without one left out)."""
        return {n: v for n, v in self.transport.gather_scalars(local).items() if v == v}

    def _train_oracle(self, name: str, rnd: int, theta: str) -> tuple[Payload, float, dict]:
        """One oracle's share of a round: its pseudo-gradient encoded to be sent, its loss, and its signed statement."""
        before = self.work.loops[name].tokens
        delta, loss = train_round(self.work, name, self.strategy.theta, rnd)
        payload = self.transport.sent(name, self.codec.encode(delta), self.codec)
        loop = self.work.loops[name]
        epsilon = loop.privacy.epsilon() if loop.privacy is not None else None  # DP-SGD: what it has spent, signed
        return payload, loss, self.witnesses[name].train_statement(rnd, theta, payload, loop.tokens - before, loss, epsilon)

    def _deliver_head(self) -> None:
        """The aggregator's signed head of the newest record to this process's oracles, which keep it as a receipt
        (or stop, when it does not extend the last one they hold)."""
        for witness in self.witnesses.values():
            witness.receive(self.ledger.signed_head)

    def gather_signed(self, local: dict[str, dict]) -> dict[str, dict]:
        """Every oracle's signed statement from the processes that hold them (read as JSON, never unpickled)."""
        return {n: json.loads(t) for n, t in self.transport.gather_texts({n: line_of(s) for n, s in local.items()}).items()}

    def witness(self, subject: dict, key: str, values: dict[str, float]) -> None:
        """This process's oracles note what they reported about `subject` (a loss, an inner product) for their report."""
        for name, value in values.items():
            if math.isfinite(value):
                self.witnesses[name].note({**subject, key: value})

    def reports(self, rnd: int) -> dict[str, list[dict]]:
        """Every oracle's signed report of what it reported since its last one."""
        signed = self.gather_signed({n: r for n, w in self.witnesses.items() if (r := w.report(rnd)) is not None})
        return {n: [r] for n, r in signed.items()}

    def validate(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Every oracle's validation loss at the current parameters, and its other metrics (fine-tuning: accuracy, ...)."""
        mine = self.work.evaluate()
        self.witness({"theta": vector_sha256(self._theta())}, "loss", {n: m["loss"] for n, m in mine.items() if "loss" in m})
        gathered = {k: self.gather({n: m[k] for n, m in mine.items() if k in m}) for k in self.work.metric_names}
        extra = {n: {k: v[n] for k, v in gathered.items() if k != "loss" and n in v} for n in self.config.oracle_names()}
        return gathered["loss"], {n: m for n, m in extra.items() if m}

    def _resume(self) -> tuple[int, str | None]:
        """Load the newest round checkpoint and this process's oracle states; every process must agree on the round.
        Returns the round and the ledger head the checkpoint anchors."""
        checkpoint, start, head, work = self.run_dir.latest_checkpoint(), 0, None, self.work
        if checkpoint is not None:
            load_weights_into(work.model, checkpoint / WEIGHTS, work.model.config)
            state = load_state(checkpoint)
            start, head = state["round"], state.get("ledger_head")
            for name, loop in work.loops.items():
                loop.load_state_dict(load_oracle_state(self.run_dir.oracle_state(name, start)), start * work.inner_steps)
                move_optimizer_state(loop.optimizer, PARKED)
            self.strategy.load_state_dict(_strategy_state(state), self._theta())
            logger.info(f"resumed from {checkpoint} at round {start}")
        starts = self.transport.gather_scalars({n: float(start) for n in work.loops})
        if len(set(starts.values())) > 1:
            found = ", ".join(f"'{n}' from round {int(r)}" for n, r in starts.items())
            raise DgptError(f"the oracles would resume from different rounds ({found}): every host's run_dir needs the "
                            "same newest checkpoints/round_N")
        return start, head

    def _save(self, rnd: int) -> None:
        """Each process saves its oracles' inner state; then the round checkpoint is committed on every filesystem."""
        run_dir, work = self.run_dir, self.work
        for name, loop in work.loops.items():
            with atomic_path(run_dir.oracle_state(name, rnd)) as tmp:
                torch_save(loop.state_dict(), tmp)
        self.transport.barrier()
        state = {"round": rnd, "strategy": self.strategy.state_dict(), "ledger_head": self.ledger.head}
        keep = self.config.pretrain.keep_checkpoints
        # every process holds the same global model and Strategy: each host without a shared run_dir gets its copy
        self.transport.each_filesystem(
            lambda: save_checkpoint(run_dir.root, "round", rnd, weights_of(work.model), work.model.config, state, keep,
                                    final=rnd == work.rounds),
            run_dir.checkpoint("round", rnd).is_dir,
        )
        kept = {checkpoint_number(p) for p in run_dir.list_checkpoints()}
        for name in work.loops:
            for old_round, path in run_dir.oracle_states(name).items():
                if old_round not in kept:
                    path.unlink()


def _strategy_state(state: dict) -> dict:
    """The Strategy's part of a round checkpoint (checkpoints written before the Strategy kept it in three keys)."""
    if "strategy" in state:
        return state["strategy"]
    return {"outer": state["outer"], "bytes": state["ledger"], "drops": state["drops"]}
