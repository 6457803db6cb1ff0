"""Token shards, manifests and `prepare`: integrity checks, reuse, interrupted writes, long documents in
parts, flat memory in corpus size and in document size."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dgpt.config import config_from_dict
from dgpt.data import documents, parts, prepare as prepare_module, sources
from dgpt.data.clean import DocumentFilter, clean_text
from dgpt.data.embedded import write_embedded_corpora
from dgpt.data.prepare import prepare
from dgpt.data.shards import ShardWriter, dtype_for_vocab, load_split, read_manifest
from dgpt.data.sources import iter_documents
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError
from dgpt.fileio import sha256_file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TRAIN_TEXT = (
    "First document,\r\nwith a CRLF line.\n\n"
    "Second\u00a0document   \n    keeps its indentation.\n\n"
    "First document,\nwith a CRLF line.\n\n"  # a duplicate once cleaned
    "tiny\n\n"
    + "".join(f"Document number {i} talks about the weather and the sea.\n\n" for i in range(40))
)
VALID_TEXT = "A validation document.\n\nAnother one, about the sea.\n"


def make_config(tmp_path: Path, **data) -> object:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    (corpus / "valid.txt").write_text(VALID_TEXT, encoding="utf-8")
    return config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "tokenizer": {"vocab_size": 300},
        "data": {"min_chars": 5, "shard_tokens": 100, "batch_docs": 7, **data},
        "oracles": [{"name": "sea", "train": [str(corpus / "train.txt")], "valid": [str(corpus / "valid.txt")]}],
    })


def logged_prepare(config, caplog) -> tuple[dict, list[str]]:
    """`prepare`, and the messages it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dgpt"):
        stats = prepare(config)
    return stats, caplog.messages


@pytest.fixture
def prepared(tmp_path, caplog):
    config = make_config(tmp_path)
    stats, lines = logged_prepare(config, caplog)
    return config, tmp_path / "run" / "data" / "sea", stats, lines


def test_manifest_matches_the_files(prepared):
    config, oracle_dir, stats, _ = prepared
    manifest = read_manifest(oracle_dir)
    assert manifest["oracle"] == "sea" and manifest["dtype"] == "uint16"
    tok = TextTokenizer.load(Path(config.run_dir) / "tokenizer.json")
    assert manifest["tokenizer_sha256"] == tok.sha256 and manifest["vocab_size"] == tok.vocab_size
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1  # shard_tokens = 100 forces rolling
    for record in train["shards"] + manifest["splits"]["valid"]["shards"]:
        path = oracle_dir / record["file"]
        assert path.stat().st_size == record["tokens"] * 2
        assert sha256_file(path) == record["sha256"]
    assert train["tokens"] == sum(r["tokens"] for r in train["shards"])
    assert (train["documents"], train["duplicates"], train["too_short"]) == (42, 1, 1)
    assert stats["sea"]["train"]["tokens"] == train["tokens"] and stats["sea"]["reused"] is False
    assert sorted(p.name for p in oracle_dir.iterdir()) == ["manifest.json"] + [
        r["file"] for split in ("train", "valid") for r in manifest["splits"][split]["shards"]
    ]


def test_shards_decode_to_the_cleaned_documents(prepared):
    config, oracle_dir, _, _ = prepared
    tok = TextTokenizer.load(Path(config.run_dir) / "tokenizer.json")
    for split in ("train", "valid"):
        keep = DocumentFilter(min_chars=5, dedup=True)
        source = Path(getattr(config.oracles[0], split)[0])
        expected = [d for d in map(clean_text, iter_documents(str(source))) if keep.keep(d)]
        tokens = np.concatenate(load_split(oracle_dir, split, tokenizer_sha256=tok.sha256))
        assert tok.decode(tokens.tolist()) == "".join(d + "<|endoftext|>" for d in expected)
        if split == "train":
            assert "Second document\n    keeps its indentation." in expected


def test_corrupt_byte_is_a_checksum_error(prepared):
    _, oracle_dir, _, _ = prepared
    shard = oracle_dir / "train_0001.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DgptError, match=r"train_0001\.bin: sha256 checksum does not match"):
        load_split(oracle_dir, "train")
    assert len(load_split(oracle_dir, "train", verify=False)) > 1


def test_truncated_missing_shard_and_missing_manifest(prepared):
    _, oracle_dir, _, _ = prepared
    shard = oracle_dir / "train_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DgptError, match=r"train_0000\.bin: shard has \d+ bytes; the manifest says \d+"):
        load_split(oracle_dir, "train", verify=False)
    shard.unlink()
    with pytest.raises(DgptError, match=r"train_0000\.bin: shard missing"):
        load_split(oracle_dir, "train")
    (oracle_dir / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DgptError, match=r"manifest\.json: corrupt manifest"):
        load_split(oracle_dir, "valid")
    (oracle_dir / "manifest.json").unlink()
    with pytest.raises(DgptError, match=r"sea[/\\]manifest\.json: manifest missing"):
        load_split(oracle_dir, "valid")


def test_tokenizer_mismatch(prepared):
    _, oracle_dir, _, _ = prepared
    with pytest.raises(DgptError, match=r"shards in .*sea were made with a different tokenizer"):
        load_split(oracle_dir, "train", tokenizer_sha256="0" * 64)


def test_dtype_for_vocab():
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    with pytest.raises(DgptError, match="70000 tokens does not fit in token dtype uint16"):
        dtype_for_vocab(70000, "uint16")


def test_writer_refuses_ids_too_large_for_the_dtype(tmp_path):
    with pytest.raises(DgptError, match="token id 70000 does not fit in dtype uint16"):
        with ShardWriter(tmp_path, "train", np.uint16, 10) as writer:
            writer.write(np.array([1, 70000]))


def test_writer_rolls_shards(tmp_path):
    with ShardWriter(tmp_path, "valid", np.uint32, 10) as writer:
        writer.write(np.arange(7))
        writer.write(np.arange(7, 25))
        records = writer.close()
    assert [(r["file"], r["tokens"]) for r in records] == [("valid_0000.bin", 10), ("valid_0001.bin", 10), ("valid_0002.bin", 5)]
    data = np.concatenate([np.fromfile(tmp_path / r["file"], dtype=np.uint32) for r in records])
    assert data.tolist() == list(range(25))


def test_interrupted_write_leaves_nothing_that_looks_valid(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", np.uint16, 8) as writer:
            writer.write(np.arange(20))  # two complete shards and a partial one
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_prepare_leaves_no_oracle_directory(tmp_path):
    config = make_config(tmp_path)
    Path(config.oracles[0].valid[0]).write_bytes(b"fine\n\nbroken \xff\n")
    with pytest.raises(DgptError, match=r"valid\.txt:3: not valid UTF-8"):
        prepare(config)
    assert not (tmp_path / "run" / "data" / "sea").exists()
    assert [p.name for p in (tmp_path / "run" / "data").iterdir()] == []  # no temporary directory either


def test_rerun_reuses_and_a_changed_input_rebuilds(prepared, caplog):
    config, oracle_dir, stats, _ = prepared
    mtimes = {p.name: p.stat().st_mtime_ns for p in oracle_dir.iterdir()}
    again, lines = logged_prepare(config, caplog)
    assert {p.name: p.stat().st_mtime_ns for p in oracle_dir.iterdir()} == mtimes
    assert "tokenizer: reused" in lines[0] and "reused" in lines[1]
    assert again["sea"]["train"] == stats["sea"]["train"] and again["sea"]["reused"] is True

    Path(config.oracles[0].valid[0]).write_text(VALID_TEXT + "\nA third validation document.\n", encoding="utf-8")
    rebuilt, lines = logged_prepare(config, caplog)
    assert "tokenizer: reused" in lines[0]  # the tokenizer depends on training data only
    assert rebuilt["sea"]["reused"] is False and rebuilt["sea"]["valid"]["documents"] == 3


def test_rerun_rebuilds_damaged_shards(prepared, caplog):
    config, oracle_dir, _, _ = prepared
    (oracle_dir / "valid_0000.bin").write_bytes(b"\0\0")
    stats, lines = logged_prepare(config, caplog)
    assert stats["sea"]["reused"] is False
    assert any("cannot be reused" in line for line in lines)
    load_split(oracle_dir, "valid")


def test_oracle_errors(tmp_path):
    config = make_config(tmp_path)
    config.oracles[0].train = []
    with pytest.raises(DgptError, match="oracle 'sea' has no train source"):
        prepare(config)
    config = make_config(tmp_path, min_chars=10_000)
    config.tokenizer.path = str(tmp_path / "tok.json")
    TextTokenizer.train(iter(["some text"] * 5), 300).save(config.tokenizer.path)
    with pytest.raises(DgptError, match="oracle 'sea': the training split yields zero tokens"):
        prepare(config)


def test_given_tokenizer_is_copied_and_not_taken_for_a_trained_one(tmp_path):
    config = make_config(tmp_path)
    prepare(config)
    given = TextTokenizer.train(iter([TRAIN_TEXT] * 3), 320)
    config.tokenizer.path = str(tmp_path / "given.json")
    given.save(config.tokenizer.path)
    prepare(config)
    run = Path(config.run_dir)
    assert TextTokenizer.load(run / "tokenizer.json").sha256 == given.sha256
    assert not (run / "tokenizer.fingerprint.json").exists()
    assert read_manifest(run / "data" / "sea")["tokenizer_sha256"] == given.sha256


def test_memory_is_flat_in_corpus_size(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    tok_path = tmp_path / "tok.json"
    TextTokenizer.train((" ".join(rng.choices(words, k=40)) for _ in range(200)), 400).save(tok_path)

    def peak_for(n_docs: int) -> int:
        corpus = tmp_path / f"c{n_docs}.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for i in range(n_docs):
                f.write(" ".join(rng.choices(words, k=40)) + f" {i}\n\n")
        config = config_from_dict({
            "run_dir": str(tmp_path / f"run{n_docs}"),
            "tokenizer": {"path": str(tok_path)},
            "data": {"batch_docs": 64, "dedup": False},
            "oracles": [{"name": "o", "train": [str(corpus)]}],
        })
        tracemalloc.start()
        prepare(config)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    peak_for(200)  # warm-up: first-use allocations (imports, caches) are not per-corpus
    small, large = peak_for(1500), peak_for(6000)
    assert large < 1.5 * small + 100_000, (small, large)


def test_long_documents_in_parts_and_segments_give_the_same_shards(tmp_path, monkeypatch):
    rng = random.Random(1)
    words = ["sea", "wind", "  indented", "tab\there", "naïve", "e\u0301", "don't", "42,", "\u00a0x"]
    book = "\n".join(" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(60))
    text = f"{book}\n\nshort one\n\n{book}\n\n{book} and more\n\n" + TRAIN_TEXT  # a long duplicate too

    def shards(name: str) -> tuple[dict, dict]:
        root = tmp_path / name
        root.mkdir()
        (root / "train.txt").write_text(text, encoding="utf-8")
        (root / "valid.txt").write_text(VALID_TEXT + "\n\n" + book, encoding="utf-8")
        config = config_from_dict({"run_dir": str(root / "run"), "tokenizer": {"vocab_size": 320},
                                   "data": {"shard_tokens": 500, "batch_docs": 3, "batch_bytes": 200},
                                   "oracles": [{"name": "sea", "train": [str(root / "train.txt")], "valid": [str(root / "valid.txt")]}]})
        stats = prepare(config)["sea"]
        return read_manifest(root / "run" / "data" / "sea")["splits"], stats

    whole = shards("whole")
    for module, name, value in [(sources, "PART_CHARS", 50), (documents, "PART_CHARS", 50), (prepare_module, "SEGMENT_CHARS", 20), (parts, "SEGMENT_CHARS", 20)]:
        monkeypatch.setattr(module, name, value)
    in_parts = shards("parts")
    assert in_parts == whole  # the same tokenizer, tokens, checksums and counts
    assert (whole[1]["train"]["documents"], whole[1]["train"]["duplicates"]) == (46, 2)


def test_memory_is_flat_in_document_size(tmp_path):
    """Peak RSS of `prepare` in a fresh process: one document of 12 MB against one of 1 MB (small encode
    batches, so that both fill one)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    tok_path = tmp_path / "tok.json"
    TextTokenizer.train((" ".join(rng.choices(words, k=40)) for _ in range(200)), 400).save(tok_path)
    line = " ".join(rng.choices(words, k=200)) + "\n"

    def peak_mib(name: str, megabytes: int) -> float:
        corpus = tmp_path / f"{name}.txt"
        corpus.write_text(line * (megabytes * 2**20 // len(line)), encoding="utf-8")  # no blank line: one document
        config = {"run_dir": str(tmp_path / name), "tokenizer": {"path": str(tok_path)}, "data": {"batch_bytes": 1 << 18},
                  "oracles": [{"name": "o", "train": [str(corpus)]}]}
        script = ("import json, resource, sys; from dgpt.config import config_from_dict; from dgpt.data.prepare import prepare; "
                  "prepare(config_from_dict(json.loads(sys.argv[1]))); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        done = subprocess.run([sys.executable, "-c", script, json.dumps(config)], capture_output=True, text=True, check=True)
        assert read_manifest(tmp_path / name / "data" / "o")["splits"]["train"]["documents"] == 1
        return int(done.stdout.split()[-1]) / 1024

    small, large = peak_mib("small", 1), peak_mib("large", 12)
    assert large - small < 25, (small, large)  # encoding the whole document at once grew by ~500 MB here


def test_embedded_corpora_prepare(tmp_path):
    oracles = write_embedded_corpora(tmp_path / "corpora")
    assert [o.name for o in oracles] == ["stdlib_text_net", "stdlib_numeric_data", "stdlib_source"]
    first = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "corpora").rglob("*.txt"))}
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "corpora").rglob("*.txt"))]
    write_embedded_corpora(tmp_path / "corpora")
    assert {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "corpora").rglob("*.txt"))} == first
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "corpora").rglob("*.txt"))] == mtimes  # so reuse works
    for oracle in oracles:
        train, valid = Path(oracle.train[0]), Path(oracle.valid[0])
        assert 300_000 < train.stat().st_size < 1_500_000
        assert 0.05 < valid.stat().st_size / train.stat().st_size < 0.2
        assert " at 0x" not in train.read_text(encoding="utf-8")  # no memory addresses
    config = config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "tokenizer": {"vocab_size": 1000},
        "oracles": [dataclasses.asdict(o) for o in oracles],
    })
    stats = prepare(config)
    for name, s in stats.items():
        assert s["train"]["documents"] > 300 and s["valid"]["documents"] > 30, name
        assert 2.0 < s["train"]["bytes_per_token"] < 5.0, name


@pytest.mark.skipif(
    not (SHARED_DATA / "pretrain" / "literature_shakespeare" / "train.txt").is_file(),
    reason=f"real data not found at {SHARED_DATA} (it lies beside the checkout, not in it)",
)
def test_real_shakespeare(tmp_path, caplog):
    root = SHARED_DATA / "pretrain" / "literature_shakespeare"
    config = config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "tokenizer": {"vocab_size": 512},
        "oracles": [{"name": "shakespeare", "train": [str(root / "train.txt")], "valid": [str(root / "valid.txt")]}],
    })
    stats, lines = logged_prepare(config, caplog)
    stats = stats["shakespeare"]
    assert stats["train"]["documents"] > 5000 and stats["valid"]["documents"] > 500
    assert stats["train"]["text_bytes"] > 900_000
    assert 1.5 < stats["train"]["bytes_per_token"] < 3.5
    assert any(line.startswith("shakespeare: train") for line in lines)
    manifest = json.loads((tmp_path / "run" / "data" / "shakespeare" / "manifest.json").read_text(encoding="utf-8"))
    tok = TextTokenizer.load(tmp_path / "run" / "tokenizer.json")
    valid = load_split(tmp_path / "run" / "data" / "shakespeare", "valid", tokenizer_sha256=tok.sha256)
    assert sum(len(a) for a in valid) == manifest["splits"]["valid"]["tokens"] == stats["valid"]["tokens"]
    assert tok.decode(valid[0][:200].tolist()).count("<|endoftext|>") >= 1
