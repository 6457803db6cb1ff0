"""`prepare` in parts and processes writes the shards, manifests and checksums of a single pass: files cut
between documents (blank lines, lines, JSONL rows), duplicates that fall in different parts, too-short
documents, a long document, and bad bytes named at their line in the whole file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dgpt.config import DataConfig, config_from_dict
from dgpt.data import parts as parts_module
from dgpt.data.parts import sample_parts, split_parts, worker_count
from dgpt.data.prepare import prepare
from dgpt.data.shards import read_manifest
from dgpt.data.sources import document_cuts, file_document_parts
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError

WORDS = ["sea", "wind", "  indented", "tab\there", "naïve", "don't", "42,", "\u00a0x", "漢字", "🙂"]


def _doc(rng: random.Random, lines: int) -> str:
    return "\n".join(" ".join(rng.choices(WORDS, k=rng.randint(1, 10))) for _ in range(lines))


def _corpus(root: Path) -> dict[str, list[str]]:
    """Two oracles' sources: text with repeated documents far apart, short ones and extra blank lines; JSONL."""
    rng = random.Random(3)
    docs = [_doc(rng, rng.randint(1, 8)) for _ in range(120)]
    docs += docs[:30] + ["x", "", "ok"] + [_doc(rng, 400)]  # duplicates in later parts, too short, a long one
    root.mkdir()
    (root / "a_train.txt").write_text("\n\n\n".join(docs) + "\n\n", encoding="utf-8")
    (root / "a_valid.txt").write_text("\n\n".join(docs[::7]), encoding="utf-8")
    rows = [json.dumps({"text": d}) for d in docs[:80] + docs[:10]] + [""]
    (root / "b_train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"a": [str(root / "a_train.txt"), str(root / "a_valid.txt")], "b": [str(root / "b_train.jsonl"), str(root / "a_valid.txt")]}


def _prepare(root: Path, name: str, sources: dict[str, list[str]], tokenizer: str, **data) -> dict:
    config = config_from_dict({
        "run_dir": str(root / name), "tokenizer": {"path": tokenizer},
        "data": {"min_chars": 3, "shard_tokens": 700, "batch_docs": 5, **data},
        "oracles": [{"name": o, "train": [train], "valid": [valid]} for o, (train, valid) in sources.items()]})
    stats = prepare(config)
    return {o: (read_manifest(root / name / "data" / o), stats[o]) for o in sources}


def test_parts_in_processes_write_the_manifests_of_one_pass(tmp_path):
    sources = _corpus(tmp_path / "corpus")
    config = config_from_dict({"run_dir": str(tmp_path / "trained"), "tokenizer": {"vocab_size": 400},
                               "oracles": [{"name": o, "train": [t], "valid": [v]} for o, (t, v) in sources.items()]})
    prepare(config)
    tokenizer = str(tmp_path / "trained" / "tokenizer.json")
    serial = _prepare(tmp_path, "serial", sources, tokenizer, workers=1)
    parallel = _prepare(tmp_path, "parallel", sources, tokenizer, workers=2, part_bytes=700)
    assert len(document_cuts(Path(sources["a"][0]), "blank_line", 700)) > 10
    assert len(document_cuts(Path(sources["b"][0]), "blank_line", 700)) > 5
    for o in sources:
        assert parallel[o][0] == serial[o][0]  # shards, checksums, counts, fingerprint
        assert parallel[o][1] == serial[o][1]
    assert serial["a"][1]["train"]["duplicates"] == 30 and serial["a"][1]["train"]["too_short"] >= 2  # "x", "ok"
    assert serial["b"][1]["train"]["duplicates"] == 10


@pytest.mark.parametrize("separator", ["blank_line", "line"])
def test_ranges_between_cuts_hold_the_documents_of_the_whole_file(tmp_path, separator):
    rng = random.Random(5)
    path = tmp_path / "t.txt"
    path.write_text("\ufeff" + "\n\n \n".join(_doc(rng, rng.randint(1, 5)) for _ in range(200)) + "\n\n\n", encoding="utf-8")
    whole = list(file_document_parts(path, doc_separator=separator))
    cuts = [0, *document_cuts(path, separator, 500), None]
    assert len(cuts) > 10
    ranges = [p for a, b in zip(cuts, cuts[1:]) for p in file_document_parts(path, doc_separator=separator, start=a, end=b)]
    assert ranges == whole and not whole[0][0].startswith("\ufeff")  # the byte-order mark is dropped once


def test_bad_bytes_in_a_later_part_are_named_at_their_line_in_the_file(tmp_path):
    path = tmp_path / "t.txt"
    lines = [f"line {i}\n" if i % 3 else "\n" for i in range(600)]
    lines[500] = "bad \xff here\n"
    path.write_bytes("".join(lines).encode("utf-8").replace("\xff".encode(), b"\xff"))
    cuts = [0, *document_cuts(path, "blank_line", 300), None]
    error = rf"{path}:501: not valid UTF-8 \(byte 0xff at column 5\)"
    with pytest.raises(DgptError, match=error):
        for start, end in zip(cuts, cuts[1:]):
            list(file_document_parts(path, start=start, end=end))
    assert len(cuts) > 10
    tokenizer = tmp_path / "tokenizer.json"
    TextTokenizer.train(iter(["line 1", "line 2"] * 10), 300).save(tokenizer)
    config = config_from_dict({"run_dir": str(tmp_path / "run"), "tokenizer": {"path": str(tokenizer)},
                               "data": {"part_bytes": 300, "workers": 2}, "oracles": [{"name": "o", "train": [str(path)]}]})
    with pytest.raises(DgptError, match=error):  # raised in a worker process, the same one line here
        prepare(config)
    assert not (tmp_path / "run" / "data" / "o").exists() and not list((tmp_path / "run" / "data").iterdir())


def test_workers_are_bounded_by_cores_memory_and_parts(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text("word " * 2_000_000 + "\n\n" + "more " * 2_000_000 + "\n", encoding="utf-8")  # 20 MB, 2 documents
    oracle = config_from_dict({"run_dir": str(tmp_path / "r"), "oracles": [{"name": "o", "train": [str(big)]}]}).oracles[0]
    parts = split_parts(oracle, "train", DataConfig(part_bytes=1 << 20))
    assert len(parts) == 2 and parts[0].end == parts[1].start
    monkeypatch.setattr(parts_module, "_cores", lambda: 8)
    monkeypatch.setattr(parts_module, "_available_memory", lambda: 100 * parts_module.WORKER_BYTES)
    assert worker_count(0, parts) == 2  # no more processes than parts
    monkeypatch.setattr(parts_module, "_available_memory", lambda: parts_module.WORKER_BYTES + 1)
    assert worker_count(0, parts) == 1  # room for one
    monkeypatch.setattr(parts_module, "_available_memory", lambda: None)  # unknown: one per core
    assert worker_count(0, split_parts(oracle, "train", DataConfig(part_bytes=1 << 30))) == 1  # one part
    assert worker_count(3, parts) == 2  # asked for: as many as there are parts


def test_the_tokenizer_sample_is_spread_over_the_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"document {i} " + "text " * 40 + "\n\n" for i in range(2000)), encoding="utf-8")  # ~430 KB
    oracle = config_from_dict({"run_dir": str(tmp_path / "r"), "oracles": [{"name": "o", "train": [str(path)]}]}).oracles[0]
    parts, sampled, total = sample_parts(oracle, DataConfig(), 40_000)
    assert total == path.stat().st_size and 40_000 <= sampled < 50_000 and 16 <= len(parts) <= 18
    assert parts[0].start == 0 and parts[-1].start > total * 0.9  # from the beginning to the end
    assert sample_parts(oracle, DataConfig(), 0)[1:] == (total, total)  # 0: all of it
