"""Typed run configuration: dataclasses filled from TOML, `--set section.key=value` overrides.

Every value has a default, so an empty file is a valid config. Unknown keys and values of the wrong
type, out of their range (`dgpt.config_ranges`) or not finite, and settings that cannot go together
(`dgpt.config_rules`), are errors that name the key. Relative paths are taken from the current directory.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dgpt.config_ranges import check_ranges
from dgpt.config_rules import check_combinations
from dgpt.errors import DgptError
from dgpt.rundir import check_oracle_name

AGGREGATOR = "aggregator"  # the aggregator's name among the parties that hold ledger keys


@dataclass
class ModelConfig:
    preset: Literal["tiny", "small", "gpt1"] = "tiny"  # the fields below override the preset when set
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    n_ctx: int | None = None
    ln: Literal["post", "pre"] | None = None  # "post" (GPT-1) | "pre" (GPT-2 style, final LayerNorm)
    activation: Literal["gelu_tanh", "gelu"] | None = None  # "gelu_tanh" (GPT-1) | "gelu"
    embd_dropout: float | None = None
    attn_dropout: float | None = None
    resid_dropout: float | None = None


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2
    path: str = ""  # an existing tokenizer.json to use instead of training one
    counts: list[str] = field(default_factory=list)  # train from these `dgpt count-pretokens` files, not from text
    train_bytes: int = 1 << 23  # train on about this much of each oracle's text, in evenly spread slices; 0: all


@dataclass
class DataConfig:
    doc_separator: Literal["blank_line", "line", "file"] = "blank_line"  # how a .txt file splits into documents
    min_chars: int = 0  # documents shorter than this (after cleaning) are dropped
    dedup: bool = True  # drop exact-duplicate documents (by hash) within an oracle
    shard_tokens: int = 1 << 24  # tokens per shard file
    batch_docs: int = 512  # at most this many documents (or segments of long ones) per parallel encode batch
    batch_bytes: int = 1 << 20  # and at most about this many bytes of text
    part_bytes: int = 1 << 23  # a larger text or JSONL file is cut between documents into parts of about this size
    workers: int = 0  # processes that read and encode the parts; 0: one per core, as free memory allows


@dataclass
class TaskConfig:
    """An oracle's labeled set C(O_j) for fine-tuning (`[oracles.task]`); docs/finetune.md has the field names."""

    type: Literal["classification", "entailment", "similarity", "multiple_choice"] = "classification"
    train: list[str] = field(default_factory=list)  # .jsonl files or hf:NAME[:CONFIG]:SPLIT
    valid: list[str] = field(default_factory=list)  # evaluated every federation.eval_interval rounds
    columns: dict[str, str] = field(default_factory=dict)  # standard field -> field in the data, e.g. {text = "sentence"}
    labels: list[str] = field(default_factory=list)  # the label set in output order; [] = sorted labels of train
    regression: bool = False  # a real-valued label: one output, squared error, Pearson/Spearman
    num_choices: int = 0  # multiple_choice: choices per example; 0 = as many as the first training row has


@dataclass
class OracleConfig:
    name: str = ""
    train: list[str] = field(default_factory=list)  # files, directories, globs, .jsonl, or hf:NAME[:CONFIG]:SPLIT
    valid: list[str] = field(default_factory=list)
    text_field: str = "text"  # the field read from JSONL lines and Hugging Face rows
    weight: float | None = None  # this oracle's weight under federation.mean_weights = "given"
    task: TaskConfig | None = None  # fine-tuning only: this oracle's labeled task
    public_key: str = ""  # the oracle's Ed25519 public key file (`dgpt keygen`); "": run_dir/keys/<name>.pub


@dataclass
class PretrainConfig:
    steps: int = 0  # optimizer steps of the centralised run; 0 = as many tokens as the federated run (runtimes.central)
    batch_size: int = 16  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2.5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear"] = "cosine"  # after the linear warmup: decay to min_lr
    weight_decay: float = 0.01  # decoupled, on weights of rank >= 2 only
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 200  # steps between validations of the central runtime (rounds: federation.eval_interval)
    eval_windows: int = 32  # validation windows per oracle
    log_interval: int = 10
    checkpoint_interval: int = 500  # steps between checkpoints of the central runtime (rounds: federation.checkpoint_interval)
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # bfloat16: autocast; auto: bfloat16 where the hardware has it
    compile: bool = False


@dataclass
class FederationConfig:
    runtime: Literal["central", "sim", "torchrun", "flower"] = "sim"  # central: the pooled baseline; flower: `flwr run`
    rounds: int = 10
    inner_steps: int = 500  # H: inner optimizer steps per oracle per round
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    extrapolation: Literal["none", "fedexp"] = "none"  # fedexp: lengthen the aggregated update when the oracles' updates disagree
    aggregator: Literal["mean", "median", "trimmed_mean", "geometric_median"] = "mean"
    mean_weights: Literal["tokens", "uniform", "given"] = "tokens"  # given: oracles[].weight
    trim_fraction: float = 0.2  # trimmed_mean: fraction cut from each end per coordinate
    bucket_size: int = 0  # robust rules: combine means of this many updates, dealt at random each round; 1 = off, 0 = 2 for median, else 1
    clip_norm: float = 0.0  # clip each pseudo-gradient to this L2 norm before aggregating; 0 = off
    max_weight_share: float = 1.0  # no oracle's weight in the mean above this share, whatever size it claims; 1 = off
    fedexp_max: float = 10.0  # the largest factor FedExP may apply to an update
    norm_filter: float = 0.0  # reject an update whose norm is over this multiple of the round's median norm; 0 = off
    min_cosine: float = -1.0  # reject an update whose cosine with the round's coordinate-wise median is below this; -1 = off
    compression: Literal["none", "bf16", "int8"] = "none"  # what travels: fp32 (none), bf16, or int8 + fp32 scales
    int8_block: int = 0  # int8 scale per block of this many values; 0 = one scale per tensor
    drop_prob: float = 0.0  # probability that an oracle misses a round (unreliable oracles)
    eval_interval: int = 1  # rounds between validations
    checkpoint_interval: int = 1  # rounds between round checkpoints (the last round is always kept)
    timeout_s: float = 1800.0  # torchrun: a rank silent this long is treated as dead
    min_oracles: int = 1  # flower: a round closes once every asked oracle replied, or after round_timeout_s with this many
    round_timeout_s: float = 600.0  # flower: how long a round waits for every asked oracle before late ones sit it out
    secure_aggregation: bool = False  # flower: Flower's SecAgg+ ([secagg]); the aggregator learns only the weighted mean


@dataclass
class FinetuneConfig:
    """DSFT: supervised fine-tuning of the shared body, one head per oracle (GPT-1's defaults)."""

    init_from: str = ""  # a DUPT run directory (newest checkpoint + tokenizer); "" = from scratch (needs tokenizer.path)
    lr: float = 6.25e-5
    batch_size: int = 32  # examples per optimizer step
    epochs: float = 3.0  # passes over the largest oracle's labeled set; sets the rounds when rounds = 0
    rounds: int = 0  # federated rounds; 0 = enough for `epochs`
    inner_steps: int = 50  # H: optimizer steps per oracle per round
    warmup: float = 0.002  # fraction of all steps with linear warmup; then linear decay to 0
    lambda_lm: float = 0.5  # L3 = L2 + lambda_lm * L1 (auxiliary LM loss on the same inputs); 0 = off
    classifier_dropout: float = 0.1  # dropout on the extract token's activation before the head
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # 0 disables clipping
    shared_head: bool = False  # one head aggregated like the body (every oracle must have the same task)
    max_len: int = 0  # tokens per input sequence; 0 = the model's n_ctx
    fresh_task_tokens: bool = True  # from a checkpoint: new random embeddings for <|pad|> <|start|> <|delim|> <|extract|> (GPT-1)
    eval_batch_size: int = 64


@dataclass
class LedgerConfig:
    """The contribution ledger (ledger.jsonl) every federated run keeps."""

    # shapley: coalitions evaluated on validation windows; first_order: each oracle's validation gradient at Theta
    # instead (one backward pass per oracle per round, coalitions valued by inner products); off: no values
    method: Literal["shapley", "first_order", "off"] = "shapley"
    exact_max: int = 6  # exact Shapley values up to this many accepted oracles in a round; sampled above
    permutations: int = 16  # joining orders sampled per round above exact_max
    public_key: str = ""  # the aggregator's Ed25519 public key file (`dgpt keygen`); "": run_dir/keys/aggregator.pub


@dataclass
class PrivacyConfig:
    """Example-level DP-SGD in every oracle's inner loop (dgpt.train.privacy); off while both are 0."""

    noise_multiplier: float = 0.0  # sigma: Gaussian noise std / max_grad_norm; 0 = from target_epsilon (or DP off)
    target_epsilon: float = 0.0  # epsilon each oracle may spend over the planned steps; sets sigma; 0 = use noise_multiplier
    max_grad_norm: float = 1.0  # each example's gradient clipped to this L2 norm before the noise
    delta: float = 1e-5  # the delta of (epsilon, delta)

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon > 0


@dataclass
class SecAggConfig:
    """Flower's SecAgg+ under `federation.secure_aggregation` (dgpt.runtimes.flower.secure): how each oracle's weighted
    update is quantised before it is masked, and how many oracles must stay for the masks to come off."""

    clipping_range: float = 1.0  # c: each coordinate of an oracle's weighted update is clipped to [-c, c]
    quantization_range: int = 1 << 24  # T: [-c, c] is quantised to the integers 0..T (stochastic rounding): step 2c/T
    modulus_range: int = 1 << 32  # M: the masks' modulus, a power of 2 above T x the oracles (so the sum cannot wrap)
    num_shares: float = 1.0  # each oracle's mask seeds are shared with this fraction of the round's oracles
    reconstruction_threshold: float = 0.67  # the fraction of those shares that unmasks it (> 0.5: see README, Privacy)


@dataclass
class LogConfig:
    tensorboard: bool = False  # also write every metrics.jsonl row as TensorBoard scalars to run_dir/tensorboard
    progress_interval_s: float = 30.0  # output not a terminal: seconds between one-line progress records (0: every step/round)


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 1337
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    oracles: list[OracleConfig] = field(default_factory=list)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def oracle_names(self) -> list[str]:
        return [o.name for o in self.oracles]


# --- building dataclasses from plain data ---------------------------------------------------------


def _check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise DgptError(f"{source}: '{key}' is {value!r}; expected one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check_value(value, inner[0], key, source)
    if origin is dict:
        if not isinstance(value, dict):
            raise DgptError(f"{source}: '{key}' must be a table, got {value!r}")
        _, item_tp = typing.get_args(tp)
        return {k: _check_value(v, item_tp, f"{key}.{k}", source) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise DgptError(f"{source}: '{key}' must be a list, got {value!r}")
        if dataclasses.is_dataclass(item_tp):
            return [_build(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return [_check_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise DgptError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise DgptError(f"{source}: '{key}' must be a finite number, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise DgptError(f"{source}: '{prefix}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise DgptError(f"{source}: unknown config key '{full}'")
        kwargs[key] = _check_value(value, hints[key], full, source)
    return cls(**kwargs)


MOST_CONFIG_BYTES = 1 << 20  # a config names its sources, it does not hold them: far more than any real one


class NotToml(DgptError):
    """Text the TOML parser refused (an override's value is then taken as a bare string)."""


def parse_toml(text: str, source: str) -> dict:
    """TOML text as a dict, or one DgptError line: not TOML, over MOST_CONFIG_BYTES, or nested deeper than the
    parser's recursion allows (tomllib recurses once per level of arrays and inline tables)."""
    if len(text) > MOST_CONFIG_BYTES:
        raise DgptError(f"{source}: {len(text):,} characters; a config is at most {MOST_CONFIG_BYTES:,}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise NotToml(f"{source}: not valid TOML: {e}") from None
    except RecursionError:
        raise DgptError(f"{source}: arrays or inline tables nested too deeply to read") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise DgptError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = parse_toml(f"v = {raw}", f"--set {text[:80]!r}")["v"]
    except NotToml:
        value = raw  # a bare word is a string
    return key.strip().split("."), value


def _apply_override(data: dict, path: list[str], value: Any, text: str) -> None:
    node: Any = data
    for part in path[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise DgptError(f"--set {text!r}: no list item {part!r}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    node[path[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (None: all defaults) and apply `section.key=value` overrides."""
    data: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DgptError(f"{p}: config file not found")
        if p.stat().st_size > MOST_CONFIG_BYTES:
            raise DgptError(f"{p}: {p.stat().st_size:,} bytes; a config is at most {MOST_CONFIG_BYTES:,}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DgptError(f"{p}: not valid TOML: {e}") from None
        data = parse_toml(text, str(p))
    for text in overrides:
        key_path, value = _parse_override(text)
        _apply_override(data, key_path, value, text)
    config = _build(Config, data, "", source)
    validate(config, source)
    return config


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    config = _build(Config, data, "", source)
    validate(config, source)
    return config


def validate(config: Config, source: str) -> None:
    """Oracle names, then every value's range (`dgpt.config_ranges`), then the settings that cannot go together
    (`dgpt.config_rules`)."""
    names = config.oracle_names()
    for i, name in enumerate(names):
        if not name:
            raise DgptError(f"{source}: oracles[{i}] has no name")
        check_oracle_name(name, f"{source}: oracles[{i}].name")
        if names.count(name) > 1:
            raise DgptError(f"{source}: oracle name '{name}' is used twice")
        if name == AGGREGATOR:
            raise DgptError(f"{source}: oracles[{i}].name '{name}' is the name of the ledger's aggregator key; choose another")
    check_ranges(config, source)
    check_combinations(config, source)


# --- writing the resolved config back as TOML -----------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_data(data: dict) -> str:
    """Plain config data (as `dataclasses.asdict` makes it) as TOML: top-level keys, then one table per section and
    one array of tables per list of tables, in the data's order; None values are left out."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, (dict, list))]
    for key, value in data.items():
        if isinstance(value, list):
            for item in value:
                lines += ["", f"[[{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in item.items() if v is not None)]
        elif isinstance(value, dict):
            lines += ["", f"[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)]
    return "\n".join(lines) + "\n"


def dump_config(config: Config) -> str:
    return dump_data(dataclasses.asdict(config))
