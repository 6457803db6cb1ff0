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
_TRANSLATED = re.compile("[" + "".join(map(re.escape, map(chr, sorted(_TABLE)))) + "]")  # finding one is faster than translating
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise one document. Indentation is kept (code), including that of the first line."""
    return DocumentCleaner().clean(text, last=True)


class DocumentCleaner:
    """`clean_text` for a document that arrives in parts, each but the last ending with a line break: the
    cleaned parts joined are the cleaned document. Every rule works on whole lines (a line break is a safe
    place to cut for NFC too), so only whether text was written yet and whether blank lines follow it are
    carried from one part to the next."""

    def __init__(self) -> None:
        self.started = False  # some text was returned
        self.blank = False  # blank lines came after it

    def clean(self, part: str, last: bool) -> str:
        part = part.replace("\r\n", "\n").replace("\r", "\n")
        if _TRANSLATED.search(part):
            part = part.translate(_TABLE)
        part = unicodedata.normalize("NFC", part)  # after removing controls, which could split a combining sequence
        lines = part.split("\n")
        if not last:
            lines.pop()  # the empty string after the part's final line break
        body = "\n".join(line.rstrip() for line in lines)
        if "\n\n\n" in body:  # a substring search is many times faster than the regex that finds none
            body = _MANY_NEWLINES.sub("\n\n", body)
        text = body.strip("\n")  # the lines are right-stripped: this drops the blank ones at either end
        if not text:
            self.blank = self.started
            return ""
        sep = ("\n\n" if self.blank or body.startswith("\n") else "\n") if self.started else ""
        self.started, self.blank = True, body.endswith("\n")
        return sep + text


class DocumentFilter:
    """Drops empty and too-short documents and (with dedup) exact duplicates, counting each. A document is
    judged whole (`keep`) or in parts (`add` each, then `decide`). `digests` lists the kept documents' hashes
    in order (with dedup), for a merge that drops the duplicates of documents that another filter kept."""

    def __init__(self, min_chars: int = 0, dedup: bool = True):
        self.min_chars = min_chars
        self.dedup = dedup
        self.kept = 0
        self.duplicates = 0
        self.too_short = 0  # empty documents count here too
        self._seen: set[bytes] = set()  # 16-byte digests: memory grows with unique documents, not their size
        self.digests: list[bytes] = []
        self._chars = 0
        self._hash = hashlib.blake2b(digest_size=16)

    def keep(self, doc: str) -> bool:
        self.add(doc)
        return self.decide()

    def add(self, part: str) -> None:
        """Take in the next part of the current document."""
        self._chars += len(part)
        if self.dedup:
            self._hash.update(part.encode("utf-8"))

    def decide(self) -> bool:
        """Whether to keep the document whose parts were added; the next `add` starts another."""
        chars, digest = self._chars, self._hash.digest()
        self._chars, self._hash = 0, hashlib.blake2b(digest_size=16)
        if not chars or chars < self.min_chars:
            self.too_short += 1
            return False
        if self.dedup:
            if digest in self._seen:
                self.duplicates += 1
                return False
            self._seen.add(digest)
            self.digests.append(digest)
        self.kept += 1
        return True
