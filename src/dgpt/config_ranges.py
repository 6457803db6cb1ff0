"""The range of every numeric config value, checked when a config is read (`dgpt.config.validate`).

A value out of its range is one line naming the key, e.g. `c.toml: 'pretrain.lr' must be > 0, got -1.0`.
Types, `Literal` options and finiteness are checked before, by `dgpt.config._check_value`.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from dgpt.data.special_tokens import SMALLEST_VOCAB
from dgpt.errors import DgptError
from dgpt.model.config import resolve_config
from dgpt.model.memory import check_weights_fit

Rule = tuple[Callable[[Any], bool], str]

AT_LEAST_0: Rule = (lambda v: v >= 0, ">= 0")
AT_LEAST_1: Rule = (lambda v: v >= 1, ">= 1")
POSITIVE: Rule = (lambda v: v > 0, "> 0")
FRACTION: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_SHAPLEY_EXACT_MAX = 16  # 2^16 coalitions a round is already far more validation than training
MOST_STEPS = 10**10  # micro-batches of one run: over 100 days at a millisecond each
MOST_SECONDS = 10**7  # a timeout beyond 100 days is a typo (and overflows the timedelta it becomes)

# "section.key" (or "oracles[].key", "oracles[].task.key" for every oracle) -> rule
RANGES: dict[str, Rule] = {
    "run_dir": (lambda v: v.strip() != "", "a directory name"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    **{f"model.{k}": AT_LEAST_1 for k in ("n_layer", "n_head", "d_model", "d_ff", "n_ctx")},
    **{f"model.{k}": FRACTION for k in ("embd_dropout", "attn_dropout", "resid_dropout")},
    "tokenizer.min_frequency": AT_LEAST_1,
    "tokenizer.train_bytes": AT_LEAST_0,
    "data.min_chars": AT_LEAST_0,
    "data.shard_tokens": AT_LEAST_1,
    "data.batch_docs": AT_LEAST_1,
    "data.batch_bytes": AT_LEAST_1,
    "data.part_bytes": AT_LEAST_1,
    "data.workers": AT_LEAST_0,
    "oracles[].weight": AT_LEAST_0,
    "oracles[].task.num_choices": (lambda v: v == 0 or v >= 2, "0 (from the data) or >= 2"),
    "pretrain.steps": AT_LEAST_0,  # 0: derived from [federation] (runtimes.central)
    **{f"pretrain.{k}": AT_LEAST_1 for k in ("batch_size", "grad_accum", "eval_interval", "eval_windows",
                                            "log_interval", "checkpoint_interval", "keep_checkpoints")},
    "pretrain.lr": POSITIVE,
    **{f"pretrain.{k}": AT_LEAST_0 for k in ("min_lr", "warmup_steps", "weight_decay", "grad_clip")},
    **{f"pretrain.{k}": FRACTION for k in ("beta1", "beta2")},
    "pretrain.device": (lambda v: _DEVICE.fullmatch(v) is not None, "auto, cpu, cuda or cuda:N"),
    **{f"federation.{k}": AT_LEAST_1 for k in ("rounds", "inner_steps", "eval_interval", "checkpoint_interval")},
    "federation.outer_lr": POSITIVE,
    "federation.outer_momentum": FRACTION,
    "federation.trim_fraction": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "federation.clip_norm": AT_LEAST_0,
    "federation.bucket_size": AT_LEAST_0,
    "federation.int8_block": AT_LEAST_0,
    "federation.drop_prob": FRACTION,
    "federation.timeout_s": (lambda v: 0 < v <= MOST_SECONDS, f"in (0, {MOST_SECONDS:.0e}] seconds"),
    "federation.min_oracles": AT_LEAST_1,  # at most the oracles declared: dgpt.config_rules
    "federation.round_timeout_s": (lambda v: 0 < v <= MOST_SECONDS, f"in (0, {MOST_SECONDS:.0e}] seconds"),
    "federation.max_weight_share": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "federation.fedexp_max": AT_LEAST_1,
    "federation.norm_filter": (lambda v: v == 0 or v >= 1, "0 (off) or >= 1"),
    "federation.min_cosine": (lambda v: -1 <= v < 1, "in [-1, 1) (-1: off)"),
    **{f"finetune.{k}": POSITIVE for k in ("lr", "epochs")},
    **{f"finetune.{k}": AT_LEAST_1 for k in ("batch_size", "inner_steps", "eval_batch_size")},
    **{f"finetune.{k}": AT_LEAST_0 for k in ("rounds", "lambda_lm", "weight_decay", "grad_clip")},
    **{f"finetune.{k}": FRACTION for k in ("warmup", "classifier_dropout", "beta1", "beta2")},
    "finetune.max_len": (lambda v: v == 0 or v >= 4, "0 (the model's n_ctx) or >= 4"),
    "ledger.exact_max": (lambda v: 1 <= v <= _SHAPLEY_EXACT_MAX, f"in [1, {_SHAPLEY_EXACT_MAX}]"),
    "ledger.permutations": (lambda v: v >= 2, ">= 2"),
    **{f"privacy.{k}": AT_LEAST_0 for k in ("noise_multiplier", "target_epsilon")},
    "privacy.max_grad_norm": POSITIVE,
    "privacy.delta": (lambda v: 0 < v < 1, "in (0, 1)"),
    "secagg.clipping_range": POSITIVE,
    "secagg.quantization_range": (lambda v: 2 <= v < 2**31, "in [2, 2**31) (quantised values are int32)"),
    "secagg.modulus_range": (lambda v: 2 <= v <= 2**32 and v & (v - 1) == 0, "a power of 2 up to 2**32"),
    **{f"secagg.{k}": (lambda v: 0 < v <= 1, "a fraction in (0, 1]") for k in ("num_shares", "reconstruction_threshold")},
    "log.progress_interval_s": AT_LEAST_0,
}


def _values(config: Any, key: str) -> list[tuple[str, Any]]:
    """(full key, value) for a RANGES key; one per oracle for `oracles[]` keys; unset (None) values left out."""
    if key.startswith("oracles[]."):
        found = []
        for i, oracle in enumerate(config.oracles):
            found += [(f"oracles[{i}].{k}", v) for k, v in _values(oracle, key[len("oracles[]."):])]
        return found
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part, None) if node is not None else None
    return [(key, node)] if node is not None else []


def check_ranges(config: Any, source: str) -> None:
    """Every value of RANGES within its range, the vocabulary large enough and the model's shape consistent."""
    for key, (ok, what) in RANGES.items():
        for full, value in _values(config, key):
            if not ok(value):
                raise DgptError(f"{source}: '{full}' must be {what}, got {value!r}")
    if config.tokenizer.vocab_size < SMALLEST_VOCAB:
        raise DgptError(f"{source}: 'tokenizer.vocab_size' must be >= {SMALLEST_VOCAB} (256 bytes + special tokens), "
                        f"got {config.tokenizer.vocab_size}")
    _check_steps(config, source)
    try:
        model = resolve_config(config.model, config.tokenizer.vocab_size)
    except ValueError as e:
        raise DgptError(f"{source}: [model]: {e}") from None
    check_weights_fit(model, f"{source}: [model]")


def _check_steps(config: Any, source: str) -> None:
    """No schedule longer than any run can take: a count that large is a typo, and would only be found out by
    a run that never ends."""
    fed, ft, accum = config.federation, config.finetune, config.pretrain.grad_accum
    for keys, steps in ((("pretrain.steps", "pretrain.grad_accum"), config.pretrain.steps * accum),
                        (("federation.rounds", "federation.inner_steps", "pretrain.grad_accum"),
                         fed.rounds * fed.inner_steps * accum),
                        (("finetune.rounds", "finetune.inner_steps"), ft.rounds * ft.inner_steps),
                        (("finetune.epochs",), ft.epochs)):
        if steps > MOST_STEPS:
            raise DgptError(f"{source}: {' x '.join(repr(k) for k in keys)} = {steps:.3g}: a run of more than "
                            f"{MOST_STEPS:.0e} micro-batches would take over 100 days at a millisecond each")
