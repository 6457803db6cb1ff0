"""A `tiktoken` encoder derived from a byte-level BPE `tokenizer.json`: the same token ids, several times faster.

`tokenizers` applies BPE merges in the order of its merge list; `tiktoken` merges the adjacent pair whose
concatenation has the lowest rank. With the vocabulary's byte strings as ranks (a token's id is its rank),
the two agree when merged tokens' ids rise with their merges' order, which is how `tokenizers` trains them,
and the pre-tokenizer is GPT-2's regex (byte-level, no prefix space, no normaliser). Whatever the structure
says, the derivation is checked before use: both encoders must give the same ids for `PROBE` (every class of
pre-token) and for every token's own text. A tokenizer that fails either way is encoded by `tokenizers`.
"""

from __future__ import annotations

import json

import tiktoken
from tokenizers import Tokenizer

# GPT-2's pre-tokenizer, as `tokenizers`' ByteLevel(use_regex=True) applies it
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# One of each pre-tokenizer class and their borders: letters (ASCII, accented, CJK, combining marks),
# digits (ASCII and other scripts), punctuation runs, whitespace runs (spaces, tabs, line breaks, trailing,
# non-ASCII spaces), contractions in either case, emoji and other non-BMP characters, special tokens inside text.
PROBE = (
    "The quick brown fox -- it's 3.14159 o'clock, isn't it? I'M sure they'll've said: \"don't\" & we'd 'd.\n"
    "Ünïcödé façade naïve e\u0301 漢字かなカナ 한국어 Ελληνικά русский עברית العربية ٣٤٥ ३४५ ½ Ⅻ\n\n"
    "def f(x):\n\treturn x**2 + 1_000  # comment\n    \n  \t \n\n\n   trailing   \n"
    "emoji 🙂👍🏽 𝔘𝔫𝔦 \U0001f9ea!!! ...?!; <tag attr='v'>{[()]}</tag> a\u00a0b c\u3000d e\u2009f\r\n"
    "<|endoftext|>next<|start|>q <|delim|> a<|extract|><|pad|>  x<|endoftext|>"
    "1234567890 12,345.67 0x1F ---- ==== **** ____ '' \"\" `` $$ %% ## @@"
)


class NotRanks(Exception):
    """The tokenizer cannot be expressed as `tiktoken` ranks; the message says why."""


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level map, inverted: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def derive_encoding(hf: Tokenizer) -> tiktoken.Encoding:
    """The `tiktoken` encoding of a byte-level BPE tokenizer (its added tokens as special tokens), or NotRanks."""
    spec = json.loads(hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None:
        raise NotRanks(f"it has a normalizer ({spec['normalizer'].get('type')})")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise NotRanks("its pre-tokenizer is not GPT-2's (ByteLevel with its regex, no prefix space)")
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise NotRanks("its model is not plain BPE (dropout, byte fallback or subword affixes)")
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        raise NotRanks("an added token strips spaces or matches single words only")
    special = {t["content"]: t["id"] for t in added}
    alphabet = byte_level_alphabet()
    ranks: dict[bytes, int] = {}
    for token, rank in model["vocab"].items():
        if rank in special.values():
            continue
        if any(c not in alphabet for c in token):
            raise NotRanks(f"vocabulary token {token!r} is not byte-level")
        ranks[bytes(alphabet[c] for c in token)] = rank
    missing = sum(bytes([b]) not in ranks for b in range(256))
    if missing:
        raise NotRanks(f"{missing} of the 256 bytes have no token")
    merged = [ranks.get(_merge_bytes(m, alphabet), -1) for m in model.get("merges") or []]
    if any(r < 0 for r in merged) or any(a >= b for a, b in zip(merged, merged[1:])):
        raise NotRanks("its merged tokens' ids do not rise with the merges' order")
    return tiktoken.Encoding("dgpt", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def _merge_bytes(merge: str | list[str], alphabet: dict[str, int]) -> bytes:
    """The bytes of the token a merge makes (merges are saved as "a b" or, since tokenizers 0.20, [a, b])."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return bytes(alphabet[c] for c in left + right)


def disagreement(hf: Tokenizer, encoding: tiktoken.Encoding) -> str | None:
    """Where the two encoders give different ids on `PROBE` or on a token's own text; None when nowhere."""
    tokens = [b.decode("utf-8", errors="replace") for b in encoding.token_byte_values()]
    texts = [PROBE, *PROBE.splitlines(keepends=True), *sorted(encoding.special_tokens_set),
             *(text for text in tokens if "\ufffd" not in text)]  # a token of part of a character has no text
    expected = [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)]
    got = encoding.encode_batch(texts, allowed_special="all")
    for text, want, have in zip(texts, expected, got):
        if want != have:
            return f"{text[:40]!r} encodes to {have[:8]} instead of {want[:8]}"
    return None
