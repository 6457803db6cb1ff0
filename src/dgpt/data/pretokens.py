"""Pre-token count files: what an oracle shares so that a tokenizer can be trained without its text.

An oracle runs `dgpt count-pretokens CONFIG --oracle NAME` on its own machine; the file holds how often
each byte-level pre-token (a word with its leading space, a run of digits or punctuation) occurs in its
cleaned training documents (its sample of `tokenizer.train_bytes`): a bag of words, no document and no word order. With every oracle's file
listed in `tokenizer.counts`, `dgpt prepare` on any machine trains the same tokenizer, equal to the one
trained on the pooled text. `min_count` > 1 leaves out the oracle's rarest pre-tokens (names, numbers)
at the price of that equality.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dgpt.errors import DgptError
from dgpt.fileio import read_json_object, write_json

FORMAT = "dgpt-pretoken-counts/1"


def write_counts(path: str | Path, oracle: str, counts: Counter[str], documents: int, cleaning: dict, min_count: int = 1) -> int:
    """Write one oracle's counts (those seen at least `min_count` times) atomically; return how many kept."""
    kept = {piece: n for piece, n in sorted(counts.items()) if n >= min_count}
    write_json(path, {"format": FORMAT, "oracle": oracle, "documents": documents, "cleaning": cleaning,
                      "min_count": min_count, "counts": kept})
    return len(kept)


def read_counts(path: str | Path) -> dict:
    """One count file, checked: its format, oracle name, cleaning settings and a {pre-token: count >= 1} map."""
    data = read_json_object(path, "pre-token count file not found")
    if data.get("format") != FORMAT:
        raise DgptError(f"{path}: not a pre-token count file (format {data.get('format')!r}, expected {FORMAT!r})")
    for key, kind in (("oracle", str), ("cleaning", dict), ("counts", dict)):
        if not isinstance(data.get(key), kind):
            raise DgptError(f"{path}: field '{key}' is missing or not a {kind.__name__}")
    bad = next((p for p, n in data["counts"].items() if type(n) is not int or n < 1), None)
    if bad is not None:
        raise DgptError(f"{path}: count of pre-token {bad!r} is {data['counts'][bad]!r}, expected an integer >= 1")
    return data


def merge_counts(paths: list[str], cleaning: dict) -> tuple[Counter[str], list[str]]:
    """The summed counts of several oracles' files and the oracles they came from. Every file must come
    from a different oracle and from this config's cleaning and sample settings (else the merged counts describe
    text that `prepare` would never write)."""
    total: Counter[str] = Counter()
    seen: dict[str, str] = {}
    for path in paths:
        data = read_counts(path)
        oracle = data["oracle"]
        if oracle in seen:
            raise DgptError(f"{path}: oracle '{oracle}' was already counted in {seen[oracle]}")
        if data["cleaning"] != cleaning:
            raise DgptError(f"{path}: counted with cleaning and sample settings {data['cleaning']}, but this config has {cleaning}")
        seen[oracle] = str(path)
        total.update(data["counts"])
    return total, list(seen)
