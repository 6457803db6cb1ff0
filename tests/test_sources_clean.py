"""Sources (files, directories, globs, JSONL, hf: specs) and cleaning/filtering of documents, whole and in parts."""

from __future__ import annotations

import importlib.util
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgpt.data import sources
from dgpt.data.clean import _TABLE, DocumentCleaner, DocumentFilter, clean_text
from dgpt.data.sources import input_files, iter_document_parts, iter_documents
from dgpt.errors import DgptError


def docs(spec, **kwargs) -> list[str]:
    return list(iter_documents(str(spec), **kwargs))


def test_blank_lines_separate_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\nstill one\n\n\n  \ntwo\n   indented\n\nthree", encoding="utf-8")
    assert docs(path) == ["one\nstill one", "two\n   indented", "three"]
    assert docs(path, doc_separator="line") == ["one", "still one", "two", "   indented", "three"]
    assert docs(path, doc_separator="file") == ["one\nstill one\n\n\n  \ntwo\n   indented\n\nthree"]


def test_crlf_and_bom_are_handled(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\n\r\ntwo\r\n")
    assert [clean_text(d) for d in docs(path)] == ["one", "two"]


def test_directory_and_glob_are_sorted_and_filtered_by_suffix(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "sub" / "c.rst").write_text("sea", encoding="utf-8")
    (tmp_path / "sub" / "d.jsonl").write_text('{"text": "dee"}\n', encoding="utf-8")
    (tmp_path / "skip.py").write_text("ignored", encoding="utf-8")
    assert docs(tmp_path) == ["ay", "bee", "sea", "dee"]
    assert docs(tmp_path / "*.txt") == ["ay"]
    assert docs(tmp_path / "**" / "*.rst") == ["sea"]
    assert input_files("hf:some/name:train") == []


def test_jsonl_reads_the_named_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "first", "x": 1}\n\n{"body": "second\\n\\nsame doc"}\n', encoding="utf-8")
    assert docs(path, text_field="body") == ["first", "second\n\nsame doc"]


def test_documents_stream_before_a_later_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"first\n\n" + b"x\n" * 1000 + b"\xff\n")
    stream = iter_documents(str(path))
    assert next(stream) == "first"  # yielded before the bad byte further down was read
    with pytest.raises(DgptError, match=r"a\.txt:1003: not valid UTF-8"):
        list(stream)


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("missing.txt", None, {}, r"missing\.txt: file not found"),
        ("empty.txt", b"", {}, r"empty\.txt: empty file"),
        ("bad.txt", b"ok\nfine \xc3\x28 here\n", {}, r"bad\.txt:2: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', {}, r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', {}, r"nofield\.jsonl:3: no 'text' field"),
        ("notobj.jsonl", b'["text"]\n', {}, r"notobj\.jsonl:1: no 'text' field"),
        ("int.jsonl", b'{"text": 5}\n', {}, r"int\.jsonl:1: field 'text' is int, not a string"),
        ("sep.txt", b"x", {"doc_separator": "para"}, r"sep\.txt: doc_separator is 'para'"),
    ],
)
def test_bad_input_names_the_file(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DgptError, match=message) as info:
        docs(path, **kwargs)
    assert "\n" not in str(info.value)


def test_glob_matching_nothing_and_empty_directory(tmp_path):
    with pytest.raises(DgptError, match=r"nothing\*\.txt: glob matches no files"):
        docs(tmp_path / "nothing*.txt")
    with pytest.raises(DgptError, match="directory holds no"):
        docs(tmp_path)


def test_hf_spec_errors():
    with pytest.raises(DgptError, match=r"hf:onlyname: expected hf:NAME\[:CONFIG\]:SPLIT"):
        docs("hf:onlyname")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DgptError, match="'datasets' package is not installed"):
            docs("hf:wikitext:wikitext-2-raw-v1:train")


def test_clean_text_rules():
    assert clean_text("a\r\nb\rc") == "a\nb\nc"
    assert clean_text("e\u0301") == "\u00e9"  # NFC
    assert clean_text("a\x00b\x1bc\x7f\td") == "abc\td"  # controls removed, tab kept
    assert clean_text("e\x00\u0301") == "\u00e9"  # NFC after removing the control between them
    assert clean_text("a\u00a0b\u2009c\u3000d") == "a b c d"
    assert clean_text("line   \nnext\t\n") == "line\nnext"
    assert clean_text("a\n\n\n\n\nb\n\n \n\nc") == "a\n\nb\n\nc"
    assert clean_text("\n \n  \n\n    def f():\n        return 1\n\n  ") == "    def f():\n        return 1"
    assert clean_text(" \x00\u00a0\n\t") == ""


def test_document_filter_counts():
    keep = DocumentFilter(min_chars=3, dedup=True)
    results = [keep.keep(d) for d in ["", "ab", "abc", "abcd", "abc", "abcd", "xyz"]]
    assert results == [False, False, True, True, False, False, True]
    assert (keep.kept, keep.duplicates, keep.too_short) == (3, 2, 2)
    no_dedup = DocumentFilter(min_chars=0, dedup=False)
    assert all(no_dedup.keep("same") for _ in range(3)) and no_dedup.duplicates == 0


def reference_clean(text: str) -> str:
    """The cleaning rules written out on the whole document, as dgpt applied them before documents came in parts."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n").translate(_TABLE))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.split("\n")))
    return re.sub(r"\A(?:[ \t]*\n)+", "", text).rstrip()


_LINES = ["", " ", "  x", "word", "e\u0301", "\u0301", "\x00", "\u00a0", "\u2028", "\t", "a\r", "\rb", "tail  "]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_LINES) | st.text(max_size=5), max_size=20), st.sets(st.integers(0, 19)))
def test_cleaning_in_parts_equals_cleaning_the_whole(lines, cuts):
    text = "\n".join(lines)
    breaks = [i + 1 for i, c in enumerate(text) if c == "\n"]  # parts end with a line break
    bounds = sorted({breaks[c] for c in cuts if c < len(breaks)})
    parts = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    cleaner = DocumentCleaner()
    assert "".join(cleaner.clean(p, i == len(parts) - 1) for i, p in enumerate(parts)) == clean_text(text) == reference_clean(text)


def test_long_documents_arrive_in_parts_of_whole_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PART_CHARS", 30)
    path = tmp_path / "a.txt"
    long = "".join(f"line {i} of the long one\r\n" for i in range(20))
    path.write_text(f"short\n\n{long}\n  \n\nafter\n", encoding="utf-8", newline="")
    parts = list(iter_document_parts(str(path)))
    assert [last for _, last in parts].count(True) == 3 and len(parts) > 10
    assert all(p.endswith("\n") for p, last in parts if not last)
    assert docs(path) == ["short", long.rstrip("\r\n"), "after"]
    assert docs(path, doc_separator="file") == [path.read_bytes().decode("utf-8").rstrip("\r\n")]
    (tmp_path / "blank.txt").write_text(" \n" * 100, encoding="utf-8")
    with pytest.raises(DgptError, match="empty file"):  # blank lines alone are no document, however many
        docs(tmp_path / "blank.txt", doc_separator="file")


def test_document_filter_takes_documents_in_parts():
    whole, parts = DocumentFilter(min_chars=5), DocumentFilter(min_chars=5)
    for doc in ["abcdef", "ab", "abcdef", "abcdeg", "abc"]:
        for piece in (doc[:2], doc[2:4], doc[4:]):
            parts.add(piece)
        assert parts.decide() == whole.keep(doc)
    assert (parts.kept, parts.duplicates, parts.too_short) == (whole.kept, whole.duplicates, whole.too_short) == (2, 1, 2)
