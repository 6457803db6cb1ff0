"""Which settings every party of a federation must agree on, and which are each party's own.

On the flower runtime the aggregator is the one source of truth: it sends the shared settings (`shared_toml`) in
every message, and each SuperNode builds its config from them plus its own file's local keys only (`with_local`),
so a SuperNode file holding another `rounds` or learning rate changes nothing. Every top-level key of `Config` is
listed here, as shared or local; a new section is classified here (a test fails until it is).
"""

from __future__ import annotations

import dataclasses
import hashlib

from dgpt.config import Config, config_from_dict, dump_data, parse_toml
from dgpt.errors import DgptError

# every key of these sections is shared, except those LOCAL names
SHARED = ("seed", "model", "tokenizer", "oracles", "pretrain", "federation", "finetune", "ledger", "privacy", "secagg")
# a party's own: where its run directory is, how it prepares its text, its device, its logs, the paths it reads
# (a tokenizer recipe's files, the pre-trained run to fine-tune from, the aggregator's public key file: each
# machine has its own copy)
LOCAL: dict[str, tuple[str, ...] | None] = {
    "run_dir": None, "data": None, "log": None,
    "tokenizer": ("path", "counts"), "pretrain": ("device", "compile"), "finetune": ("init_from",),
    "ledger": ("public_key",),
}
# an oracle's data, read only by the party that holds it, and the path of its public key file on that party's machine
ORACLE_LOCAL = ("train", "valid", "text_field", "task", "public_key")


def unclassified() -> list[str]:
    """Top-level config keys that are neither shared nor local (each must be one or the other)."""
    return [f.name for f in dataclasses.fields(Config) if f.name not in SHARED and f.name not in LOCAL]


def shared_toml(config: Config) -> str:
    """The settings every party must agree on, as TOML (no paths, no party's data)."""
    data = dataclasses.asdict(config)
    for key, keys in LOCAL.items():
        if keys is None:
            data.pop(key)
        else:
            for name in keys:
                data[key].pop(name)
    for oracle in data["oracles"]:
        for name in ORACLE_LOCAL:
            oracle.pop(name)
    return dump_data(data)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_local(shared: str, local: Config, oracle: str) -> Config:
    """A party's config: the `shared` settings (TOML from the aggregator) with `local`'s own keys, and `oracle`'s data
    keys from its entry in `local` (if it declares one). Every shared key of `local` is ignored."""
    data = parse_toml(shared, "the server's settings")  # one line: not TOML, too large, nested too deeply
    if not isinstance(data.get("oracles"), list):
        raise DgptError("the server's settings declare no [[oracles]]")
    mine = dataclasses.asdict(local)
    for key, keys in LOCAL.items():
        if keys is None:
            data[key] = mine[key]
        elif isinstance(data.setdefault(key, {}), dict):
            data[key].update({name: mine[key][name] for name in keys})
    own = next((o for o in mine["oracles"] if o["name"] == oracle), None)
    for entry in data["oracles"]:
        if own is not None and isinstance(entry, dict) and entry.get("name") == oracle:
            entry.update({name: own[name] for name in ORACLE_LOCAL})
    return config_from_dict(_without_none(data), "the server's settings")


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value
