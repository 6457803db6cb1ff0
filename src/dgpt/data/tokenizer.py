"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with GPT-1's special tokens at ids 0..4.

Byte-level means every string encodes, and `decode(encode(s)) == s` for every string: text equal to
a special token encodes to that token's id and decodes back to the same text.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dgpt.errors import DgptError
from dgpt.fileio import atomic_path

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|start|>", "<|delim|>", "<|extract|>")
_BYTE_ALPHABET = 256


class TextTokenizer:
    def __init__(self, hf: Tokenizer, source: str = "<tokenizer>"):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise DgptError(f"{source}: tokenizer lacks the special token(s) {', '.join(missing)}")
        self.hf = hf
        self.eot_id, self.pad_id, self.start_id, self.delim_id, self.extract_id = (
            hf.token_to_id(t) for t in SPECIAL_TOKENS
        )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
        smallest = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
        if vocab_size < smallest:
            raise DgptError(f"tokenizer.vocab_size is {vocab_size}; it must be at least {smallest} (256 bytes + special tokens)")
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # listed first, so they get ids 0..4
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
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

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel in Rust (offsets are not computed: faster)."""
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

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
