"""Settings that cannot go together, checked when a config is read (`dgpt.config.validate`), after each value's
type and range: one line naming the keys and why."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dgpt.errors import DgptError

if TYPE_CHECKING:
    from dgpt.config import Config


def check_combinations(config: Config, source: str) -> None:
    if config.tokenizer.path and config.tokenizer.counts:
        raise DgptError(f"{source}: set one of 'tokenizer.path' (a ready tokenizer) and 'tokenizer.counts' (train from counts)")
    names = config.oracle_names()
    if config.federation.min_oracles > max(len(names), 1):
        raise DgptError(f"{source}: 'federation.min_oracles' must be at most the {len(names)} oracles declared, "
                        f"got {config.federation.min_oracles}")
    _check_secure(config, source)
    if config.federation.runtime == "flower" and config.ledger.method == "first_order":
        raise DgptError(f"{source}: ledger.method = 'first_order' needs the oracles' validation gradients, which the "
                        "flower runtime does not carry; use 'shapley' or 'off'")
    if config.privacy.noise_multiplier > 0 and config.privacy.target_epsilon > 0:
        raise DgptError(f"{source}: set one of 'privacy.noise_multiplier' and 'privacy.target_epsilon' (the noise follows "
                        "from the target), not both")
    if config.federation.mean_weights == "given":
        missing = [o.name for o in config.oracles if o.weight is None]
        if missing:
            raise DgptError(f"{source}: mean_weights = 'given' but oracle(s) {', '.join(missing)} have no weight")
    _check_tasks(config, source)


def _check_secure(config: Config, source: str) -> None:
    """Secure aggregation gives the aggregator only the weighted mean of a round's updates: every setting that needs
    an oracle's own update is refused, with why."""
    fed, sa = config.federation, config.secagg
    if not fed.secure_aggregation:
        return
    if fed.runtime != "flower":
        raise DgptError(f"{source}: 'federation.secure_aggregation' is Flower's SecAgg+: set federation.runtime = 'flower' "
                        f"(got {fed.runtime!r})")
    if len(config.oracles) < 2:
        raise DgptError(f"{source}: 'federation.secure_aggregation' needs at least 2 oracles: the sum of one update is that update")
    single = {  # key -> (its value, the value that needs no single update, what the setting does with single updates)
        "federation.aggregator": (fed.aggregator, "mean", "a robust rule ranks or trims single updates"),
        "federation.norm_filter": (fed.norm_filter, 0.0, "the norm filter compares single updates' norms"),
        "federation.min_cosine": (fed.min_cosine, -1.0, "the cosine filter compares single updates' directions"),
        "federation.clip_norm": (fed.clip_norm, 0.0, "the server clips single updates"),
        "federation.extrapolation": (fed.extrapolation, "none", "FedExP reads single updates' norms"),
        "federation.compression": (fed.compression, "none", "SecAgg+ quantises each update itself ([secagg])"),
        "ledger.method": (config.ledger.method, "off", "the ledger values each oracle by its own update"),
    }
    for key, (value, needed, why) in single.items():
        if value != needed:
            raise DgptError(f"{source}: '{key}' = {value!r} cannot go with federation.secure_aggregation, which shows the "
                            f"aggregator only the weighted mean of the updates ({why}); set it to {needed!r}")
    if sa.modulus_range <= len(config.oracles) * sa.quantization_range:
        raise DgptError(f"{source}: 'secagg.modulus_range' {sa.modulus_range} must exceed the {len(config.oracles)} oracles x "
                        f"'secagg.quantization_range' {sa.quantization_range}, or the masked sum wraps around")


def _check_tasks(config: Config, source: str) -> None:
    for oracle in config.oracles:
        task, where = oracle.task, f"{source}: oracle '{oracle.name}' task"
        if task is None:
            continue
        if task.regression and (task.type == "multiple_choice" or task.labels):
            raise DgptError(f"{where}: regression needs a non-multiple-choice type and no labels")
    if config.finetune.shared_head:
        kinds = {(t.type, t.regression, tuple(t.labels), t.num_choices) if t else None for t in (o.task for o in config.oracles)}
        kind = kinds.pop() if len(kinds) == 1 else None
        if kind is None or (kind[0] != "multiple_choice" and not kind[1] and not kind[2]):
            raise DgptError(
                f"{source}: finetune.shared_head needs every oracle to have the same task type, regression, "
                "num_choices and an explicit, identical labels list"
            )
