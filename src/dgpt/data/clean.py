"""Text cleaning and document filtering, applied identically when training the tokenizer and sharding."""

from __future__ import annotations

import hashlib
import re
import unicodedata


def _translation_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for code in range(0x10000):  # every Cc, Zs, Zl and Zp character lies in the BMP
        category = unicodedata.category(chr(code))
        if category == "Cc" and chr(code) not in "\n\t":
            table[code] = None  # control characters carry no text
        elif category == "Zs" and code != 0x20:
            table[code] = " "  # NBSP, thin space, ideographic space, ...
        elif category in ("Zl", "Zp"):
            table[code] = "\n"
    return table


_TABLE = _translation_table()
_MANY_NEWLINES = re.compile(r"\n{3,}")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def clean_text(text: str) -> str:
    """Normalise one document. Indentation is kept (code), including that of the first line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_TABLE)
    text = unicodedata.normalize("NFC", text)  # after removing controls, which could split a combining sequence
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _MANY_NEWLINES.sub("\n\n", text)
    return _LEADING_BLANK_LINES.sub("", text).rstrip()


class DocumentFilter:
    """Drops empty and too-short documents and (with dedup) exact duplicates, counting each."""

    def __init__(self, min_chars: int = 0, dedup: bool = True):
        self.min_chars = min_chars
        self.dedup = dedup
        self.kept = 0
        self.duplicates = 0
        self.too_short = 0  # empty documents count here too
        self._seen: set[bytes] = set()  # 16-byte digests: memory grows with unique documents, not their size

    def keep(self, doc: str) -> bool:
        if not doc or len(doc) < self.min_chars:
            self.too_short += 1
            return False
        if self.dedup:
            digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
            if digest in self._seen:
                self.duplicates += 1
                return False
            self._seen.add(digest)
        self.kept += 1
        return True
