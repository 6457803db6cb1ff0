"""A split's documents encoded in parts by worker processes, merged into the shards one pass would write.

A text or JSONL file larger than `data.part_bytes` is cut between documents (`document_cuts`); every part
(a file, a range of one, or a Hugging Face dataset) is read, cleaned, filtered and encoded on its own, in a
pool of `data.workers` processes, and leaves its tokens (each kept document's, then <|endoftext|>) in a
scratch file with each document's hash, token count and text bytes. The merge takes the parts in order and
drops a document that an earlier part already kept: the documents, tokens and counts of a single pass, so
the shards, manifests and checksums do not depend on how many processes ran.
"""

from __future__ import annotations

import multiprocessing
import os
from array import array
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dgpt.config import DataConfig, OracleConfig
from dgpt.data.clean import DocumentFilter
from dgpt.data.documents import kept_parts
from dgpt.data.shards import ShardWriter
from dgpt.data.sources import document_cuts, file_document_parts, input_files, iter_document_parts
from dgpt.data.tokenizer import SEGMENT_CHARS, TextTokenizer, segments
from dgpt.errors import DgptError

WORKER_BYTES = 256 << 20  # a worker's peak memory is well below this (its batch, a part's records, the tokenizer)
SAMPLE_SLICES = 16  # a tokenizer's training sample is taken in slices of about a 16th of it
POOL_MIN_BYTES = 1 << 24  # below this much input (and data.workers = 0), starting processes costs more than it saves


@dataclass(frozen=True)
class Part:
    oracle: str
    split: str
    spec: str
    path: str | None = None  # None: all of `spec` (a Hugging Face dataset)
    start: int = 0
    end: int | None = None  # None: to the end of the file

    def documents(self, oracle: OracleConfig, data: DataConfig) -> Iterator[tuple[str, bool]]:
        """The part's raw documents as (part, last) pairs."""
        if self.path is None:
            return iter_document_parts(self.spec, text_field=oracle.text_field, doc_separator=data.doc_separator)
        return file_document_parts(Path(self.path), text_field=oracle.text_field, doc_separator=data.doc_separator,
                                   start=self.start, end=self.end)


@dataclass
class Encoded:
    """What a worker leaves for the merge: the tokens file and the counts of the documents its filter kept and
    dropped; with dedup, each kept document's hash, tokens (with its <|endoftext|>) and text bytes."""

    path: Path
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    too_short: int = 0
    duplicates: int = 0
    digests: np.ndarray | None = None
    doc_tokens: np.ndarray | None = None
    doc_bytes: np.ndarray | None = None


def split_parts(oracle: OracleConfig, split: str, data: DataConfig, part_bytes: int | None = None) -> list[Part]:
    """A split's parts, in order: its files cut between documents every `part_bytes` (data.part_bytes) or so."""
    parts = []
    for spec in getattr(oracle, split):
        files = input_files(spec)
        if not files:
            parts.append(Part(oracle.name, split, spec))
        for path in files:
            bounds = [0, *document_cuts(path, data.doc_separator, part_bytes or data.part_bytes), None]
            parts += [Part(oracle.name, split, spec, str(path), a, b) for a, b in zip(bounds, bounds[1:])]
    return parts


def sample_parts(oracle: OracleConfig, data: DataConfig, budget: int) -> tuple[list[Part], int, int]:
    """About `budget` bytes of the oracle's training files, in evenly spread slices of about budget/16 bytes cut
    between documents: what the tokenizer is trained on (all of them when they are smaller, budget is 0 or a
    source is a dataset, whose size is unknown). Returns the parts, their bytes and the files' bytes."""
    parts = split_parts(oracle, "train", data, max(budget // SAMPLE_SLICES, 1) if budget else None)
    total = sum(map(_size, parts))
    if not budget or total <= budget or any(p.path is None for p in parts):
        return parts, total, total
    take = -(-len(parts) * budget // total)
    chosen = [parts[j * len(parts) // take] for j in range(take)]
    return chosen, sum(map(_size, chosen)), total


def _size(part: Part) -> int:
    """The part's bytes (0 for a dataset, whose size is unknown)."""
    if part.path is None:
        return 0
    return (part.end if part.end is not None else Path(part.path).stat().st_size) - part.start


def worker_count(requested: int, parts: list[Part]) -> int:
    """`requested` processes, or with 0 one per core as free memory allows (one, in this process, for little input)."""
    if requested:
        return max(1, min(requested, len(parts)))
    if sum(map(_size, parts)) < POOL_MIN_BYTES:
        return 1
    cores = _cores()
    free = _available_memory()
    return max(1, min(cores, len(parts), free // WORKER_BYTES if free else cores))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


@contextmanager
def encoded_parts(parts: list[Part], workers: int, state: tuple) -> Iterator[Iterator[Encoded]]:
    """The parts encoded in order by `workers` processes (one: this process, in threads); `state`: `_start`'s
    arguments but the threads."""
    if workers == 1:
        _start(*state, threads=_cores())
        yield map(_encode_part, enumerate(parts))
        return
    # spawn, not fork: the parent may hold threads (tokenizer training's), which a fork would copy mid-work
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start, state) as pool:
        try:
            yield _named_death(pool.map(_encode_part, enumerate(parts)))
        finally:
            pool.shutdown(cancel_futures=True)


def _named_death(results: Iterator[Encoded]) -> Iterator[Encoded]:
    try:
        yield from results
    except BrokenProcessPool:
        raise DgptError("a worker process of `prepare` died (out of memory?); set data.workers to fewer processes") from None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_WORKER: dict = {}


def _start(tokenizer: TextTokenizer, data: DataConfig, dtype: np.dtype, oracles: dict[str, OracleConfig],
           scratch: Path, threads: int = 1) -> None:
    _WORKER.update(tokenizer=tokenizer, data=data, dtype=np.dtype(dtype), oracles=oracles, scratch=Path(scratch), threads=threads)


def _encode_part(task: tuple[int, Part]) -> Encoded:
    index, part = task
    tokenizer, data, dtype, oracles = (_WORKER[k] for k in ("tokenizer", "data", "dtype", "oracles"))
    keep = DocumentFilter(data.min_chars, data.dedup)
    texts = segments(kept_parts(part.documents(oracles[part.oracle], data), keep),
                     SEGMENT_CHARS if tokenizer.encodes_in_segments else None)
    out = Encoded(_WORKER["scratch"] / f"{index}.tokens")
    doc_tokens, doc_bytes, tokens, size = array("q"), array("q"), 0, 0  # per document: only with dedup
    with open(out.path, "wb") as f:
        for batch in _batches(texts, data.batch_docs, data.batch_bytes):
            encoded = tokenizer.encode_arrays([text for text, _, _ in batch], _WORKER["threads"])
            for ids, (_, last, text_bytes) in zip(encoded, batch):
                tokens, size = tokens + len(ids), size + text_bytes
                if last:
                    out.documents, out.tokens, out.text_bytes = out.documents + 1, out.tokens + tokens + 1, out.text_bytes + size
                    if data.dedup:
                        doc_tokens.append(tokens + 1)
                        doc_bytes.append(size)
                    tokens = size = 0
            f.write(_with_ends(encoded, [last for _, last, _ in batch], tokenizer.eot_id, dtype).tobytes())
    out.too_short, out.duplicates = keep.too_short, keep.duplicates
    if data.dedup:
        out.digests = np.frombuffer(b"".join(keep.digests), dtype=np.uint8).reshape(-1, 16)
        out.doc_tokens, out.doc_bytes = np.array(doc_tokens, np.int64), np.array(doc_bytes, np.int64)
    return out


def _batches(texts: Iterable[tuple[str, bool]], most: int, most_bytes: int) -> Iterator[list[tuple[str, bool, int]]]:
    """Batches of (segment, last, its UTF-8 bytes): at most `most` segments, ending once `most_bytes` is reached."""
    batch, size = [], 0
    for text, last in texts:
        text_bytes = len(text.encode("utf-8"))
        batch.append((text, last, text_bytes))
        size += text_bytes
        if len(batch) >= most or size >= most_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _with_ends(encoded: list[np.ndarray], lasts: list[bool], eot: int, dtype: np.dtype) -> np.ndarray:
    """The segments' tokens in one array, with <|endoftext|> after each document's last segment."""
    pieces = [piece for ids, last in zip(encoded, lasts) for piece in ((ids, np.array([eot])) if last else (ids,))]
    return np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.empty(0, dtype)


def merge(encoded: Iterable[Encoded], writer: ShardWriter) -> dict:
    """Write the parts' tokens in order, less the documents that an earlier part kept; return the split's counts."""
    seen: set[bytes] = set()
    total = Encoded(Path())
    for part in encoded:
        kept = _first_seen(part, seen)
        with open(part.path, "rb") as f:
            for start, end in _runs(part, kept):
                _copy(f, start, end, writer)
        part.path.unlink()
        dropped = _dropped(part, kept)
        total.documents += part.documents - dropped.documents
        total.tokens += part.tokens - dropped.tokens
        total.text_bytes += part.text_bytes - dropped.text_bytes
        total.too_short += part.too_short
        total.duplicates += part.duplicates + dropped.documents
    return {"tokens": total.tokens, "documents": total.documents, "duplicates": total.duplicates, "too_short": total.too_short,
            "text_bytes": total.text_bytes,
            # text tokens only: the <|endoftext|> after each document carries no text
            "bytes_per_token": round(total.text_bytes / max(total.tokens - total.documents, 1), 4)}


def _first_seen(part: Encoded, seen: set[bytes]) -> np.ndarray | None:
    """Which of the part's documents no earlier part kept (None: all of them, or no dedup)."""
    if part.digests is None:
        return None
    kept = np.ones(len(part.digests), dtype=bool)
    for i, digest in enumerate(map(bytes, part.digests)):
        kept[i] = digest not in seen
        seen.add(digest)
    return None if kept.all() else kept


def _runs(part: Encoded, kept: np.ndarray | None) -> list[tuple[int, int]]:
    """The token ranges of the kept documents, neighbours joined."""
    if kept is None:
        return [(0, part.tokens)]
    ends = np.cumsum(part.doc_tokens)
    runs: list[tuple[int, int]] = []
    for start, end in zip((ends - part.doc_tokens)[kept].tolist(), ends[kept].tolist()):
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def _dropped(part: Encoded, kept: np.ndarray | None) -> Encoded:
    if kept is None:
        return Encoded(part.path)
    return Encoded(part.path, int((~kept).sum()), int(part.doc_tokens[~kept].sum()), int(part.doc_bytes[~kept].sum()))


def _copy(f, start: int, end: int, writer: ShardWriter, chunk: int = 1 << 16) -> None:
    """Tokens start..end of a part's file into the shards, `chunk` at a time (memory stays flat)."""
    f.seek(start * writer.dtype.itemsize)
    for at in range(start, end, chunk):
        writer.write(np.fromfile(f, dtype=writer.dtype, count=min(chunk, end - at)))
