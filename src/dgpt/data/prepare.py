"""`dgpt prepare`: train (or reuse) the tokenizer, then write each oracle's token shards and manifest.

Everything streams, so memory stays flat in corpus size and in document size (the dedup set holds 16
bytes per unique document; tokenizer training holds the pre-token counts): documents are cleaned and
filtered in parts (`dgpt.data.documents`), cut into segments that encode as the whole (`segments`) and
encoded in batches of at most `batch_docs` segments and `batch_bytes` bytes, straight into numpy arrays,
by worker processes that each take a part of a split (`dgpt.data.parts`). The tokenizer is trained on a
sample of each oracle's text (`tokenizer.train_bytes`). Fingerprints of the inputs (path, size, mtime) and
settings let a re-run reuse a tokenizer and shards that are still valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from dgpt.config import Config, DataConfig, OracleConfig
from dgpt.data.clean import DocumentFilter
from dgpt.data.documents import kept_parts
from dgpt.data.parts import encoded_parts, merge, sample_parts, split_parts, worker_count
from dgpt.data.shards import FORMAT_VERSION, ShardWriter, dtype_for_vocab, load_split, read_manifest
from dgpt.data.sources import input_files
from dgpt.data.pretokens import merge_counts, write_counts
from dgpt.data.tokenizer import SEGMENT_CHARS, TextTokenizer, count_pretokens, segments
from dgpt.errors import DgptError
from dgpt.fileio import atomic_dir, parse_json, sha256_file, write_json
from dgpt.rundir import MANIFEST, RunDir

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid")


def prepare(config: Config, *, oracles: list[str] | None = None) -> dict[str, dict]:
    """Prepare the shards of `oracles` (default: every oracle) in the run's data folder; return their
    stats by oracle name. Preparing only some oracles (a machine that holds only those) needs a tokenizer
    that does not depend on the others' text: `tokenizer.path` or `tokenizer.counts`."""
    if not config.oracles:
        raise DgptError("the config lists no oracles")
    chosen = _chosen_oracles(config, oracles)
    for oracle in chosen:
        if not oracle.train:
            raise DgptError(f"oracle '{oracle.name}' has no train source")
    run = RunDir(config.run_dir)
    tokenizer = _get_tokenizer(config, run, every_oracle=len(chosen) == len(config.oracles))
    return _write_shards(chosen, config.data, tokenizer, dtype_for_vocab(tokenizer.vocab_size), run)


def count_oracle_pretokens(config: Config, oracle: str, out: Path, min_count: int = 1) -> str:
    """Write one oracle's pre-token count file (what it shares for the tokenizer); return a summary line."""
    (chosen,) = _chosen_oracles(config, [oracle])
    keep = _new_filter(config.data)
    counts = count_pretokens(_texts(chosen, config, keep))
    if not counts:
        raise DgptError(f"oracle '{oracle}': no training text to count (every document was empty, too short or a duplicate)")
    kept = write_counts(out, oracle, counts, keep.kept, _counted(config), min_count)
    return (f"{oracle}: {sum(counts.values())} pre-tokens ({len(counts)} distinct) in {keep.kept} documents; "
            f"{kept} distinct written to {out}" + (f" (those seen >= {min_count} times)" if min_count > 1 else ""))


def _chosen_oracles(config: Config, names: list[str] | None) -> list[OracleConfig]:
    if not names:
        return list(config.oracles)
    known = {o.name: o for o in config.oracles}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DgptError(f"oracle(s) {', '.join(map(repr, unknown))} not in the config (it has {', '.join(known)})")
    return [known[n] for n in dict.fromkeys(names)]


def _texts(oracle: OracleConfig, config: Config, keep: DocumentFilter) -> Iterator[str]:
    """An oracle's training text (its sample of `tokenizer.train_bytes`) in segments, for counting or training
    the tokenizer."""
    parts, sampled, total = sample_parts(oracle, config.data, config.tokenizer.train_bytes)
    if sampled < total:
        logger.info(f"tokenizer: {oracle.name}: {sampled / 1e6:.1f} MB of its {total / 1e6:.1f} MB of training text, "
                    f"in {len(parts)} slices (tokenizer.train_bytes)")
    documents = (doc for part in parts for doc in kept_parts(part.documents(oracle, config.data), keep))
    return (text for text, _ in segments(documents, SEGMENT_CHARS))


def _new_filter(data: DataConfig) -> DocumentFilter:
    return DocumentFilter(data.min_chars, data.dedup)


def _inputs(oracle: OracleConfig, split: str) -> list:
    """What identifies a split's input: each spec and, for files, their path, size and mtime."""
    out = []
    for spec in getattr(oracle, split):
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in input_files(spec)]
        out.append({"spec": spec, "files": stats})
    return out


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _cleaning(data: DataConfig) -> dict:
    return {"doc_separator": data.doc_separator, "min_chars": data.min_chars, "dedup": data.dedup}


def _counted(config: Config) -> dict:
    """What a pre-token count file records of how its text was chosen, and merging checks: the cleaning and the sample."""
    return {**_cleaning(config.data), "tokenizer.train_bytes": config.tokenizer.train_bytes}


# --- the tokenizer ---------------------------------------------------------------------------------


def _get_tokenizer(config: Config, run: RunDir, every_oracle: bool) -> TextTokenizer:
    """The run's tokenizer: the one at `tokenizer.path`, or BPE trained on pre-token counts: those in the
    `tokenizer.counts` files, or those of every oracle's text (only when every oracle is prepared here)."""
    target, fingerprint_path = run.tokenizer, run.tokenizer_fingerprint
    settings = config.tokenizer
    if settings.path:
        tokenizer = TextTokenizer.load(settings.path)
        fingerprint_path.unlink(missing_ok=True)  # the run's tokenizer is no longer one we trained
        if not target.is_file() or TextTokenizer.load(target).sha256 != tokenizer.sha256:
            tokenizer.save(target)
        whole = "" if tokenizer.encodes_in_segments else "; it does not split like GPT-2, so each document is encoded whole"
        logger.info(f"tokenizer: using {settings.path} ({tokenizer.vocab_size} tokens{whole})")
        return tokenizer
    if not settings.counts and not every_oracle:
        raise DgptError("preparing only some oracles needs a tokenizer that every machine builds alike: set "
                        "tokenizer.counts (every oracle's `dgpt count-pretokens` file) or tokenizer.path")

    source = ({"counts": [sha256_file(p) if Path(p).is_file() else p for p in settings.counts]} if settings.counts else
              {"oracles": [{"name": o.name, "text_field": o.text_field, "train": _inputs(o, "train")} for o in config.oracles]})
    fingerprint = _digest({**source, "cleaning": _cleaning(config.data), "vocab_size": settings.vocab_size,
                           "min_frequency": settings.min_frequency, "train_bytes": settings.train_bytes})
    if target.is_file() and _read_json(fingerprint_path).get("inputs") == fingerprint:
        tokenizer = TextTokenizer.load(target)
        if _read_json(fingerprint_path).get("tokenizer_sha256") == tokenizer.sha256:
            logger.info(f"tokenizer: reused {target} ({tokenizer.vocab_size} tokens; inputs unchanged)")
            return tokenizer

    fingerprint_path.unlink(missing_ok=True)
    if settings.counts:
        counts, names = merge_counts(settings.counts, _counted(config))
        origin = f"the pre-token counts of {', '.join(names)}"
        tokenizer = TextTokenizer.train_from_counts(counts, settings.vocab_size, settings.min_frequency)
    else:  # the same counts, made here by the trainer from every oracle's text
        filters = {o.name: _new_filter(config.data) for o in config.oracles}
        texts = (text for o in config.oracles for text in _texts(o, config, filters[o.name]))
        tokenizer = TextTokenizer.train(texts, settings.vocab_size, settings.min_frequency)
        origin = f"{sum(f.kept for f in filters.values())} training documents"
    tokenizer.save(target)
    write_json(fingerprint_path, {"inputs": fingerprint, "tokenizer_sha256": tokenizer.sha256})
    logger.info(f"tokenizer: trained {tokenizer.vocab_size} tokens on {origin} -> {target}")
    return tokenizer


def _read_json(path: Path) -> dict:
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- the shards --------------------------------------------------------------------------------------


def _write_shards(chosen: list[OracleConfig], data: DataConfig, tokenizer: TextTokenizer, dtype: np.dtype, run: RunDir) -> dict[str, dict]:
    """Each oracle's shards and manifest, reused where its inputs are unchanged and its shards verify; every
    other oracle's parts encoded together, by one pool of processes (`dgpt.data.parts`)."""
    fingerprints = {o.name: _fingerprint(o, data, tokenizer) for o in chosen}
    manifests = {o.name: _reusable(run.oracle_data(o.name), fingerprints[o.name], tokenizer.sha256) for o in chosen}
    todo = [o for o in chosen if manifests[o.name] is None]
    if todo:
        manifests.update(_write_oracles(todo, data, tokenizer, dtype, run, fingerprints))
    return {o.name: _report(o.name, manifests[o.name], reused=o not in todo) for o in chosen}


def _fingerprint(oracle: OracleConfig, data: DataConfig, tokenizer: TextTokenizer) -> str:
    return _digest({
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer.sha256,
        "text_field": oracle.text_field,
        "inputs": {split: _inputs(oracle, split) for split in SPLITS},
        "cleaning": _cleaning(data),
        "shard_tokens": data.shard_tokens,
    })


def _write_oracles(todo: list[OracleConfig], data: DataConfig, tokenizer: TextTokenizer, dtype: np.dtype, run: RunDir,
                   fingerprints: dict[str, str]) -> dict[str, dict]:
    parts = {(o.name, split): split_parts(o, split, data) for o in todo for split in SPLITS}
    every = [part for group in parts.values() for part in group]
    workers = worker_count(data.workers, every)
    # asked here, so that the workers get the checked encoder (or its absence) with the tokenizer
    encoder = "tiktoken" if tokenizer.fast is not None else "tokenizers"
    logger.info(f"encoding {len(every)} parts with {encoder} in {f'{workers} processes' if workers > 1 else 'this process'}")
    manifests = {}
    with ExitStack() as stack:  # the old directories stay valid until every new one is complete
        tmp = {o.name: stack.enter_context(atomic_dir(run.oracle_data(o.name))) for o in todo}
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".parts.", suffix=".tmp", dir=run.oracle_data(todo[0].name).parent)))
        encoded = iter(stack.enter_context(encoded_parts(every, workers, (tokenizer, data, dtype, {o.name: o for o in todo}, scratch))))
        for oracle in todo:
            splits = {}
            for split in SPLITS:
                group = parts[oracle.name, split]
                with ShardWriter(tmp[oracle.name], split, dtype, data.shard_tokens) as writer:
                    done = tqdm(islice(encoded, len(group)), total=len(group), desc=f"{oracle.name} {split}", unit=" parts", disable=None, leave=False)
                    stats = merge(done, writer)
                    splits[split] = {"shards": writer.close(), **stats}
            if splits["train"]["tokens"] == 0:
                raise DgptError(f"oracle '{oracle.name}': the training split yields zero tokens "
                                "(every document was empty, too short or a duplicate)")
            manifests[oracle.name] = {
                "format_version": FORMAT_VERSION,
                "oracle": oracle.name,
                "dtype": dtype.name,
                "vocab_size": tokenizer.vocab_size,
                "tokenizer_sha256": tokenizer.sha256,
                "fingerprint": fingerprints[oracle.name],
                "splits": splits,
            }
            write_json(tmp[oracle.name] / MANIFEST, manifests[oracle.name])  # last: a directory without it is incomplete
    return manifests


def _report(name: str, manifest: dict, reused: bool) -> dict:
    stats = {split: {k: v for k, v in manifest["splits"][split].items() if k != "shards"} for split in SPLITS}
    parts = [
        f"{split} {s['documents']} docs, {s['tokens']} tokens, {s['duplicates']} duplicates removed, "
        f"{s['bytes_per_token']:.2f} bytes/token"
        for split, s in stats.items()
    ]
    logger.info(f"{name}: {'; '.join(parts)}{' (reused: inputs unchanged, shards verified)' if reused else ''}")
    return {**stats, "reused": reused}


def _reusable(out: Path, fingerprint: str, tokenizer_sha256: str) -> dict | None:
    """The existing manifest if it was made from the same inputs and its shards verify, else None."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out)
        if manifest.get("fingerprint") != fingerprint:
            return None
        for split in SPLITS:
            load_split(out, split, tokenizer_sha256=tokenizer_sha256, verify=True)
    except DgptError as e:
        logger.warning(f"{out}: existing shards cannot be reused ({e}); rebuilding")
        return None
    return manifest
