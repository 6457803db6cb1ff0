"""The centralised baseline: one trainer on every oracle's training tokens pooled.

With `pretrain.steps = 0` (the default) the baseline trains as many tokens as the federated run the same config
describes, with the same schedule length: `federation.rounds x inner_steps` steps, each of `grad_accum x oracles`
micro-batches of `batch_size` windows (every oracle's batch of one inner step, pooled; one micro-batch holds what
one oracle's step held, so it fits where the oracles' steps fit). `--set federation.runtime=central` on a federated
config is then a like-for-like baseline.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from dgpt.config import Config, PretrainConfig
from dgpt.data.loader import WindowSampler
from dgpt.rundir import RunDir
from dgpt.progress import Progress
from dgpt.runtimes.setup import build_model, load_run
from dgpt.runtimes.summary import RunSummary
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint, load_state, load_weights_into, save_checkpoint, weights_of
from dgpt.train.evaluate import Validator, weighted_loss
from dgpt.train.local import InnerLoop
from dgpt.train.metrics import MetricsLog

logger = logging.getLogger(__name__)


def central_schedule(config: Config) -> PretrainConfig:
    """`[pretrain]` as the central runtime trains it: steps and grad_accum derived from `[federation]` when
    `pretrain.steps` is 0 (and said so), as given otherwise."""
    cfg, fed, k = config.pretrain, config.federation, max(len(config.oracles), 1)
    if cfg.steps:
        return cfg
    derived = dataclasses.replace(cfg, steps=fed.rounds * fed.inner_steps, grad_accum=cfg.grad_accum * k)
    logger.info(f"central baseline at the federated run's tokens: {derived.steps:,} steps ({fed.rounds} rounds x "
                f"{fed.inner_steps} inner steps) of {derived.grad_accum} x {cfg.batch_size} windows (grad_accum "
                f"{cfg.grad_accum} x {k} oracles); set pretrain.steps to choose the steps yourself")
    return derived


def pretrain_central(config: Config, *, stop_after: int | None = None) -> RunSummary:
    """Train for the central schedule's steps, resuming from the newest checkpoint; returns the run's summary."""
    setup = load_run(config)
    cfg, run_dir = central_schedule(config), setup.run_dir
    model, forward = build_model(setup)
    n_ctx = setup.model_config.n_ctx
    pooled = [a for arrays in setup.train.values() for a in arrays]
    loop = InnerLoop(model, cfg, WindowSampler(pooled, n_ctx, config.seed, "pooled"), cfg.steps, setup.device, config.seed, forward)
    if config.privacy.enabled:  # the pooled baseline under the same DP-SGD: what privacy costs without federation
        loop.make_private(config.privacy, "pooled")
    validator = Validator(setup.valid, n_ctx, cfg.eval_windows, cfg.batch_size)
    train_tokens = {name: sum(len(a) for a in arrays) for name, arrays in setup.train.items()}

    start, checkpoint = 0, latest_checkpoint(run_dir)
    resuming = False
    if checkpoint is not None:
        load_weights_into(model, checkpoint / WEIGHTS, setup.model_config)
        state = load_state(checkpoint)
        resuming = "loop" in state  # an imported checkpoint has weights only: training starts from them
        if resuming:
            loop.load_state_dict(state["loop"])
            start = loop.step
        logger.info(f"{'resumed' if resuming else 'initialised'} from {checkpoint} at step {start}")
    metrics = MetricsLog(RunDir(run_dir).metrics, resume_after=start if resuming else None, tensorboard=config.log.tensorboard)

    def validate(step: int) -> dict:
        losses = validator(model, setup.device, cfg.dtype)
        metrics.log(step=step, tokens=loop.tokens, kind="valid", loss=weighted_loss(losses, train_tokens), oracles=losses)
        return losses

    t_start = time.perf_counter()
    losses, validated = validate(0) if start == 0 else {}, start
    logger.info(f"model: {model.num_params():,} parameters; {loop.sampler.num_tokens:,} pooled training tokens")
    bar = Progress(cfg.steps, start, "step", config.log.progress_interval_s, tokens=loop.tokens)
    for step in range(start + 1, cfg.steps + 1):
        loss = loop.train_step()
        if step % cfg.log_interval == 0 or step == cfg.steps:
            metrics.log(step=step, tokens=loop.tokens, kind="train", loss=loss, lr=loop.optimizer.param_groups[0]["lr"],
                        **({"privacy_epsilon": loop.privacy.epsilon()} if loop.privacy is not None else {}))
        bar.update(loop.tokens, loss=f"{loss:.4f}")
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            losses, validated = validate(step), step
        if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
            save_checkpoint(run_dir, "step", step, weights_of(model), setup.model_config, {"loop": loop.state_dict()},
                            cfg.keep_checkpoints, final=step == cfg.steps)
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    metrics.close()
    if not losses:  # resumed without validating since: the summary's validation, not logged again
        losses, validated = validator(model, setup.device, cfg.dtype), loop.step
    return RunSummary("central", "step", loop.step, cfg.steps, validated, weighted_loss(losses, train_tokens),
                      {n: {"loss": loss} for n, loss in losses.items()}, loop.tokens, 0, 0, time.perf_counter() - t_start,
                      epsilon={"pooled": loop.privacy.epsilon()} if loop.privacy is not None else {}, delta=config.privacy.delta)
