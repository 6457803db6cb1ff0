"""One trainer's inner loop: optimizer, schedule, clipping, accumulation, autocast.

The same loop serves the centralised baseline (one loop over pooled data) and each oracle in a
federated round (one loop per oracle over its own shards, its state kept across rounds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from dgpt.config import PretrainConfig, PrivacyConfig
from dgpt.data.loader import WindowSampler
from dgpt.errors import DgptError
from dgpt.model.config import GPTConfig
from dgpt.model.memory import check_training_fits, physical_memory
from dgpt.objectives import lm_loss
from dgpt.train.privacy import PrivateGradients

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """How one trainer optimizes: optimizer, learning-rate schedule, batch, clipping and autocast dtype.

    Pre-training takes them from [pretrain] (`LoopSettings.of`); fine-tuning builds its own from [finetune].
    """

    lr: float
    batch_size: int
    optimizer: str = "adamw"  # adamw | sgd
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    grad_accum: int = 1
    dtype: str = "auto"  # auto | float32 | bfloat16 (autocast)

    @classmethod
    def of(cls, cfg: PretrainConfig) -> LoopSettings:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when there is one), or the device named, refused in one line when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DgptError(f"device {name!r}: not a device (expected auto, cpu, cuda or cuda:N)") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise DgptError(f"device {name!r} is not available: torch sees {count} CUDA device(s) "
                        "(set pretrain.device or --device to auto or cpu)")
    return device


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """The memory a model on `device` can use, in bytes, and the words that name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"memory on {device}"
    return physical_memory(), "physical memory on this machine"


def check_training_memory(model: GPTConfig, device: torch.device, batch_key: str, batch: int, tokens: int,
                          trainers: int, private: bool) -> None:
    """Refuse, before anything is built, training that cannot fit `device` (`dgpt.model.memory`); `trainers`
    optimizer states stay in this process (a sim run's idle oracles' states are parked in CPU memory);
    `private`: DP-SGD."""
    limit, where = device_memory(device)
    states = trainers if device.type == "cpu" else 1
    check_training_fits(model, batch, tokens, states, limit, where, f"{batch_key} {batch:,}", private)


@functools.lru_cache(maxsize=None)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), ()))


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 matrices in hardware (not emulated), and what says so."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} has bf16"
        return False, f"{name} has no native bf16"
    found = sorted({"avx512_bf16", "amx_bf16"} & cpu_flags()) if device.type == "cpu" else []
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, f"no bf16 matrix unit found on {device.type} (CPU flags avx512_bf16 / amx_bf16, or a bf16 GPU)"


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto`: bfloat16 (autocast) where the hardware multiplies bf16 natively, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device)[0] else "float32"


def describe_dtype(dtype: str, device: torch.device) -> str:
    """One line for the start of a run: the dtype it trains in, and why when it was `auto`."""
    if dtype != "auto":
        return f"dtype: {dtype} (as configured)"
    native, why = native_bf16(device)
    return f"dtype auto: {'bfloat16 autocast' if native else 'float32'} on {device} ({why})"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast when asked for (or `auto` picks it); a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_dtype(dtype, device) == "bfloat16")


def make_optimizer(model: nn.Module, cfg: LoopSettings) -> torch.optim.Optimizer:
    """AdamW (or SGD) with weight decay on matrices only: biases, gains and nothing of rank < 2 decays."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    # fused: one kernel per parameter for the whole update (CPU and CUDA), not one pass per arithmetic op
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)


@dataclass(frozen=True)
class Rewarm:
    """Where a run whose schedule was re-planned (its planned end moved: rounds or steps raised) took it up again:
    from step `step` the LR climbs linearly from `lr`, where it stood, to `peak` over `warmup` steps, then decays to
    min_lr at the new end. A finished run stood at min_lr."""

    step: int
    lr: float
    peak: float
    warmup: int

    @classmethod
    def at(cls, step: int, cfg: LoopSettings, old_total: int, old: Rewarm | None, new_total: int) -> Rewarm:
        """The re-plan from `step` of the schedule ending at `old_total` to one ending at `new_total`: an extension
        warms back up to cfg.lr; a shortened schedule holds the LR where it stood through the warmup, then decays. The
        warmup takes at most half of what is left, so that a short extension still ends at min_lr."""
        lr = lr_at(step, cfg, old_total, old)
        return cls(step, lr, cfg.lr if new_total > old_total else lr, min(cfg.warmup_steps, (new_total - step) // 2))


def lr_at(step: int, cfg: LoopSettings, total_steps: int, rewarm: Rewarm | None = None) -> float:
    """Linear warmup to cfg.lr, then cosine (or, with schedule = "linear", linear) decay to cfg.min_lr at total_steps;
    after a re-plan (`rewarm`) the warmup starts from the LR where the run stood and the decay from its peak."""
    start, low, peak, warmup = (0, 0.0, cfg.lr, cfg.warmup_steps) if rewarm is None else dataclasses.astuple(rewarm)
    step, total_steps = step - start, total_steps - start
    if step < warmup:
        return low + (peak - low) * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if cfg.schedule == "linear":
        return cfg.min_lr + (peak - cfg.min_lr) * (1.0 - progress)
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Park an idle oracle's optimizer state off the accelerator (or bring it back)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)


class InnerLoop:
    """Optimizer steps on one stream of batches; owns its dropout RNG so that trainers interleave exactly.

    `sampler.sample(batch_size)` gives a tuple of tensors; `objective(*batch)` returns (loss, tokens in the
    batch). The default objective is L1 on (inputs, targets) windows through `forward(inputs, targets)`.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: LoopSettings,
        sampler: WindowSampler,
        total_steps: int,
        device: torch.device,
        seed: int,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        objective: Callable[..., tuple[torch.Tensor, int]] | None = None,
    ):
        self.model, self.cfg, self.sampler = model, cfg, sampler
        self.total_steps, self.device = total_steps, device
        self.forward = forward if forward is not None else model
        self.objective = objective or (lambda x, y: (self.forward(x, y), y.numel()))
        self.step = 0
        self.tokens = 0
        self.privacy: PrivateGradients | None = None  # DP-SGD (make_private); None: the plain step, at no cost
        self.rewarm: Rewarm | None = None  # set when a resumed run's planned end (total_steps) moved
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rng_state = torch.get_rng_state()

    @functools.cached_property
    def optimizer(self) -> torch.optim.Optimizer:
        """Built on first use: a process that only validates (a SuperNode answering an evaluation message) never
        pays for it, and torch.optim's first optimizer imports torch's compiler stack (~2 s)."""
        return make_optimizer(self.model, self.cfg)

    @contextlib.contextmanager
    def _own_rng(self):
        with torch.random.fork_rng(devices=[device for device in [self.device] if device.type == "cuda"]):
            torch.set_rng_state(self.rng_state)
            yield
            self.rng_state = torch.get_rng_state()

    def batch_size_at(self, step: int) -> int:
        """Samples per micro-batch at `step`."""
        return self.cfg.batch_size

    def make_private(self, cfg: PrivacyConfig, name: str) -> None:
        """Train with DP-SGD from now on: Poisson batches of batch_size x grad_accum expected examples; with
        target_epsilon, the noise that spends it over the loop's total_steps."""
        expected = self.cfg.batch_size * self.cfg.grad_accum
        self.privacy = PrivateGradients.plan(cfg, self.sampler.num_examples, expected, self.total_steps, name)

    def example_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The objective's loss without the token count, as DP-SGD's per-example gradients call it (under vmap: plain
        logits and cross-entropy, not the fused LM-head loss, whose autograd Function vmap cannot batch)."""
        return lm_loss(self.model(inputs), targets)

    def batch_tokens(self, inputs: torch.Tensor, targets: torch.Tensor) -> int:
        return targets.numel()

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches (DP: one Poisson batch); returns the mean training loss."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.total_steps, self.rewarm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with self._own_rng():
            loss = self._gradients() if self.privacy is None else self._private_gradients()
        if cfg.grad_clip > 0 and self.privacy is None:  # DP-SGD clipped each example's gradient already
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    def _gradients(self) -> float:
        cfg, total = self.cfg, 0.0
        for _ in range(cfg.grad_accum):
            batch = [t.to(self.device, non_blocking=True) for t in self.sampler.sample(self.batch_size_at(self.step))]
            with autocast(self.device, cfg.dtype):
                loss, tokens = self.objective(*batch)
            (loss / cfg.grad_accum).backward()
            total += loss.item()
            self.tokens += tokens
        return total / cfg.grad_accum

    def _private_gradients(self) -> float:
        batch = self.sampler.poisson(self.privacy.mechanism.sample_rate)
        if batch is not None:
            batch = [t.to(self.device, non_blocking=True) for t in batch]
            self.tokens += self.batch_tokens(*batch)
        with autocast(self.device, self.cfg.dtype):
            return self.privacy.gradients(self.model, self.example_loss, batch, self.cfg.batch_size)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "sampler": self.sampler.state_dict(),
            "rng": self.rng_state,
            **({"privacy": self.privacy.state_dict()} if self.privacy is not None else {}),
            "schedule": {"total_steps": self.total_steps, "rewarm": dataclasses.astuple(self.rewarm) if self.rewarm else None},
        }

    def load_state_dict(self, state: dict, position: int | None = None) -> None:
        """Resume; if the run's planned end moved since `state` was saved, re-plan the schedule from `position`, the
        step where the run stands (default: the state's), or the old end if that came first (a finished run)."""
        if ("privacy" in state) != (self.privacy is not None):
            raise DgptError("the run was trained " + ("with" if "privacy" in state else "without")
                            + " [privacy] and would resume " + ("without" if "privacy" in state else "with")
                            + " it: its accountant would not cover every step; resume with the [privacy] it had")
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.sampler.load_state_dict(state["sampler"])
        self.rng_state = state["rng"]
        saved = state.get("schedule", {"total_steps": self.total_steps, "rewarm": None})  # older states: the same end
        old = Rewarm(*saved["rewarm"]) if saved["rewarm"] else None
        if saved["total_steps"] == self.total_steps:
            self.rewarm = old
        else:
            at = min(saved["total_steps"], self.step if position is None else position)
            self.rewarm = Rewarm.at(at, self.cfg, saved["total_steps"], old, self.total_steps)
            logger.info(f"learning-rate schedule re-planned from {saved['total_steps']:,} to {self.total_steps:,} "
                        f"steps: from step {at:,} the LR goes from {self.rewarm.lr:.3g} to {self.rewarm.peak:.3g} over "
                        f"{self.rewarm.warmup} steps, then to {self.cfg.min_lr:.3g} at the new end")
