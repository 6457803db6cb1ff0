"""The round driver shared by every decentralized runtime.

Each process holds some oracles (sim: all of them; torchrun: one per rank). A round: every
participating local oracle starts from the global parameters Theta, runs H inner steps with its own
optimizer and data, and hands its pseudo-gradient Delta_j = Theta - Theta_j (as it would arrive after
compression) to the transport, which aggregates across processes with `dgpt.federation`. The outer
optimizer then moves Theta identically in every process. Only the transport differs between runtimes.

What is trained comes from a `LocalWork` factory: pre-training (the default, below) or fine-tuning
(`dgpt.runtimes.finetune`). Only `LocalWork.params` are flattened, sent and aggregated; whatever else
an oracle's loop trains (its task head) stays in that loop and in the oracle's own state file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector
from tqdm import tqdm

from dgpt.config import Config, FederationConfig
from dgpt.errors import DgptError
from dgpt.data.loader import WindowSampler
from dgpt.federation.accounting import ByteLedger, human_bytes
from dgpt.federation.aggregate import agreement, extrapolation, is_finite, mean_weights
from dgpt.federation.compression import transmit
from dgpt.federation.outer import OuterOptimizer
from dgpt.fileio import atomic_path
from dgpt.model.gpt import GPTConfig
from dgpt.runtimes.setup import build_model, load_run
from dgpt.train.checkpoint import (
    WEIGHTS,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    load_weights_into,
    save_checkpoint,
    weights_of,
)
from dgpt.train.evaluate import Validator, weighted_loss
from dgpt.train.local import InnerLoop, move_optimizer_state
from dgpt.train.metrics import MetricsLog


@dataclass
class LocalUpdate:
    delta: torch.Tensor  # the pseudo-gradient as the aggregator decodes it
    bytes_sent: int
    train_loss: float


@dataclass
class RoundOutcome:
    update: torch.Tensor | None  # the aggregated Delta, None when no update was accepted
    accepted: list[str]
    rejected: list[str]  # non-finite pseudo-gradients, dropped from the round
    bytes_sent: dict[str, int]
    train_loss: dict[str, float]
    norms: dict[str, float]  # ||Delta_j|| of each accepted pseudo-gradient, as the aggregator received it


class Transport(Protocol):
    is_leader: bool  # writes metrics and the global checkpoint
    prepares_data: bool  # whether this process may (re)build the shards

    def gather_scalars(self, local: dict[str, float]) -> dict[str, float]: ...

    def aggregate(
        self, updates: dict[str, LocalUpdate], fed: FederationConfig, weights: dict[str, float], numel: int
    ) -> RoundOutcome: ...

    def barrier(self) -> None: ...

    def each_filesystem(self, write: Callable[[], None], written: Callable[[], bool]) -> None:
        """Call `write` once on every filesystem the processes see (`written`: already there)."""


@dataclass
class LocalWork:
    """What the round driver trains in this process."""

    config: Config  # as run: federation.rounds / inner_steps and the inner loops' settings
    run_dir: Path
    model: nn.Module  # written to the round checkpoints
    model_config: GPTConfig
    params: list[torch.Tensor]  # exactly what every oracle sends and the aggregator sees
    device: torch.device
    loops: dict[str, InnerLoop]  # this process's oracles
    sizes: dict[str, float]  # every oracle's training tokens (or examples): the weights of the mean
    evaluate: Callable[[], dict[str, dict[str, float]]]  # this process's oracles -> {metric: value}, "loss" first
    metric_names: tuple[str, ...] = ("loss",)
    unit: str = "tokens"


def pretraining_work(config: Config, transport: Transport, local_names: list[str], log: Callable[[str], None]) -> LocalWork:
    """DUPT: the whole GPT is shared; each oracle's loop samples windows of its own shards."""
    fed, cfg = config.federation, config.pretrain
    setup = load_run(config, oracles=local_names, prepare_data=transport.prepares_data, log=log)
    n_ctx = setup.model_config.n_ctx
    model, forward = build_model(setup)
    all_names = config.oracle_names()
    loops = {
        name: InnerLoop(
            model, cfg, WindowSampler(setup.train[name], n_ctx, oracle_seed(config.seed, all_names.index(name)), name),
            fed.rounds * fed.inner_steps, setup.device, oracle_seed(config.seed, all_names.index(name)), forward,
        )
        for name in local_names
    }
    sizes = transport.gather_scalars({n: float(loops[n].sampler.num_tokens) for n in local_names})
    validator = Validator({n: setup.valid[n] for n in local_names}, n_ctx, cfg.eval_windows, cfg.batch_size)

    def evaluate() -> dict[str, dict[str, float]]:
        return {name: {"loss": loss} for name, loss in validator(model, setup.device, cfg.dtype).items()}

    return LocalWork(config, setup.run_dir, model, setup.model_config, list(model.parameters()), setup.device, loops, sizes, evaluate)


def oracle_seed(seed: int, index: int) -> int:
    """Each oracle's own stream of batches and dropout masks, the same in every runtime."""
    return seed * 1009 + 7919 * (index + 1)


def oracle_state_path(run_dir: Path, name: str, rnd: int) -> Path:
    return run_dir / "oracles" / name / f"round_{rnd:07d}.pt"


def train_federated(
    config: Config,
    transport: Transport,
    local_names: list[str],
    *,
    stop_after_round: int | None = None,
    log: Callable[[str], None] = print,
    work: Callable[[Config, Transport, list[str], Callable[[str], None]], LocalWork] = pretraining_work,
) -> dict:
    """Run config.federation.rounds rounds (resuming from the newest round checkpoint)."""
    local = work(config, transport, local_names, log)
    config, run_dir, model, params, loops = local.config, local.run_dir, local.model, local.params, local.loops
    fed, cfg = config.federation, config.pretrain
    segments = [p.numel() for p in params]
    all_names = config.oracle_names()
    parked = torch.device("cpu")
    tokens = local.sizes
    weights = mean_weights(fed.mean_weights, tokens, {o.name: o.weight for o in config.oracles})
    outer = OuterOptimizer(parameters_to_vector(params), fed.outer_lr, fed.outer_momentum, fed.nesterov)
    ledger = ByteLedger(param_bytes=4 * sum(segments))
    drops = torch.Generator().manual_seed(config.seed + 17)  # identical draws in every process

    start, checkpoint = 0, latest_checkpoint(run_dir)
    if checkpoint is not None:
        load_weights_into(model, checkpoint / WEIGHTS, local.model_config)
        state = load_state(checkpoint)
        start = state["round"]
        ledger.load_state_dict(state["ledger"])
        drops.set_state(state["drops"])
        for name in local_names:
            path = oracle_state_path(run_dir, name, start)
            loops[name].load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            move_optimizer_state(loops[name].optimizer, parked)
        outer.load_state_dict({"theta": parameters_to_vector(params).detach().cpu(), "sgd": state["outer"]})
        log(f"resumed from {checkpoint} at round {start}")
    starts = transport.gather_scalars({n: float(start) for n in local_names})
    if len(set(starts.values())) > 1:
        found = ", ".join(f"'{n}' from round {int(r)}" for n, r in starts.items())
        raise DgptError(f"the oracles would resume from different rounds ({found}): every host's run_dir needs the "
                        "same newest checkpoints/round_N")
    metrics = None
    if transport.is_leader:
        resume_after = start if checkpoint else None
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_after, key="round", tensorboard=config.log.tensorboard)

    def validate() -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Every oracle's validation loss, and its other metrics (fine-tuning: accuracy, F1, ...)."""
        mine = local.evaluate()
        scores = {k: transport.gather_scalars({n: m[k] for n, m in mine.items() if k in m}) for k in local.metric_names}
        extra = {n: {k: v[n] for k, v in scores.items() if k != "loss" and n in v and v[n] == v[n]} for n in all_names}
        return scores["loss"], {n: m for n, m in extra.items() if m}

    valid, scores = validate()
    if metrics is not None and start == 0:
        extra = {"metrics": scores} if scores else {}
        metrics.log(round=0, kind="round", tokens=0, loss=weighted_loss(valid, tokens), oracles=valid, **extra, bytes_total=0, dp_bytes=0)
    if transport.is_leader:
        log(f"model: {sum(segments):,} shared parameters; oracles: " + ", ".join(f"{n} ({int(tokens[n]):,} {local.unit})" for n in all_names))
    bar = tqdm(total=fed.rounds, initial=start, desc="rounds", unit="round", dynamic_ncols=True, disable=not transport.is_leader)
    for rnd in range(start + 1, fed.rounds + 1):
        t0 = time.perf_counter()
        draws = torch.rand(len(all_names), generator=drops)
        participants = [n for n, d in zip(all_names, draws.tolist()) if d >= fed.drop_prob]
        theta = outer.theta.detach()
        updates = {}
        for name in [n for n in local_names if n in participants]:
            loops[name].step = (rnd - 1) * fed.inner_steps  # an oracle that missed rounds keeps to the schedule
            updates[name] = _local_round(loops[name], params, theta, fed, segments, local.device, parked)
        outcome = transport.aggregate(updates, fed, weights, sum(segments))
        agree = scale = None
        if outcome.update is not None:
            agree = agreement(outcome.update, outcome.norms, weights, fed.aggregator, fed.clip_norm)
            scale = extrapolation(fed.extrapolation, outcome.update, outcome.norms, weights, fed.aggregator, fed.clip_norm)
            outer.step(outcome.update * scale)
        copy_into(params, outer.theta.detach())
        evaluated = rnd % fed.eval_interval == 0 or rnd == fed.rounds
        valid, scores = validate() if evaluated else ({}, {})
        seen = sum(transport.gather_scalars({n: float(loops[n].tokens) for n in local_names}).values())
        ledger.record_round(participants, outcome.bytes_sent, fed.inner_steps)
        for name in outcome.rejected:
            log(f"round {rnd}: oracle '{name}' sent a pseudo-gradient with NaN/Inf; it was left out of this round")
        if metrics is not None:
            _log_round(metrics, rnd, valid, scores, tokens, seen, outcome, agree, scale, participants, ledger, time.perf_counter() - t0)
        if rnd % cfg.checkpoint_interval == 0 or rnd == fed.rounds or rnd == stop_after_round:
            _save_round(run_dir, rnd, model, local.model_config, loops, outer, ledger, drops, transport, cfg.keep_checkpoints)
        if valid:
            bar.set_postfix({**{n[:12]: f"{v:.3f}" for n, v in valid.items()}, "agreement": f"{agree:.2f}" if agree is not None else "-"})
        bar.update()
        if stop_after_round is not None and rnd >= stop_after_round:
            break
    bar.close()
    if metrics is not None:
        metrics.close()
        log(
            f"communication: {human_bytes(ledger.total)} moved in total "
            f"({human_bytes(sum(ledger.sent.values()))} sent by oracles); synchronous data parallel would have "
            f"moved {human_bytes(ledger.dp_bytes)} ({ledger.dp_bytes / max(ledger.total, 1):.0f}x more)"
        )
    return {
        "valid": valid, "global": weighted_loss(valid, tokens), "metrics": scores, "bytes_total": ledger.total, "dp_bytes": ledger.dp_bytes,
    }


def _local_round(loop, params, theta, fed, segments, device, parked) -> LocalUpdate:
    """One oracle's share of a round: H inner steps from Theta, then its pseudo-gradient."""
    copy_into(params, theta)
    move_optimizer_state(loop.optimizer, device)
    losses = [loop.train_step() for _ in range(fed.inner_steps)]
    move_optimizer_state(loop.optimizer, parked)  # idle oracles keep their state off the accelerator
    with torch.no_grad():
        delta = theta - parameters_to_vector(params)
    received, nbytes = transmit(delta, fed.compression, fed.int8_block, segments) if is_finite(delta) else (delta, 4 * delta.numel())
    return LocalUpdate(received, nbytes, sum(losses) / len(losses))


@torch.no_grad()
def copy_into(params: list[torch.Tensor], vector: torch.Tensor) -> None:
    """Write a flat vector into the parameters (a copy: torch's vector_to_parameters would alias it)."""
    for p, chunk in zip(params, vector.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


def _log_round(metrics, rnd, valid, scores, tokens, seen, outcome, agree, scale, participants, ledger, seconds) -> None:
    """A `round` row (global validation loss, and other metrics, when validated; the update's agreement and the
    extrapolation factor the outer step applied to it) and one `oracle` row per oracle."""
    evaluated = {"loss": weighted_loss(valid, tokens), "oracles": valid} if valid else {}
    evaluated.update({"metrics": scores} if scores else {})
    metrics.log(
        round=rnd, kind="round", **evaluated, participants=participants, accepted=outcome.accepted,
        rejected=outcome.rejected, agreement=agree, outer_scale=scale, bytes_total=ledger.total, bytes_sent=sum(ledger.sent.values()),
        dp_bytes=ledger.dp_bytes, seconds=seconds, tokens=int(seen),
    )
    for name in tokens:
        metrics.log(
            round=rnd, kind="oracle", oracle=name, valid_loss=valid.get(name), train_loss=outcome.train_loss.get(name),
            bytes_sent=outcome.bytes_sent.get(name, 0), participated=name in participants, accepted=name in outcome.accepted,
        )


def _save_round(run_dir, rnd, model, model_config, loops, outer, ledger, drops, transport, keep) -> None:
    """Each process saves its oracles' inner state; then the leader commits the round checkpoint."""
    for name, loop in loops.items():
        with atomic_path(oracle_state_path(run_dir, name, rnd)) as tmp:
            torch.save(loop.state_dict(), tmp)
    transport.barrier()
    state = {"round": rnd, "outer": outer.sgd.state_dict(), "ledger": ledger.state_dict(), "drops": drops.get_state()}
    # every process holds the same global model and outer state: each host without a shared run_dir gets its copy
    transport.each_filesystem(lambda: save_checkpoint(run_dir, "round", rnd, weights_of(model), model_config, state, keep),
                              checkpoint_dir(run_dir, "round", rnd).is_dir)
    kept = {int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)}
    for name in loops:
        for old in (run_dir / "oracles" / name).glob("round_*.pt"):
            if int(old.stem.split("_")[1]) not in kept:
                old.unlink()
