"""Documents as `prepare` reads them: cleaned, filtered, in parts.

A document travels as (part, last) pairs (see `sources.iter_document_parts`), so none has to fit in
memory. Whether to keep one (too short, a duplicate) is known only at its end: a document of one part
is decided at once, and the cleaned parts of a longer one wait in a temporary file (in TMPDIR) until its end.
"""

from __future__ import annotations

import tempfile
from typing import Iterable, Iterator

from dgpt.data.clean import DocumentCleaner, DocumentFilter
from dgpt.data.sources import PART_CHARS


def kept_parts(parts: Iterable[tuple[str, bool]], keep: DocumentFilter) -> Iterator[tuple[str, bool]]:
    """The raw documents `parts`, cleaned, less those that `keep` drops."""
    cleaner, spill = DocumentCleaner(), None
    try:
        for raw, last in parts:
            text = cleaner.clean(raw, last)
            keep.add(text)
            if not last:
                spill = spill or tempfile.TemporaryFile("w+", encoding="utf-8", newline="")
                spill.write(text)
                continue
            if keep.decide():
                if spill is not None:
                    spill.seek(0)
                    while chunk := spill.read(PART_CHARS):
                        yield chunk, False
                yield text, True
            if spill is not None:
                spill.close()
                spill = None
            cleaner = DocumentCleaner()
    finally:
        if spill is not None:
            spill.close()
