"""Documents from an oracle's sources: text files, directories, globs, JSONL files, Hugging Face datasets.

Everything streams line by line, so a source may be larger than memory, and a document of a text file
longer than `PART_CHARS` arrives in parts (whole lines), so a document may be too (a single line, JSONL
record or dataset row is held whole). A large text or JSONL file can also be read in byte ranges that start
and end between documents (`document_cuts`): their documents are those of the whole file. Bad input raises a
one-line DgptError naming the file (and line).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator

from dgpt.errors import DgptError
from dgpt.fileio import parse_json

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")
SEPARATORS = ("blank_line", "line", "file")
PART_CHARS = 1 << 20  # a longer document of a text file arrives in parts of about this many characters


def input_files(spec: str) -> list[Path]:
    """The files a spec names, sorted; [] for a Hugging Face spec. Raises if it names nothing."""
    if spec.startswith("hf:"):
        return []
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DgptError(f"{spec}: directory holds no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    if path.is_file():
        return [path]
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DgptError(f"{spec}: glob matches no files")
        return files
    raise DgptError(f"{spec}: file not found")


def iter_documents(spec: str, *, text_field: str = "text", doc_separator: str = "blank_line") -> Iterator[str]:
    """Yield the raw (uncleaned) documents of one source spec, each one whole."""
    parts: list[str] = []
    for part, last in iter_document_parts(spec, text_field=text_field, doc_separator=doc_separator):
        parts.append(part)
        if last:
            yield "".join(parts)
            parts = []


def iter_document_parts(spec: str, *, text_field: str = "text", doc_separator: str = "blank_line") -> Iterator[tuple[str, bool]]:
    """The raw documents of one source spec as (part, last) pairs: a document is its parts joined, the
    one with `last` true ending it. Every part but the last ends with a line break."""
    if doc_separator not in SEPARATORS:
        raise DgptError(f"{spec}: doc_separator is {doc_separator!r}; expected one of {', '.join(SEPARATORS)}")
    if spec.startswith("hf:"):
        yield from ((doc, True) for doc in _hf_documents(spec, text_field))
        return
    for path in input_files(spec):
        yield from file_document_parts(path, text_field=text_field, doc_separator=doc_separator)


def file_document_parts(path: Path, *, text_field: str = "text", doc_separator: str = "blank_line",
                        start: int = 0, end: int | None = None) -> Iterator[tuple[str, bool]]:
    """`iter_document_parts` of one file, or of its bytes start..end (between two of its `document_cuts`)."""
    count = 0
    lines = _lines(path, start, end)
    parts = ((doc, True) for doc in _jsonl_documents(path, lines, text_field)) if path.suffix == ".jsonl" else _text_parts(lines, doc_separator)
    for part, last in parts:
        count += last
        yield part, last
    if count == 0 and start == 0:  # a range after the first may hold only blank lines; the first has a document
        raise DgptError(f"{path}: empty file (no documents)")


def document_cuts(path: Path, doc_separator: str, part_bytes: int) -> list[int]:
    """Offsets about `part_bytes` apart where the file can be cut between documents: each after a line of text
    and, with blank-line separators, the blank line after it (so each range before a cut holds a document)."""
    size = path.stat().st_size
    if size <= part_bytes or (doc_separator == "file" and path.suffix != ".jsonl"):
        return []
    per_line = path.suffix == ".jsonl" or doc_separator == "line"
    cuts: list[int] = []
    with open(path, "rb") as f:
        while (cuts[-1] if cuts else 0) + part_bytes < size:
            at = f.seek((cuts[-1] if cuts else 0) + part_bytes)
            rest = f.readline()  # of the line the offset falls in; the range before the cut holds all of it
            at += len(rest)
            text_before = bool(rest.decode("utf-8", errors="replace").strip())
            for raw in f:
                at += len(raw)
                blank = not raw.decode("utf-8", errors="replace").strip()
                if text_before and (per_line or blank):
                    break
                text_before = not blank
            else:
                break
            cuts.append(at)
    return cuts


def _lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) pairs of the lines from byte `start` (a line's start) to `end`; bytes that
    are not UTF-8 are an error naming file:line."""
    with open(path, "rb") as f:
        f.seek(start)
        at = start
        for number, raw in enumerate(f, start=1):
            if end is not None and at >= end:
                break
            at += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                number += _newlines_before(path, start)
                raise DgptError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if number == 1 and start == 0 and line.startswith("\ufeff"):
                line = line[1:]  # a byte-order mark is not text
            yield number, line


def _newlines_before(path: Path, offset: int) -> int:
    """How many lines the file has before byte `offset`: what a range's line numbers are counted from."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n")


def _text_parts(numbered: Iterator[tuple[int, str]], separator: str) -> Iterator[tuple[str, bool]]:
    """A text file's documents in parts. A part is sent once it holds PART_CHARS characters and some text
    (a document of blank lines alone is none), keeping its last line back so that the final part, whose
    trailing line breaks are dropped, is never empty."""
    lines: list[str] = []
    size, text_seen = 0, False
    for _, line in numbered:
        blank = not line.strip()
        if separator == "line":
            if not blank:
                yield line.rstrip("\r\n"), True
            continue
        if separator == "blank_line" and blank:
            if lines:
                yield "".join(lines).rstrip("\r\n"), True
                lines, size = [], 0
            continue
        lines.append(line)
        size += len(line)
        text_seen = text_seen or not blank
        if size >= PART_CHARS and text_seen and len(lines) > 1:
            yield "".join(lines[:-1]), False
            lines, size = lines[-1:], len(lines[-1])
    if lines and text_seen:
        yield "".join(lines).rstrip("\r\n"), True


def iter_jsonl_rows(path: Path, lines: Iterator[tuple[int, str]] | None = None) -> Iterator[tuple[str, object]]:
    """("file:line", parsed JSON) for every non-blank line of a JSONL file (or of those of its `lines`)."""
    for number, line in lines or _lines(path):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except json.JSONDecodeError as e:
            raise DgptError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        yield f"{path}:{number}", row


def _jsonl_documents(path: Path, lines: Iterator[tuple[int, str]], field: str) -> Iterator[str]:
    for where, row in iter_jsonl_rows(path, lines):
        yield _text_of(row, field, where)


def _text_of(row: object, field: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        raise DgptError(f"{where}: no '{field}' field")
    value = row[field]
    if not isinstance(value, str):
        raise DgptError(f"{where}: field '{field}' is {type(value).__name__}, not a string")
    return value


def _hf_documents(spec: str, field: str) -> Iterator[str]:
    for where, row in iter_hf_rows(spec):
        yield _text_of(row, field, where)


def iter_hf_rows(spec: str) -> Iterator[tuple[str, dict]]:
    """("SPEC row i", row) for a Hugging Face dataset spec hf:NAME[:CONFIG]:SPLIT, streamed."""
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DgptError(f"{spec}: expected hf:NAME[:CONFIG]:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError:
        raise DgptError(f"{spec}: the 'datasets' package is not installed (pip install 'dgpt[hf]')") from None
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True, **no_remote_code(datasets.__version__, spec))
    except Exception as e:  # the hub raises many types; the user needs one line
        raise DgptError(f"{spec}: cannot load dataset: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for i, row in enumerate(rows):
        yield f"{spec} row {i}", row


def no_remote_code(version: str, spec: str) -> dict:
    """The keyword that keeps `datasets.load_dataset` from running a dataset's own script: none from 4.0 (which
    runs no scripts), `trust_remote_code=False` from 2.16; older versions run scripts unasked and are refused."""
    major, minor = (int(p) if p.isdigit() else 0 for p in (version.split(".") + ["0"])[:2])
    if major >= 4:
        return {}
    if (major, minor) >= (2, 16):
        return {"trust_remote_code": False}
    raise DgptError(f"{spec}: datasets {version} may run a dataset's remote code; install datasets>=2.18 (pip install 'dgpt[hf]')")
