"""The `tiktoken` encoder derived from a trained tokenizer: the same shards as `tokenizers` on every shared
corpus, and `tokenizers` (with the reason logged) for a tokenizer that cannot be expressed as ranks or whose
derived encoder disagrees."""

from __future__ import annotations

import logging

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from conftest import SHARED_DATA
from dgpt.config import config_from_dict
from dgpt.data.prepare import prepare
from dgpt.data.rank_encoder import PROBE, byte_level_alphabet
from dgpt.data.shards import read_manifest
from dgpt.data.tokenizer import SPECIAL_TOKENS, TextTokenizer

PRETRAIN = SHARED_DATA / "pretrain"
CORPORA = sorted(p.parent for p in PRETRAIN.glob("*/train.txt"))


def _byte_level(vocab: dict[str, int], merges: list[tuple[str, str]], normalizer=None) -> TextTokenizer:
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return TextTokenizer(hf, "<test>")


def _alphabet_vocab(extra: list[str]) -> dict[str, int]:
    tokens = [*SPECIAL_TOKENS, *sorted(byte_level_alphabet()), *extra]
    return {t: i for i, t in enumerate(tokens)}


def test_trained_tokenizer_encodes_with_tiktoken_and_agrees_on_the_probe():
    tok = TextTokenizer.train(iter([PROBE] * 20), vocab_size=600)
    assert tok.fast is not None
    texts = [PROBE, "<|endoftext|>", "", "  two\n\n\tlines  "]
    assert tok.encode_batch(texts) == [e.ids for e in tok.hf.encode_batch(texts, add_special_tokens=False)]
    for threads in (1, 2, 3):  # slices per thread, an empty batch included
        for n in (0, 1, 2, 4):
            assert [a.tolist() for a in tok.encode_arrays(texts[:n], threads)] == tok.encode_batch(texts[:n])


def test_a_tokenizer_with_a_normalizer_falls_back_to_tokenizers_and_says_why(caplog):
    tok = _byte_level(_alphabet_vocab(["Ġa"]), [("Ġ", "a")], normalizers.Lowercase())
    with caplog.at_level(logging.INFO, logger="dgpt"):
        assert tok.fast is None
    assert "cannot be expressed as tiktoken ranks (it has a normalizer (Lowercase))" in caplog.text
    assert tok.encode("A a") == tok.hf.encode("A a", add_special_tokens=False).ids == tok.encode("a a")


def test_a_derived_encoder_that_disagrees_falls_back_with_a_warning(caplog):
    # "abc" is made from ("ab", "c"), but b+c merges first: `tokenizers` gives [a, bc] for "abc", while tiktoken,
    # finding "abc" among its ranks, would give [abc]. The merge ids rise, so only the check can tell.
    tok = _byte_level(_alphabet_vocab(["bc", "ab", "abc"]), [("b", "c"), ("a", "b"), ("ab", "c")])
    with caplog.at_level(logging.WARNING, logger="dgpt"):
        assert tok.fast is None
    assert "its tiktoken encoder disagrees ('abc' encodes to [263] instead of [69, 261])" in caplog.text
    assert tok.encode("abc") == [69, 261]


@pytest.mark.skipif(not CORPORA, reason=f"no corpus under {PRETRAIN}: the parity test reads the shared corpora")
def test_tiktoken_and_tokenizers_write_identical_shards_on_every_shared_corpus(tmp_path, monkeypatch):
    oracles = [{"name": p.name, "train": [str(p / "train.txt")], "valid": [str(p / "valid.txt")]} for p in CORPORA]
    prepare(config_from_dict({"run_dir": str(tmp_path / "fast"), "tokenizer": {"vocab_size": 8192}, "oracles": oracles}))
    trained = tmp_path / "fast" / "tokenizer.json"
    assert TextTokenizer.load(trained).fast is not None
    monkeypatch.setattr(TextTokenizer, "fast", property(lambda self: None))  # every encode through `tokenizers`
    prepare(config_from_dict({"run_dir": str(tmp_path / "slow"), "tokenizer": {"path": str(trained)}, "oracles": oracles}))
    for corpus in CORPORA:
        fast, slow_ = (read_manifest(tmp_path / run / "data" / corpus.name) for run in ("fast", "slow"))
        assert fast["splits"] == slow_["splits"], corpus.name
