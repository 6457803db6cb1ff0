"""Preprocessing speed and memory: `dgpt prepare` on corpora of growing size, on `pretrain_large` and on one very
long document; the `tokenizers` and `tiktoken` encoders alone; the tokenizer's training sample against all the text;
the loader against training.

Run (from the project root, venv active, nothing else running; ~10 min on 2 CPU cores, ~2 min with --quick):

    python benchmarks/preprocess.py [--quick] [--rounds 2] [--large-mb N] [--doc-mb N] [--keep-dir DIR] [--out DIR]

Cases, each `python -m dgpt prepare CONFIG` in a fresh process (peak RSS: the largest sum of the resident memory
of it and of the worker processes it starts, read together every 20 ms), sizes in alternating order (1 4 16, 16 4 1, ...), median of
`--rounds`:
- `Kx`: the four ../shared/data/pretrain/*/train.txt concatenated (valid: their valid.txt), written K times
  into one oracle's train file, with a BPE tokenizer (8192 tokens) trained once beforehand (timed separately)
  and given via `tokenizer.path`, so the run measures the sharding pipeline: read, clean, encode, write.
  `data.dedup = false`, or the repeated copies would be dropped as duplicates instead of encoded.
- `long document`: the 1x text with its blank lines removed, repeated to `--doc-mb` MB: one document.
- `pretrain_large`: ../shared/data/pretrain_large (two oracles, ~114 MB; `--large-mb N`: the first N MB of
  each domain's train file, cut between documents), training the tokenizer (8192 tokens) on its default sample
  (`tokenizer.train_bytes`) and on all the text (`train_bytes = 0`), once each, and with the sample-trained
  tokenizer given. The two trained tokenizers' bytes per token on each validation set compare the sample with all.
Encoders: each domain's cleaned training text in `prepare`'s segments, encoded in ~1 MB batches by `tokenizers`
(`encode_batch_fast`, its own thread pool) and by the derived `tiktoken` encoder (`encode_arrays`, 2 threads), each
in a fresh process (the text held in memory; seconds: the encoding alone), with a hash of all the ids of each.
Targets (on 2 cores): `prepare` of pretrain_large >= 15 MB/s with the tokenizer given, >= 8 MB/s training it; peak
RSS below 500 MiB in every case.
Loader: `WindowSampler.sample(8)` batches/s against training steps/s (InnerLoop, batch 8, eager) of the
`tiny` preset and the throughput config, interleaved; target >= 20x. Writes OUT/preprocess.md.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _timing import RESULTS, interleaved, machine_load, python_child, run_measured, table, write_report
import torch  # after _timing, which sets OMP_WAIT_POLICY

from dgpt.config import PretrainConfig, TokenizerConfig, config_from_dict, dump_config, load_config
from dgpt.data.prepare import prepare
from dgpt.data.loader import WindowSampler
from dgpt.data.shards import load_split, read_manifest
from dgpt.data.tokenizer import TextTokenizer
from dgpt.model.config import PRESETS, GPTConfig
from dgpt.model.gpt import GPT
from dgpt.train.local import InnerLoop

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
LARGE = DATA.parent / "pretrain_large"
GIVEN_TARGET, TRAINED_TARGET, RSS_TARGET_MIB, LOADER_TARGET, BATCH, VOCAB = 15.0, 8.0, 500, 20.0, 8, 8192

# One encoder on one corpus in a fresh process: prints {"seconds", "mb", "sha256" of all ids, "fast"}
ENCODE_SCRIPT = """
import hashlib, json, sys, time
from pathlib import Path
import numpy as np
from dgpt.data.clean import DocumentFilter
from dgpt.data.documents import kept_parts
from dgpt.data.sources import file_document_parts
from dgpt.data.tokenizer import SEGMENT_CHARS, TextTokenizer, segments
encoder, corpus, path = sys.argv[1:]
tok = TextTokenizer.load(path)
texts = [t for t, _ in segments(kept_parts(file_document_parts(Path(corpus)), DocumentFilter()), SEGMENT_CHARS)]
batches, size = [[]], 0
for text in texts:
    batches[-1].append(text)
    size += len(text)
    if size >= 1 << 20:
        batches, size = batches + [[]], 0
digest, seconds = hashlib.sha256(), 0.0
for batch in batches:
    t0 = time.perf_counter()
    if encoder == "tokenizers":
        ids = [e.ids for e in tok.hf.encode_batch_fast(batch, add_special_tokens=False)]
    else:
        ids = tok.encode_arrays(batch, threads=2)
    seconds += time.perf_counter() - t0
    for one in ids:
        digest.update(np.asarray(one, dtype=np.uint32).tobytes())
mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
print(json.dumps({"seconds": seconds, "mb": mb, "sha256": digest.hexdigest(), "fast": tok.fast is not None}))
"""


def build_corpus(root: Path, copies: list[int], doc_mb: int) -> tuple[dict[str, Path], Path]:
    """{case: train file} for the Kx cases and the long document, and the shared valid file."""
    train = b"".join(p.read_bytes().rstrip(b"\n") + b"\n\n" for p in sorted(DATA.glob("*/train.txt")))
    valid = root / "valid.txt"
    valid.write_bytes(b"".join(p.read_bytes().rstrip(b"\n") + b"\n\n" for p in sorted(DATA.glob("*/valid.txt"))))
    paths = {}
    for k in copies:
        paths[f"{k}x"] = root / f"train_x{k}.txt"
        paths[f"{k}x"].write_bytes(train * k)
    lines = b"".join(line + b"\n" for line in train.split(b"\n") if line.strip())
    paths["long document"] = root / "train_one_document.txt"
    with open(paths["long document"], "wb") as f:
        for _ in range(max(1, doc_mb * 10**6 // len(lines))):
            f.write(lines)
    return paths, valid


def large_corpus(root: Path, mb: int) -> dict[str, tuple[Path, Path]]:
    """{domain: (train, valid)} of pretrain_large; with `mb`, the first `mb` MB of each train file (whole documents)."""
    domains = {}
    for folder in sorted(p for p in LARGE.iterdir() if (p / "train.txt").is_file()):
        train = folder / "train.txt"
        if mb:
            with open(train, "rb") as f:
                head = f.read(mb * 10**6)
            train = root / f"{folder.name}_train.txt"
            train.write_bytes(head[: head.rfind(b"\n\n")] if b"\n\n" in head else head)
        domains[folder.name] = (train, folder / "valid.txt")
    return domains


def write_config(root: Path, name: str, oracles: dict[str, tuple[Path, Path]], tokenizer: Path | dict, dedup: bool) -> Path:
    """A config for `prepare`; `tokenizer`: a tokenizer.json to give, or settings to train one with."""
    settings = {"path": str(tokenizer)} if isinstance(tokenizer, Path) else {"vocab_size": VOCAB, **tokenizer}
    config = config_from_dict({
        "run_dir": str(root / name), "tokenizer": settings, "data": {"dedup": dedup},
        "oracles": [{"name": o, "train": [str(train)], "valid": [str(valid)]} for o, (train, valid) in oracles.items()],
    })
    path = root / f"{name}.toml"
    path.write_text(dump_config(config))
    return path


def measure(name: str, config: Path) -> tuple[float, float]:
    sec, rss, rc, out = run_measured(python_child("-m", "dgpt", "prepare", str(config)), {"TQDM_DISABLE": "1"}, children=True)
    if rc != 0:
        raise SystemExit(f"dgpt prepare failed (exit {rc}):\n{out}")
    print(f"prepare {name}: {sec:.1f}s, peak RSS {rss:.0f} MiB", flush=True)
    return sec, rss


def prepare_rows(root: Path, prefix: str, cases: dict[str, tuple[dict, Path | dict, bool, float | None]], rounds: int
                 ) -> tuple[list[list], dict[str, dict[str, float]]]:
    """One row per case {label: (oracles, tokenizer, dedup, target MB/s or None)}: MB, median seconds and peak RSS; and each
    case's bytes per token on each oracle's validation set. Each run's tokenizer is kept as ROOT/NAME.tokenizer.json
    (NAME: PREFIX + case index + round)."""
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in cases}
    valid: dict[str, dict[str, float]] = {}
    for r in range(rounds):
        for label in list(cases) if r % 2 == 0 else reversed(list(cases)):
            oracles, tokenizer, dedup, _ = cases[label]
            name = f"{prefix}{list(cases).index(label)}_r{r}"
            results[label].append(measure(name, write_config(root, name, oracles, tokenizer, dedup)))
            valid[label] = {o: read_manifest(root / name / "data" / o)["splits"]["valid"]["bytes_per_token"] for o in oracles}
            shutil.move(root / name / "tokenizer.json", root / f"{name}.tokenizer.json")
            shutil.rmtree(root / name)
    rows = []
    for label, (oracles, _, _, target) in cases.items():
        mb = sum(train.stat().st_size + valid_.stat().st_size for train, valid_ in oracles.values()) / 1e6
        sec = statistics.median(s for s, _ in results[label])
        rss = statistics.median(m for _, m in results[label])
        rows.append([label, f"{mb:.1f}", f"{sec:.1f}", f"**{mb / sec:.1f}**", f"**{rss:,.0f}**",
                     f">= {target:.0f}: " + ("met" if mb / sec >= target else "NOT met") if target else "-",
                     "met" if rss < RSS_TARGET_MIB else "NOT met"])
    return rows, valid


def encoder_rows(domains: dict[str, tuple[Path, Path]], tokenizer: Path) -> list[list]:
    """`tokenizers` against `tiktoken` on each domain's training text, each in a fresh process."""
    rows = []
    for domain, (train, _) in domains.items():
        runs = {}
        for encoder in ("tokenizers", "tiktoken"):
            _, rss, rc, out = run_measured(python_child("-c", ENCODE_SCRIPT, encoder, str(train), str(tokenizer)))
            if rc != 0:
                raise SystemExit(f"encoder {encoder} failed (exit {rc}):\n{out}")
            runs[encoder] = (json.loads(out.strip().splitlines()[-1]), rss)
            print(f"encode {domain} with {encoder}: {runs[encoder][0]['seconds']:.1f}s", flush=True)
        same = "yes" if runs["tokenizers"][0]["sha256"] == runs["tiktoken"][0]["sha256"] else "**NO**"
        for encoder, (result, rss) in runs.items():
            rows.append([domain, f"`{encoder}`" + ("" if encoder == "tokenizers" or result["fast"] else " (fell back)"),
                         f"{result['mb']:.1f}", f"{result['seconds']:.1f}", f"**{result['mb'] / result['seconds']:.1f}**",
                         f"{rss:,.0f}", same])
    return rows


def loader_rows(oracle_dir: Path, repeats: int) -> list[list]:
    arrays = load_split(oracle_dir, "train")
    vocab = TextTokenizer.load(oracle_dir.parents[1] / "tokenizer.json").vocab_size
    shapes = {"tiny": dict(PRESETS["tiny"]),
              "throughput": dict(n_layer=4, n_head=4, d_model=256, d_ff=1024, n_ctx=256)}
    rows = []
    for name, shape in shapes.items():
        config = GPTConfig(vocab_size=vocab, **shape)
        sampler = WindowSampler(arrays, config.n_ctx, seed=0)
        loop = InnerLoop(GPT(config), PretrainConfig(batch_size=BATCH, warmup_steps=1), WindowSampler(arrays, config.n_ctx, 1),
                         10**6, torch.device("cpu"), seed=0)
        loop.train_step()
        sec = interleaved({"sample": lambda: [sampler.sample(BATCH) for _ in range(20)], "train": loop.train_step}, repeats)
        batches_s, steps_s = 20 / sec["sample"], 1 / sec["train"]
        ratio = batches_s / steps_s
        rows.append([f"`{name}` (n_ctx {config.n_ctx}, d_model {config.d_model})", f"{batches_s:,.0f}",
                     f"{steps_s:.2f}", f"**{ratio:,.0f}x**", "met" if ratio >= LOADER_TARGET else "NOT met"])
    return rows


def profile_rows(root: Path, train: Path, valid: Path, tokenizer: Path, top: int = 6) -> tuple[float, list[list]]:
    """cProfile of one in-process prepare of the 1x corpus (one worker: this process): (seconds, top functions by own time)."""
    config = load_config(write_config(root, "profiled", {"corpus": (train, valid)}, tokenizer, dedup=False))
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.runcall(prepare, config)
    seconds = time.perf_counter() - t0
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, ncalls, own s, cumulative s, callers)}
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    rows = [[f"`{Path(f).name}:{line}({name})`" if f != "~" else f"`{name}`", f"{own:.2f}", f"{own / seconds:.0%}"]
            for (f, line, name), (_, _, own, _, _) in ranked]
    return seconds, rows


def compression_rows(valid: dict[str, dict[str, float]], sample: str, everything: str) -> list[list]:
    return [[oracle, f"{valid[everything][oracle]:.3f}", f"{valid[sample][oracle]:.3f}",
             f"{valid[sample][oracle] / valid[everything][oracle] - 1:+.1%}"] for oracle in valid[sample]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1x and 2x, a 20 MB document, 4 MB of each large domain, one round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the cases (median)")
    ap.add_argument("--large-mb", type=int, default=None, help="MB of each pretrain_large train file (default: all; --quick: 4)")
    ap.add_argument("--doc-mb", type=int, default=None, help="MB of the one-document case (default 50; --quick: 20)")
    ap.add_argument("--keep-dir", default=None, help="work here instead of a temporary directory")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where preprocess.md goes")
    args = ap.parse_args()
    if not list(DATA.glob("*/train.txt")):
        print(f"skipped: no corpus at {DATA}/*/train.txt")
        return
    torch.set_num_threads(2)
    load = machine_load()
    copies, rounds = ([1, 2], 1) if args.quick else ([1, 4, 16], args.rounds)
    large_mb = args.large_mb if args.large_mb is not None else (4 if args.quick else 0)
    doc_mb = args.doc_mb or (20 if args.quick else 50)
    sample = {"train_bytes": 1 << 20} if args.quick else {}  # --quick: a sample of 1 MiB, so that it is one
    train_bytes = TokenizerConfig(**sample).train_bytes
    with tempfile.TemporaryDirectory(dir=args.keep_dir) as tmp:
        root = Path(tmp)
        corpus, valid = build_corpus(root, copies, doc_mb)
        t0 = time.perf_counter()
        text = corpus["1x"].read_text(encoding="utf-8")
        tokenizer = TextTokenizer.train(iter(text.split("\n\n")), vocab_size=VOCAB)
        train_s = time.perf_counter() - t0
        tokenizer.save(root / "tokenizer.json")
        cases = {label: ({"corpus": (path, valid)}, root / "tokenizer.json", False, None) for label, path in corpus.items()}
        prep, _ = prepare_rows(root, "corpus", cases, rounds)
        large, encoders, compression = [], [], []
        if (LARGE / "literature_gutenberg" / "train.txt").is_file():
            domains = large_corpus(root, large_mb)
            trained = {f"pretrain_large, tokenizer trained on a sample ({train_bytes / 2**20:.0f} MiB per oracle)":
                       (domains, sample, True, TRAINED_TARGET),
                       "pretrain_large, tokenizer trained on all the text": (domains, {"train_bytes": 0}, True, TRAINED_TARGET)}
            large, valid_bpt = prepare_rows(root, "trained", trained, 1)
            compression = compression_rows(valid_bpt, *trained)
            given = {"pretrain_large, tokenizer given": (domains, root / "trained0_r0.tokenizer.json", True, GIVEN_TARGET)}
            large += prepare_rows(root, "given", given, rounds)[0]
            encoders = encoder_rows(domains, root / "trained0_r0.tokenizer.json")
        else:
            print(f"pretrain_large cases skipped: no corpus at {LARGE}")
        prepare(load_config(write_config(root, "loader", {"corpus": (corpus["1x"], valid)}, root / "tokenizer.json", dedup=False)))
        loader = loader_rows(root / "loader" / "data" / "corpus", 2 if args.quick else 5)
        size = corpus["1x"].stat().st_size / 1e6
        prof_s, prof = profile_rows(root, corpus["1x"], valid, root / "tokenizer.json")
    sections = [
        "## `dgpt prepare`: speed and peak memory", "",
        f"Tokenizer training (BPE, {VOCAB} tokens) on the 1x corpus ({size:.1f} MB), once, in this process: "
        f"**{train_s:.1f} s** ({size / train_s:.1f} MB/s).", "",
        table(["case", "MB (train + valid)", "seconds", "MB/s", "peak RSS MiB (all processes)", "MB/s target",
               f"RSS < {RSS_TARGET_MIB} MiB"], prep + large), "",
        f"Median of {rounds} alternating rounds (trained tokenizers: one run each); each run is "
        "`python -m dgpt prepare CONFIG` in a fresh process (seconds include interpreter start-up and imports; "
        "`prepare` does not import torch), encoding in worker processes (one per core) where the input reaches "
        "16 MB, in threads of its own process below. Peak RSS is the largest sum of the resident memory of the process "
        f"and its workers, read together every 20 ms. The long document is one document of {doc_mb} MB; pretrain_large is "
        f"{'all of it' if not large_mb else f'the first {large_mb} MB of each train file'}.", "",
    ]
    if compression:
        sections += [
            "## The tokenizer's training sample against all the text (pretrain_large)", "",
            table(["oracle", "valid bytes/token, trained on all", "trained on the sample", "change"], compression), "",
            "Higher bytes per token is better compression. `tokenizer.train_bytes` (default 8 MiB) of each oracle's "
            "training text, in 16 evenly spread slices cut between documents, trains the tokenizer; "
            "`train_bytes = 0` trains it on everything.", "",
            "## The encoders alone: `tokenizers` against the derived `tiktoken` encoder", "",
            table(["domain", "encoder", "MB", "seconds", "MB/s", "peak RSS MiB", "same ids"], encoders), "",
            "Each domain's cleaned training text in `prepare`'s segments, in ~1 MB batches, with the tokenizer that "
            "`prepare` trained on the sample; seconds count the encoding alone (the text is read first and held in "
            "memory, which the RSS includes). `tokenizers`: `encode_batch_fast` on its own thread pool; `tiktoken`: "
            "`encode_to_numpy` in 2 threads. Same ids: the sha256 of all ids of the two agree.", "",
        ]
    sections += [
        f"## Where the time goes: cProfile of one in-process `prepare` of the 1x corpus ({prof_s:.1f} s, "
        f"{prep[0][1]} MB: {float(prep[0][1]) / prof_s:.1f} MB/s without process start-up)", "",
        table(["function", "own seconds", "share"], prof), "",
        "One process, encoding in 2 threads: waiting for them (`acquire`) is the encoder's time that reading and "
        "cleaning in the main thread did not hide.", "",
        f"## Loader vs training (batch {BATCH}, eager fp32, 2 threads; target >= {LOADER_TARGET:.0f}x)", "",
        table(["model", "loader batches/s", "train steps/s", "loader / train", "target"], loader),
    ]
    write_report("preprocess", "Preprocessing and loader speed",
                 f"`python benchmarks/preprocess.py {' '.join(sys.argv[1:])}`. Load at the start: `{load}`", sections, args.out)


if __name__ == "__main__":
    main()
