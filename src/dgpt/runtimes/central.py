"""The centralised baseline: one trainer on every oracle's training tokens pooled."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from dgpt.config import Config
from dgpt.data.loader import WindowSampler
from dgpt.rundir import RunDir
from dgpt.runtimes.setup import build_model, load_run
from dgpt.runtimes.summary import RunSummary
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint, load_state, load_weights_into, save_checkpoint, weights_of
from dgpt.train.evaluate import Validator, weighted_loss
from dgpt.train.local import InnerLoop
from dgpt.train.metrics import MetricsLog

logger = logging.getLogger(__name__)


def pretrain_central(config: Config, *, stop_after: int | None = None) -> RunSummary:
    """Train for config.pretrain.steps, resuming from the newest checkpoint; returns the run's summary."""
    setup = load_run(config)
    cfg, run_dir = config.pretrain, setup.run_dir
    model, forward = build_model(setup)
    n_ctx = setup.model_config.n_ctx
    pooled = [a for arrays in setup.train.values() for a in arrays]
    loop = InnerLoop(model, cfg, WindowSampler(pooled, n_ctx, config.seed, "pooled"), cfg.steps, setup.device, config.seed, forward)
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
    bar = tqdm(total=cfg.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
    t0, tokens0 = time.perf_counter(), loop.tokens
    for step in range(start + 1, cfg.steps + 1):
        loss = loop.train_step()
        tok_s = (loop.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
        if step % cfg.log_interval == 0 or step == cfg.steps:
            metrics.log(step=step, tokens=loop.tokens, kind="train", loss=loss, lr=loop.optimizer.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        bar.update()
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            losses, validated = validate(step), step
        if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
            save_checkpoint(run_dir, "step", step, weights_of(model), setup.model_config, {"loop": loop.state_dict()}, cfg.keep_checkpoints)
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    metrics.close()
    if not losses:  # resumed without validating since: the summary's validation, not logged again
        losses, validated = validator(model, setup.device, cfg.dtype), loop.step
    return RunSummary("central", "step", loop.step, cfg.steps, validated, weighted_loss(losses, train_tokens),
                      {n: {"loss": loss} for n, loss in losses.items()}, loop.tokens, 0, 0, time.perf_counter() - t_start)
