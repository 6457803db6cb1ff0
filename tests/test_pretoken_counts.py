"""A tokenizer trained without pooling text: per-oracle pre-token counts, merged, train the same BPE as
the pooled text; each machine prepares only the oracles it holds; bad count files fail with one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import SHARED_DATA, host_config, tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dgpt.cli import main
from dgpt.config import dump_config
from dgpt.data.prepare import prepare
from dgpt.data.pretokens import merge_counts
from dgpt.data.shards import read_manifest
from dgpt.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, count_pretokens
from dgpt.errors import DgptError


def pooled_text_tokenizer(texts: list[str], vocab_size: int, min_frequency: int) -> TextTokenizer:
    """The reference: Hugging Face's BPE trainer run on the pooled text itself."""
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(hf)


def merged_counts_tokenizer(parts: list[list[str]], vocab_size: int, min_frequency: int) -> TextTokenizer:
    counts = sum((count_pretokens(part) for part in parts), start=count_pretokens([]))
    return TextTokenizer.train_from_counts(counts, vocab_size, min_frequency)


def test_merged_counts_train_the_pooled_text_tokenizer():
    parts = [
        ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 30,
        ["def add(a, b):\n    return a + b\n", "for i in range(10):\n\tprint(i ** 2)  # 0..81"] * 30,
        ["Ünïcödé text, 漢字 and emoji 🙂 appear too.", "hello   there\r\n  general <|endoftext|> kenobi"] * 30,
    ]
    reference = pooled_text_tokenizer([t for part in parts for t in part], 400, 2)
    federated = merged_counts_tokenizer(parts, 400, 2)
    assert federated.sha256 == reference.sha256
    assert TextTokenizer.train(iter(t for part in parts for t in part), 400, 2).sha256 == reference.sha256  # streamed
    assert federated.encode("the question: return a + b") == reference.encode("the question: return a + b")
    # the counts are what decides: dropping one oracle's text changes the tokenizer
    assert merged_counts_tokenizer(parts[:2], 400, 2).sha256 != reference.sha256


@pytest.mark.skipif(not (SHARED_DATA / "pretrain").is_dir(), reason="../shared/data/pretrain not present")
def test_merged_counts_equal_pooled_text_on_real_corpora():
    parts = []
    for name in ("literature_shakespeare", "technical_python_docs", "dialogue_topical_chat"):
        text = (SHARED_DATA / "pretrain" / name / "train.txt").read_text(encoding="utf-8")
        parts.append([doc for doc in text.split("\n\n") if doc.strip()][:1500])
    reference = pooled_text_tokenizer([t for part in parts for t in part], 2048, 2)
    assert merged_counts_tokenizer(parts, 2048, 2).sha256 == reference.sha256


@pytest.mark.parametrize("train_bytes", [1 << 23, 6000])  # the tiny oracles' whole text; a sample of each (~25 KB)
def test_two_machines_prepare_their_own_oracles_with_the_pooled_tokenizer(tmp_path, capsys, caplog, train_bytes):
    tokenizer = {"vocab_size": 300, "train_bytes": train_bytes}
    pooled = tiny_config(tmp_path, tokenizer=tokenizer)
    with caplog.at_level(logging.INFO, logger="dgpt"):
        prepare(pooled)  # one machine holding every oracle's text: the reference
    assert ("(tokenizer.train_bytes)" in caplog.text) == (train_bytes == 6000)
    holds = {"m0": {"alpha"}, "m1": {"beta", "gamma"}}
    configs = {m: _write(tmp_path, host_config(tmp_path, m, names, tokenizer=tokenizer), f"{m}.toml") for m, names in holds.items()}
    counts = []
    for machine, names in holds.items():
        for name in sorted(names):
            out = tmp_path / "shared_counts" / f"{name}.json"
            assert main(["count-pretokens", str(configs[machine]), "--oracle", name, "--out", str(out)]) == 0
            counts.append(str(out))
    assert "distinct written to" in capsys.readouterr().err
    listed = "tokenizer.counts=" + json.dumps(counts)
    for machine, names in holds.items():
        flags = [arg for name in sorted(names) for arg in ("--oracle", name)]
        assert main(["prepare", str(configs[machine]), "--set", listed, *flags]) == 0
        run = tmp_path / machine
        assert TextTokenizer.load(run / "tokenizer.json").sha256 == TextTokenizer.load(pooled.run_path / "tokenizer.json").sha256
        assert sorted(p.name for p in (run / "data").iterdir()) == sorted(names)
        for name in names:  # the same shards, byte for byte, as the machine that held everything
            mine, ref = read_manifest(run / "data" / name), read_manifest(pooled.run_path / "data" / name)
            assert mine["splits"] == ref["splits"]
    # a second run reuses the tokenizer trained from the same count files
    assert main(["prepare", str(configs["m0"]), "--set", listed, "--oracle", "alpha"]) == 0
    assert "tokenizer: reused" in capsys.readouterr().err


def test_min_count_leaves_out_rare_pretokens(tmp_path):
    config = tiny_config(tmp_path)
    main(["count-pretokens", str(_write(tmp_path, config)), "--oracle", "alpha", "--out", str(tmp_path / "all.json")])
    main(["count-pretokens", str(_write(tmp_path, config)), "--oracle", "alpha", "--out", str(tmp_path / "rare.json"),
          "--min-count", "50"])
    full, floored = (json.loads((tmp_path / f).read_text())["counts"] for f in ("all.json", "rare.json"))
    assert floored and set(floored) < set(full)
    assert all(n >= 50 for n in floored.values()) and any(n < 50 for n in full.values())


def _write(tmp_path: Path, config, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(dump_config(config))
    return path


def test_bad_count_files_and_partial_prepare_fail_with_one_line(tmp_path, capsys):
    config = tiny_config(tmp_path)
    path = _write(tmp_path, config)
    good = tmp_path / "alpha.json"
    assert main(["-q", "count-pretokens", str(path), "--oracle", "alpha", "--out", str(good)]) == 0
    cleaning = json.loads(good.read_text())["cleaning"]

    def fails(files: list[str], message: str) -> None:
        with pytest.raises(DgptError, match=message):
            merge_counts(files, cleaning)

    (tmp_path / "notjson.json").write_text("{oops")
    (tmp_path / "format.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "negative.json").write_text(json.dumps({**json.loads(good.read_text()), "counts": {"Ġthe": -3}}))
    (tmp_path / "other.json").write_text(json.dumps({**json.loads(good.read_text()), "cleaning": {**cleaning, "min_chars": 99}}))
    fails([str(tmp_path / "missing.json")], "missing.json: pre-token count file not found")
    fails([str(tmp_path / "notjson.json")], "notjson.json: not valid JSON")
    fails([str(tmp_path / "format.json")], "format 'something-else'")
    fails([str(tmp_path / "negative.json")], "count of pre-token 'Ġthe' is -3")
    fails([str(good), str(good)], "oracle 'alpha' was already counted")
    fails([str(tmp_path / "other.json")], "counted with cleaning and sample settings")

    assert main(["prepare", str(path), "--oracle", "alpha"]) == 2  # no counts, no ready tokenizer
    assert main(["prepare", str(path), "--oracle", "delta", "--set", f'tokenizer.counts=["{good}"]']) == 2
    assert main(["prepare", str(path), "--set", f'tokenizer.counts=["{tmp_path / "notjson.json"}"]']) == 2
    assert main(["prepare", str(path), "--set", f'tokenizer.counts=["{good}"]', "--set", 'tokenizer.path="x.json"']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4
    assert "needs a tokenizer that every machine builds alike" in err[0]
    assert "oracle(s) 'delta' not in the config" in err[1]
    assert "notjson.json: not valid JSON" in err[2]
    assert "set one of 'tokenizer.path'" in err[3]
    assert not (config.run_path / "tokenizer.json").exists()  # nothing half-made was left behind
