"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with GPT-1's special tokens at ids 0..4.

Byte-level means every string encodes, and `decode(encode(s)) == s` for every string: text equal to
a special token encodes to that token's id and decodes back to the same text.

BPE only ever sees how often each pre-token (a byte-level word with its leading space) occurs, so
oracles can each count their own text and share the counts instead of the text, and the merged counts
train the same tokenizer as the pooled text would. Text is trained on as a stream: Rust pre-tokenizes
and counts it, holding only the counts.

Encoding goes through a `tiktoken` encoder derived from the tokenizer and checked to give the same ids
(`dgpt.data.rank_encoder`); a tokenizer that cannot be expressed that way is encoded by `tokenizers`.

Pre-tokenization (GPT-2's rules) always splits before a space or line break that stands between two
non-space characters, so text cut there (`segments`) encodes, and counts, exactly as the whole text:
long documents are handled in segments of bounded size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dgpt.data.rank_encoder import NotRanks, derive_encoding, disagreement
from dgpt.data.special_tokens import SMALLEST_VOCAB, SPECIAL_TOKENS
from dgpt.errors import DgptError
from dgpt.fileio import atomic_path

logger = logging.getLogger(__name__)
SEGMENT_CHARS = 1 << 16  # longer text is cut into segments of about this many characters
_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")  # the cut goes before the space or line break
_CUT_LOOKBACK = 4096  # where to look for the last cut before the limit first
_TRAIN_REPEATS = 1024  # a counted pre-token goes to the trainer at most this many times per item


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def count_pretokens(texts: Iterable[str]) -> Counter[str]:
    """How often each byte-level pre-token occurs in `texts`: all that BPE training needs to know of them."""
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    return counts


def segments(parts: Iterable[tuple[str, bool]], size: int | None) -> Iterator[tuple[str, bool]]:
    """Documents given as (part, last) pairs, cut anywhere, re-cut into segments of about `size`
    characters at places where pre-tokenization splits anyway, so that the segments of a document encode
    to its tokens. A stretch without such a place stays whole; `size` None gives whole documents."""
    pending = ""
    for part, last in parts:
        text = pending + part if pending else part
        start = 0
        while size is not None and len(text) - start > size:
            cut = _cut(text, start, start + size)
            if cut is None:
                break
            yield text[start:cut], False
            start = cut
        if last:
            yield text[start:], True
            pending = ""
        else:
            pending = text[start:]


def _cut(text: str, start: int, limit: int) -> int | None:
    """The last place to cut in text[start:limit], else the first one after it (None: there is none yet)."""
    for lo in (max(start + 1, limit - _CUT_LOOKBACK), start + 1):
        last = None
        for last in _CUT.finditer(text, lo, limit):
            pass
        if last is not None:
            return last.start()
    after = _CUT.search(text, limit)
    return after.start() if after else None


class TextTokenizer:
    def __init__(self, hf: Tokenizer, source: str = "<tokenizer>"):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise DgptError(f"{source}: tokenizer lacks the special token(s) {', '.join(missing)}")
        self.hf = hf
        self.source = source
        self.eot_id, self.pad_id, self.start_id, self.delim_id, self.extract_id = (
            hf.token_to_id(t) for t in SPECIAL_TOKENS
        )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
        """BPE trained on `texts`, streamed (hand long documents over as `segments`): the tokenizer that
        their pre-token counts train (`train_from_counts`)."""
        return cls._train(texts, _pre_tokenizer(), vocab_size, min_frequency)

    @classmethod
    def train_from_counts(cls, counts: Mapping[str, int], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
        """BPE from pre-token counts (see `count_pretokens`): the tokenizer that the counted text trains."""
        items = ([piece] * min(_TRAIN_REPEATS, count - done) for piece, count in sorted(counts.items())
                 for done in range(0, count, _TRAIN_REPEATS))
        return cls._train(items, None, vocab_size, min_frequency)  # no pre-tokenizer: each string is one pre-token

    @classmethod
    def _train(cls, items: Iterable, pre_tokenizer: pre_tokenizers.PreTokenizer | None, vocab_size: int, min_frequency: int) -> TextTokenizer:
        if vocab_size < SMALLEST_VOCAB:
            raise DgptError(f"tokenizer.vocab_size is {vocab_size}; it must be at least {SMALLEST_VOCAB} (256 bytes + special tokens)")
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizer
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # listed first, so they get ids 0..4
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(items, trainer=trainer)
        hf.pre_tokenizer = _pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        return cls(hf, "<trained>")

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DgptError(f"{path}: tokenizer file not found")
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any parse failure
            raise DgptError(f"{path}: not a valid tokenizer file: {str(e).splitlines()[0] if str(e) else e!r}") from None
        return cls(hf, str(path))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer JSON atomically (path is the file, e.g. run_dir/tokenizer.json)."""
        with atomic_path(path) as tmp:
            self.hf.save(str(tmp))

    @functools.cached_property
    def fast(self) -> tiktoken.Encoding | None:
        """The `tiktoken` encoder that gives this tokenizer's ids (checked on `PROBE` and every token), or None
        (the reason logged) where there is none: `encode` then uses `tokenizers`."""
        try:
            encoding = derive_encoding(self.hf)
        except NotRanks as e:
            logger.info(f"{self.source}: encoding with `tokenizers`: the tokenizer cannot be expressed as tiktoken ranks ({e})")
            return None
        differs = disagreement(self.hf, encoding)
        if differs:
            logger.warning(f"{self.source}: encoding with `tokenizers`: its tiktoken encoder disagrees ({differs})")
            return None
        return encoding

    def encode(self, text: str) -> list[int]:
        """Token ids; text equal to a special token becomes that token."""
        if self.fast is not None:
            return self.fast.encode(text, allowed_special="all")
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (`tiktoken` threads, or `tokenizers`' own pool without offsets)."""
        if self.fast is not None:
            return self.fast.encode_batch(texts, allowed_special="all")
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        """Each text's ids as an array (no Python ints in between), in `threads` threads (tiktoken releases the GIL)."""
        if self.fast is None:
            return [np.array(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]
        encode = functools.partial(self.fast.encode_to_numpy, allowed_special="all")
        if threads == 1 or len(texts) <= 1:
            return list(map(encode, texts))
        step = -(-len(texts) // threads)  # a slice per thread: a future per text costs more than a short text's encoding
        with ThreadPoolExecutor(threads) as pool:
            slices = pool.map(lambda i: list(map(encode, texts[i:i + step])), range(0, len(texts), step))
            return [ids for piece in slices for ids in piece]

    @functools.cached_property
    def encodes_in_segments(self) -> bool:
        """Whether text cut by `segments` encodes as the whole text: pre-tokenization by GPT-2's rules
        (byte-level, no prefix space), no normaliser, and added tokens that neither hold nor strip spaces
        (true of every tokenizer dgpt trains, and of GPT-2's)."""
        spec = json.loads(self.hf.to_str())
        pre = spec.get("pre_tokenizer") or {}
        added = spec.get("added_tokens") or []
        return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                and not pre.get("add_prefix_space") and not any(t.get("lstrip") or t.get("rstrip") or
                                                                re.search(r"\s", t.get("content", "")) for t in added))

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def sha256(self) -> str:
        """Hash of the canonical JSON (sorted keys), so equal tokenizers hash equal wherever they were saved.

        Cached: a tokenizer is never changed after it is built, and the hash is asked for once per shard check.
        """
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
