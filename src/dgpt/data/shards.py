"""Token shards: flat binary files of token ids, described by a per-oracle `manifest.json`.

An oracle directory holds `{split}_{k:04d}.bin` files and `manifest.json`, written last: a directory
without a manifest is incomplete. The manifest records each shard's token count and sha256 and the
tokenizer's hash, so `load_split` can refuse shards that are damaged or were made with another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from dgpt.errors import DgptError
from dgpt.fileio import parse_json, sha256_file
from dgpt.rundir import MANIFEST, inside

FORMAT_VERSION = 1


def dtype_for_vocab(vocab_size: int, requested: str | np.dtype | None = None) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..vocab_size-1, or check that `requested` does."""
    if requested is None:
        requested = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    dtype = np.dtype(requested)
    if dtype.kind != "u" or vocab_size - 1 > np.iinfo(dtype).max:
        raise DgptError(f"a vocabulary of {vocab_size} tokens does not fit in token dtype {dtype.name}")
    return dtype


class ShardWriter:
    """Appends token ids to `{split}_NNNN.bin` shards of `shard_tokens` tokens each.

    A shard is written under a hidden temporary name and renamed when full (or on close). If the block
    raises, the temporary file and every shard this writer completed are removed.
    """

    def __init__(self, out_dir: str | Path, split: str, dtype: np.dtype | str, shard_tokens: int):
        if shard_tokens < 1:
            raise DgptError(f"data.shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.records: list[dict] = []
        self._file = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise DgptError(f"{self.out_dir}: token id {int(ids.max())} does not fit in dtype {self.dtype.name}")
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._file is None:
                self._open()
            take = ids[: self.shard_tokens - self._count]
            data = take.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take.size
            ids = ids[take.size :]
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        """Complete the last shard; return the records {"file", "tokens", "sha256"} of all shards."""
        if self._file is not None:
            self._finish()
        return self.records

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in [self._tmp] + [self.out_dir / r["file"] for r in self.records]:
            if path is not None and path.exists():
                path.unlink()
        self.records = []

    def _open(self) -> None:
        name = f"{self.split}_{len(self.records):04d}.bin"
        self._tmp = self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _finish(self) -> None:
        self._file.close()
        self._file = None
        name = self._tmp.name[1:-len(".tmp")]
        os.replace(self._tmp, self.out_dir / name)
        self._tmp = None
        self.records.append({"file": name, "tokens": self._count, "sha256": self._hash.hexdigest()})


def read_manifest(oracle_dir: str | Path) -> dict:
    path = inside(Path(oracle_dir) / MANIFEST, oracle_dir, "the oracle's data directory")
    if not path.is_file():
        raise DgptError(f"{path}: manifest missing (the data was never prepared or its preparation did not finish; run `dgpt prepare`)")
    try:
        manifest = parse_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DgptError(f"{path}: corrupt manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise DgptError(f"{path}: corrupt manifest: not a format_version {FORMAT_VERSION} manifest")
    missing = [k for k in ("dtype", "vocab_size", "tokenizer_sha256", "splits") if k not in manifest]
    if missing:
        raise DgptError(f"{path}: corrupt manifest: missing {', '.join(missing)}")
    return manifest


def load_split(
    oracle_dir: str | Path, split: str, *, tokenizer_sha256: str | None = None, verify: bool = True
) -> list[np.memmap]:
    """Memory-map a split's shards, checking sizes (and with verify, sha256) against the manifest."""
    oracle_dir = Path(oracle_dir)
    manifest = read_manifest(oracle_dir)
    if tokenizer_sha256 is not None and manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise DgptError(f"shards in {oracle_dir} were made with a different tokenizer; run `dgpt prepare` again")
    if not isinstance(manifest["splits"], dict) or split not in manifest["splits"]:
        raise DgptError(f"{oracle_dir / MANIFEST}: no split '{split}'")
    dtype = np.dtype(manifest["dtype"])
    try:
        records = [(r["file"], int(r["tokens"]), r["sha256"]) for r in manifest["splits"][split]["shards"]]
    except (KeyError, TypeError, ValueError):
        raise DgptError(f"{oracle_dir / MANIFEST}: corrupt manifest: bad shard records for split '{split}'") from None
    arrays = []
    for file, tokens, sha256 in records:
        path = inside(oracle_dir / str(file), oracle_dir, "the oracle's data directory")  # a received manifest names them
        if not path.is_file():
            raise DgptError(f"{path}: shard missing")
        expected = tokens * dtype.itemsize
        if path.stat().st_size != expected:
            raise DgptError(f"{path}: shard has {path.stat().st_size} bytes; the manifest says {expected} (truncated or replaced)")
        if verify and sha256_file(path) != sha256:
            raise DgptError(f"{path}: sha256 checksum does not match the manifest (the shard is corrupt)")
        arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(tokens,)))
    return arrays
