"""`prepare` in parts and processes writes the shards, manifests and checksums of a single pass: files cut
between documents (blank lines, lines, JSONL rows), duplicates that fall in different parts, too-short
documents, a long document, and bad bytes named at their line in the whole file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dgpt.config import config_from_dict
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
