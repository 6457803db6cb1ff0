"""Preprocessing speed and memory: `dgpt prepare` on a corpus repeated 1x, 4x, 16x; the loader against training.

Run (from the project root, venv active; ~5-10 min on 2 CPU cores, ~1 min with --quick):

    python benchmarks/preprocess.py [--quick] [--rounds 2] [--keep-dir DIR]

Corpus: the four ../shared/data/pretrain/*/train.txt concatenated (valid: their valid.txt), written k times
into one oracle's train file. A BPE tokenizer (8192 tokens) is trained once beforehand (timed separately)
and given via `tokenizer.path`, so each run measures the sharding pipeline: read, clean, encode, write.
`data.dedup = false`, or the repeated copies would be dropped as duplicates instead of encoded. Every
`dgpt prepare` runs in a fresh process; its peak RSS is that process's own ru_maxrss (os.wait4). Sizes run
in alternating order (1 4 16, 16 4 1, ...); median of `--rounds`. Targets: >= 5 MB/s on 2 cores, peak RSS
within 20% of the 1x run. Loader: `WindowSampler.sample(8)` batches/s against training steps/s (InnerLoop,
batch 8, eager) of the `tiny` preset and the throughput config, interleaved; target >= 20x.
Writes benchmarks/results/preprocess.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _timing import interleaved, machine_load, python_child, run_measured, table, write_report
import torch  # after _timing, which sets OMP_WAIT_POLICY

from dgpt.config import PretrainConfig, config_from_dict, dump_config, load_config
from dgpt.data.prepare import prepare
from dgpt.data.loader import WindowSampler
from dgpt.data.shards import load_split
from dgpt.data.tokenizer import TextTokenizer
from dgpt.model.gpt import GPT, PRESETS, GPTConfig
from dgpt.train.local import InnerLoop

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
MB_S_TARGET, RSS_SLACK, LOADER_TARGET, BATCH = 5.0, 0.20, 20.0, 8


def build_corpus(root: Path, copies: list[int]) -> tuple[dict[int, Path], Path]:
    train = b"".join(p.read_bytes().rstrip(b"\n") + b"\n\n" for p in sorted(DATA.glob("*/train.txt")))
    valid = root / "valid.txt"
    valid.write_bytes(b"".join(p.read_bytes().rstrip(b"\n") + b"\n\n" for p in sorted(DATA.glob("*/valid.txt"))))
    paths = {}
    for k in copies:
        paths[k] = root / f"train_x{k}.txt"
        paths[k].write_bytes(train * k)
    return paths, valid


def write_config(root: Path, name: str, train: Path, valid: Path, tokenizer: Path) -> Path:
    config = config_from_dict({
        "run_dir": str(root / name), "tokenizer": {"path": str(tokenizer)}, "data": {"dedup": False},
        "oracles": [{"name": "corpus", "train": [str(train)], "valid": [str(valid)]}],
    })
    path = root / f"{name}.toml"
    path.write_text(dump_config(config))
    return path


def prepare_runs(root: Path, corpus: dict[int, Path], valid: Path, tokenizer: Path, rounds: int) -> list[list]:
    results: dict[int, list[tuple[float, float]]] = {k: [] for k in corpus}
    for r in range(rounds):
        for k in sorted(corpus, reverse=r % 2 == 1):
            cfg = write_config(root, f"x{k}_r{r}", corpus[k], valid, tokenizer)
            sec, rss, rc, out = run_measured(python_child("-m", "dgpt", "prepare", str(cfg)), {"TQDM_DISABLE": "1"})
            if rc != 0:
                raise SystemExit(f"dgpt prepare failed (exit {rc}):\n{out}")
            results[k].append((sec, rss))
            print(f"prepare x{k} round {r}: {sec:.1f}s, peak RSS {rss:.0f} MiB", flush=True)
            if k != min(corpus) or r > 0:
                shutil.rmtree(root / f"x{k}_r{r}")
    base_rss = statistics.median(rss for _, rss in results[min(corpus)])
    rows = []
    for k in sorted(corpus):
        mb = (corpus[k].stat().st_size + valid.stat().st_size) / 1e6
        sec = statistics.median(s for s, _ in results[k])
        rss = statistics.median(m for _, m in results[k])
        rows.append([f"{k}x", f"{mb:.1f}", f"{sec:.1f}", f"**{mb / sec:.1f}**", f"{rss:,.0f}",
                     f"{rss / base_rss - 1:+.0%}", "met" if mb / sec >= MB_S_TARGET else "NOT met",
                     "met" if rss <= base_rss * (1 + RSS_SLACK) else "NOT met"])
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
    """cProfile of one in-process prepare of the 1x corpus: (seconds, top functions by own time)."""
    config = load_config(write_config(root, "profiled", train, valid, tokenizer))
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.runcall(prepare, config)
    seconds = time.perf_counter() - t0
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, ncalls, own s, cumulative s, callers)}
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    rows = [[f"`{Path(f).name}:{line}({name})`" if f != "~" else f"`{name}`", f"{own:.2f}", f"{own / seconds:.0%}"]
            for (f, line, name), (_, _, own, _, _) in ranked]
    return seconds, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1x and 2x, one round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the sizes (median)")
    ap.add_argument("--keep-dir", default=None, help="work here instead of a temporary directory")
    args = ap.parse_args()
    if not list(DATA.glob("*/train.txt")):
        print(f"skipped: no corpus at {DATA}/*/train.txt")
        return
    torch.set_num_threads(2)
    load = machine_load()
    copies, rounds = ([1, 2], 1) if args.quick else ([1, 4, 16], args.rounds)
    with tempfile.TemporaryDirectory(dir=args.keep_dir) as tmp:
        root = Path(tmp)
        corpus, valid = build_corpus(root, copies)
        t0 = time.perf_counter()
        text = corpus[1].read_text(encoding="utf-8")
        tokenizer = TextTokenizer.train(iter(text.split("\n\n")), vocab_size=8192)
        train_s = time.perf_counter() - t0
        tokenizer.save(root / "tokenizer.json")
        prep = prepare_runs(root, corpus, valid, root / "tokenizer.json", rounds)
        loader = loader_rows(root / "x1_r0" / "data" / "corpus", 2 if args.quick else 5)
        size = corpus[1].stat().st_size / 1e6
        prof_s, prof = profile_rows(root, corpus[1], valid, root / "tokenizer.json")
    sections = [
        "## `dgpt prepare` (sharding pipeline; tokenizer given via `tokenizer.path`)", "",
        f"Tokenizer training (BPE, 8192 tokens) on the 1x corpus ({size:.1f} MB), once, in this process: "
        f"**{train_s:.1f} s** ({size / train_s:.1f} MB/s).", "",
        table(["corpus", "MB (train + valid)", "seconds", "MB/s", "peak RSS MiB", "RSS vs 1x",
               f">= {MB_S_TARGET:.0f} MB/s", f"RSS within {RSS_SLACK:.0%}"], prep), "",
        f"Median of {rounds} alternating rounds; each run is `python -m dgpt prepare CONFIG` in a fresh process "
        "(seconds include interpreter start-up and imports).", "",
        f"## Where the time goes: cProfile of one in-process `prepare` of the 1x corpus ({prof_s:.1f} s, "
        f"{prep[0][1]} MB: {float(prep[0][1]) / prof_s:.1f} MB/s without process start-up)", "",
        table(["function", "own seconds", "share"], prof), "",
        "`encode_batch_fast` is the Rust BPE encoder of Hugging Face `tokenizers` (parallel over the batch); "
        "reading, cleaning and writing shards are the remaining rows.", "",
        f"## Loader vs training (batch {BATCH}, eager fp32, 2 threads; target >= {LOADER_TARGET:.0f}x)", "",
        table(["model", "loader batches/s", "train steps/s", "loader / train", "target"], loader),
    ]
    write_report("preprocess", "Preprocessing and loader speed",
                 f"`python benchmarks/preprocess.py {' '.join(sys.argv[1:])}`. Load at the start: `{load}`", sections)


if __name__ == "__main__":
    main()
