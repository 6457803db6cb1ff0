"""The byte-level BPE tokenizer: special-token ids, lossless round trip, save/load, bad files, text cut
into segments that encode as the whole."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from dgpt.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, count_pretokens, segments
from dgpt.errors import DgptError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text, 漢字 and emoji 🙂 appear too.",
    "To be, or not to be, that is the question.",
] * 40


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(iter(CORPUS), vocab_size=400, min_frequency=2)


def test_special_tokens_are_ids_0_to_4(tok):
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.eot_id, tok.pad_id, tok.start_id, tok.delim_id, tok.extract_id) == (0, 1, 2, 3, 4)
    assert tok.encode("<|endoftext|>") == [0]
    assert 261 < tok.vocab_size <= 400


def test_training_learns_merges(tok):
    assert len(tok.encode("the question")) < len("the question".encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIAL_TOKENS))).map("".join))
def test_round_trip_with_special_token_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok):
    texts = ["hello world", "", "<|start|>a<|delim|>b<|extract|>", "  indented\n\ttabs"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left
    loaded = TextTokenizer.load(path)
    assert loaded.sha256 == tok.sha256
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(CORPUS[2]) == tok.encode(CORPUS[2])


def test_sha256_differs_between_tokenizers(tok):
    other = TextTokenizer.train(iter(CORPUS[:1] * 10), vocab_size=300)
    assert other.sha256 != tok.sha256


def test_load_missing_and_corrupt(tmp_path):
    with pytest.raises(DgptError, match=r"nope\.json: tokenizer file not found"):
        TextTokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(DgptError, match=r"bad\.json: not a valid tokenizer file") as info:
        TextTokenizer.load(bad)
    assert "\n" not in str(info.value)


def test_load_rejects_a_tokenizer_without_special_tokens(tmp_path):
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "plain.json"
    plain.save(str(path))
    with pytest.raises(DgptError, match=r"plain\.json: tokenizer lacks the special token\(s\) <\|pad\|>"):
        TextTokenizer.load(path)


def test_vocab_smaller_than_the_byte_alphabet_is_refused():
    with pytest.raises(DgptError, match="vocab_size is 100"):
        TextTokenizer.train(iter(CORPUS), vocab_size=100)


def test_saved_file_is_json_with_specials_first(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert [t["content"] for t in data["added_tokens"]] == list(SPECIAL_TOKENS)


# text that cutting could get wrong: runs of spaces, indentation, blank lines, tabs, contractions, digits,
# punctuation, combining marks, non-Latin scripts, special-token text
_PIECES = [" ", "  ", "\n", "\n\n", "\t", "    ", "a", "the", "Qu", "'s", "'ll", "don't", "42", "3.14", ",", "...",
           "e\u0301", "\u0301", "漢字", "🙂", "\u00a0", "<|endoftext|>", "<|pad|>", "x\n  y", "-"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES) | st.text(max_size=6), max_size=80), st.integers(1, 40), st.lists(st.integers(0, 400), max_size=6))
def test_segments_encode_and_count_as_the_whole_text(tok, pieces, size, cuts):
    text = "".join(pieces)
    bounds = sorted({min(c, len(text)) for c in cuts})
    parts = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]  # the document cut anywhere
    got = list(segments([(p, i == len(parts) - 1) for i, p in enumerate(parts)], size))
    assert "".join(s for s, _ in got) == text and [last for _, last in got] == [False] * (len(got) - 1) + [True]
    assert [i for s, _ in got for i in tok.encode(s)] == tok.encode(text)
    assert count_pretokens(s for s, _ in got) == count_pretokens([text])


def test_segments_are_bounded_and_keep_documents_apart():
    words = " ".join(f"w{i}" for i in range(2000))
    got = list(segments([(words[:3000], False), (words[3000:], True), ("next", True)], 100))
    assert max(len(s) for s, _ in got) <= 100 and len(got) > len(words) // 100
    assert [s for s, last in got if last] == [got[-2][0], "next"]
    assert list(segments([(words, True)], None)) == [(words, True)]  # no size: whole documents
    unbroken = "x" * 500  # no place to cut: the stretch stays whole
    assert list(segments([(unbroken + " tail", True)], 100)) == [(unbroken, False), (" tail", True)]


def test_only_tokenizers_that_split_like_gpt2_are_cut(tok):
    assert tok.encodes_in_segments
    prefixed = Tokenizer.from_str(tok.hf.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    normalized = Tokenizer.from_str(tok.hf.to_str())
    normalized.normalizer = normalizers.Lowercase()
    assert not TextTokenizer(prefixed).encodes_in_segments and not TextTokenizer(normalized).encodes_in_segments
