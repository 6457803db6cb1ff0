"""The offline demo's three oracles, built from text that every Python installation carries.

- stdlib_text_net: docstrings of the text-processing and network modules;
- stdlib_numeric_data: docstrings of the numeric and data-structure modules;
- stdlib_source: source code of a fixed list of standard-library files.

Plain introspection (`vars`, `__doc__`) keeps the output deterministic for a given Python: sorted
names, no reprs, so no memory addresses. Every 10th document goes to valid.txt.
"""

from __future__ import annotations

import importlib
import re
import sysconfig
import textwrap
import warnings
from pathlib import Path
from typing import Iterator

from dgpt.config import OracleConfig
from dgpt.fileio import write_text

TEXT_NET_MODULES = (
    "argparse asynchat asyncio.base_events asyncio.events asyncio.protocols asyncio.selector_events "
    "asyncio.sslproto asyncio.streams asyncio.transports asyncore base64 cgi codecs configparser csv "
    "difflib email email._header_value_parser email.charset email.contentmanager email.feedparser "
    "email.generator email.header email.headerregistry email.iterators email.message email.mime.base "
    "email.mime.multipart email.parser email.policy email.utils encodings.idna encodings.punycode ftplib "
    "gettext html html.parser http.client http.cookiejar http.cookies http.server imaplib ipaddress json "
    "json.decoder json.encoder locale logging logging.handlers mailbox mailcap mimetypes netrc nntplib "
    "poplib quopri re selectors shlex smtpd smtplib socket socketserver ssl string stringprep telnetlib "
    "textwrap tokenize unicodedata urllib.error urllib.parse urllib.request urllib.robotparser uu "
    "wsgiref.handlers wsgiref.headers wsgiref.simple_server xml.dom.expatbuilder xml.dom.minidom "
    "xml.dom.pulldom xml.etree.ElementTree xml.sax.handler xml.sax.saxutils xml.sax.xmlreader "
    "xmlrpc.client xmlrpc.server"
).split()
NUMERIC_DATA_MODULES = (
    "abc aifc array asyncio.queues audioop bisect builtins bz2 calendar chunk cmath collections "
    "collections.abc colorsys concurrent.futures contextlib contextvars copy copyreg ctypes dataclasses "
    "datetime dbm decimal enum filecmp fileinput fractions functools graphlib gzip hashlib heapq hmac "
    "imghdr io itertools lzma math mmap multiprocessing.managers multiprocessing.pool "
    "multiprocessing.shared_memory numbers operator os pickle pickletools plistlib pprint queue random "
    "reprlib sched secrets shelve shutil sndhdr sqlite3 stat statistics struct sunau tarfile tempfile "
    "threading time timeit tracemalloc types typing uuid wave weakref xdrlib zipfile zipimport zlib "
    "zoneinfo"
).split()
SOURCE_FILES = (
    "argparse.py ast.py bisect.py calendar.py collections/__init__.py configparser.py contextlib.py csv.py "
    "dataclasses.py difflib.py fractions.py functools.py heapq.py json/decoder.py json/encoder.py pprint.py "
    "queue.py random.py shlex.py statistics.py string.py textwrap.py tokenize.py"
).split()
VALID_EVERY = 10
_BLANK_LINES = re.compile(r"\n[ \t]*\n+")
_TOP_LEVEL_START = re.compile(r"(?:def |class |async def |@)")


def write_embedded_corpora(dest: Path) -> list[OracleConfig]:
    """Write dest/<oracle>/{train,valid}.txt for the three demo oracles and return their configs."""
    dest = Path(dest)
    corpora = {
        "stdlib_text_net": _docstrings(TEXT_NET_MODULES),
        "stdlib_numeric_data": _docstrings(NUMERIC_DATA_MODULES),
        "stdlib_source": _source_chunks(SOURCE_FILES),
    }
    oracles = []
    for name, docs in corpora.items():
        splits: dict[str, list[str]] = {"train": [], "valid": []}
        for i, doc in enumerate(docs):
            # blank lines inside a document would split it under doc_separator = "blank_line"
            doc = _BLANK_LINES.sub("\n", doc.strip())
            if doc:
                splits["valid" if i % VALID_EVERY == VALID_EVERY - 1 else "train"].append(doc)
        for split, items in splits.items():
            _write_if_changed(dest / name / f"{split}.txt", "\n\n".join(items) + "\n")
        oracles.append(OracleConfig(name=name, train=[str(dest / name / "train.txt")], valid=[str(dest / name / "valid.txt")]))
    return oracles


def _write_if_changed(path: Path, text: str) -> None:
    """Leave an identical file untouched: its mtime is part of the fingerprint that lets `prepare` reuse work."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)


def _docstrings(module_names: list[str]) -> Iterator[str]:
    """'name\\n<docstring>' for each module and each class, function and method defined in it."""
    seen: set[str] = set()  # a docstring shared by many methods (`Return self+value.`) is kept once
    for module_name in module_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. deprecated modules announce themselves on import
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # an optional module (ssl, sqlite3, ...) missing from this build
                continue
            yield from _documented(module_name, module, seen)
            owners = (module_name, "_" + module_name.rsplit(".", 1)[-1])  # C accelerators: _heapq, _decimal, ...
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) not in owners:
                    continue
                yield from _documented(f"{module_name}.{name}", obj, seen)
                if isinstance(obj, type):
                    for attr, member in sorted(vars(obj).items()):
                        if not attr.startswith("_") or attr.endswith("__"):  # public and dunder methods
                            yield from _documented(f"{module_name}.{name}.{attr}", member, seen)


def _documented(qualname: str, obj: object, seen: set[str]) -> Iterator[str]:
    doc = getattr(obj, "__doc__", None)
    # not the generic docstring of the object's type (property, int, ...)
    if isinstance(doc, str) and doc.strip() and doc is not getattr(type(obj), "__doc__", None) and doc not in seen:
        seen.add(doc)
        first, _, rest = doc.expandtabs().strip().partition("\n")
        yield f"{qualname}\n{first.strip()}\n{textwrap.dedent(rest)}".rstrip()


def _source_chunks(files: list[str]) -> Iterator[str]:
    """Each file split at its top-level definitions (a decorator stays with what it decorates)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for relative in files:
        path = stdlib / relative
        if not path.is_file():  # a file removed in this Python version
            continue
        chunk: list[str] = [f"# {relative}"]
        previous = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            starts = _TOP_LEVEL_START.match(line) and not previous.startswith("@")
            if starts and len(chunk) > 1:
                yield "\n".join(chunk)
                chunk = []
            chunk.append(line)
            if line.strip():
                previous = line
        yield "\n".join(chunk)
