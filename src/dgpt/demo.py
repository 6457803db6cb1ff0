"""`dgpt demo`: decentralized pre-training end to end, offline, on text every Python installation carries.

Three oracles (docstrings of the text/network modules, docstrings of the numeric/data modules, and
standard-library source code) train one tiny GPT through the `sim` runtime. The demo prints each
oracle's validation loss before and after, the bytes communicated against synchronous data parallel,
and generated samples. Then the same three oracles fine-tune it (DSFT) on a labeled task built from
the docstrings: which area of the standard library (text & network, or numbers & data) a docstring
comes from, each oracle holding its own share of the labeled examples and its own head.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from dgpt import api
from dgpt.audit import verify_ledger
from dgpt.config import Config, FederationConfig, FinetuneConfig, ModelConfig, OracleConfig, PretrainConfig, TaskConfig, TokenizerConfig
from dgpt.data.embedded import write_embedded_corpora
from dgpt.fileio import write_text
from dgpt.federation.accounting import human_bytes
from dgpt.rundir import RunDir
from dgpt.train.evaluate import perplexity
from dgpt.train.metrics import read_metrics

PROMPTS = ("Return the", "The socket", "def __init__(self")


def demo_config(run_dir: Path, rounds: int, inner_steps: int) -> Config:
    oracles = write_embedded_corpora(run_dir / "corpus")
    return Config(
        run_dir=str(run_dir),
        seed=1337,
        # pre-LN: in a few hundred steps the post-LN GPT-1 stack stays on the unigram plateau (~6.7 nats)
        model=ModelConfig(preset="tiny", ln="pre"),
        tokenizer=TokenizerConfig(vocab_size=4096),
        oracles=oracles,
        pretrain=PretrainConfig(batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20, eval_windows=24),
        # A few short rounds: DiLoCo's outer momentum (0.7 / 0.9) needs many rounds to pay off and overshoots
        # here (benchmarks/results/dupt_diloco_outer.md), so the demo averages the oracles' models (FedAvg).
        federation=FederationConfig(runtime="sim", rounds=rounds, inner_steps=inner_steps, outer_lr=1.0, outer_momentum=0.0,
                                    checkpoint_interval=rounds),
    )


def run_demo(run_dir: Path, rounds: int = 8, inner_steps: int = 25) -> dict:
    t0 = time.perf_counter()
    print(f"dgpt demo: 3 oracles from Python's standard library -> {run_dir}")
    config = demo_config(run_dir, rounds, inner_steps)
    api.pretrain(config)  # prepares (or reuses) the tokenizer and shards first
    rows = [r for r in read_metrics(RunDir(run_dir).metrics) if r["kind"] == "round"]
    before, after = rows[0]["oracles"], rows[-1]["oracles"]
    print(f"\n{'oracle':<22} {'valid loss before':>18} {'after':>8} {'perplexity after':>17}")
    for name in before:
        print(f"{name:<22} {before[name]:>18.3f} {after[name]:>8.3f} {perplexity(after[name]):>17.1f}")
    print(
        f"\ncommunicated {human_bytes(rows[-1]['bytes_total'])} over {rounds} rounds of {inner_steps} inner steps; "
        f"synchronous data parallel: {human_bytes(rows[-1]['dp_bytes'])}"
    )
    ledger = verify_ledger(run_dir)
    print(f"\ncontribution ledger (`dgpt ledger {run_dir} --receipts {run_dir}/oracles/*/receipts.jsonl`): chain, "
          "signatures, values and checkpoints verified; each oracle's Shapley share of the validation loss the federation "
          "gained")
    for name, total in ledger.oracles.items():
        print(f"{name:<22} {total.value:>8.4f} nats  {total.share:>6.1%}")
    model, tokenizer = api.load_pretrained(run_dir, "cpu")
    print("\nsamples:")
    for prompt in PROMPTS:
        (text,) = api.generate_text(model, tokenizer, prompt, max_new_tokens=40, temperature=0.8, top_k=40, seed=0)
        print(f"--- {prompt!r}\n{text}")
    finetuned = run_finetune_stage(run_dir, config.oracle_names(), max(2, rounds // 2), max(3, inner_steps // 2))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; run directory: {run_dir}")
    return {"before": before, "after": after, "finetune": finetuned}


AREAS = {"stdlib_text_net": "text_network", "stdlib_numeric_data": "numbers_data"}
_SPACE = re.compile(r"\s+")


def write_area_task(corpus: Path, dest: Path, owners: list[str], per_oracle: int = 300) -> list[OracleConfig]:
    """Docstrings (their first line, the qualified name, removed) labeled by standard-library area, dealt
    out round-robin: each owner gets its own labeled set (train and valid) and fine-tunes its own head."""
    oracles = [OracleConfig(name=name, task=TaskConfig(type="classification")) for name in owners]
    for split in ("train", "valid"):
        rows = []
        for area, label in AREAS.items():
            for doc in (corpus / area / f"{split}.txt").read_text(encoding="utf-8").split("\n\n"):
                text = _SPACE.sub(" ", doc.partition("\n")[2]).strip()[:300]
                if text:
                    rows.append({"text": text, "label": label})
        random.Random(0).shuffle(rows)
        for j, oracle in enumerate(oracles):
            path = dest / oracle.name / f"{split}.jsonl"
            write_text(path, "".join(json.dumps(r) + "\n" for r in rows[j::len(oracles)][:per_oracle]))
            getattr(oracle.task, split).append(str(path))
    return oracles


def run_finetune_stage(run_dir: Path, owners: list[str], rounds: int, inner_steps: int) -> dict:
    print(f"\nfine-tuning (DSFT): which standard-library area a docstring comes from; {', '.join(AREAS.values())}")
    config = Config(
        run_dir=str(run_dir / "finetune"), seed=1337,
        oracles=write_area_task(run_dir / "corpus", run_dir / "tasks", owners),
        finetune=FinetuneConfig(init_from=str(run_dir), lr=5e-4, batch_size=16, rounds=rounds, inner_steps=inner_steps, max_len=64),
        federation=FederationConfig(runtime="sim"),
    )
    api.finetune(config)
    rows = [r for r in read_metrics(RunDir(config.run_dir).metrics) if r["kind"] == "round" and "metrics" in r]
    before, after = rows[0]["metrics"], rows[-1]["metrics"]
    print(f"\n{'oracle':<22} {'valid accuracy before':>22} {'after':>8} {'F1 after':>9}")
    for name in owners:
        print(f"{name:<22} {before[name]['accuracy']:>22.3f} {after[name]['accuracy']:>8.3f} {after[name]['f1']:>9.3f}")
    first = config.oracles[0]
    out = Path(config.run_dir) / "predictions.jsonl"
    predictions = api.predict(config.run_dir, first.name, first.task.valid[0], out, device="cpu")
    text = json.loads(Path(first.task.valid[0]).read_text(encoding="utf-8").splitlines()[0])["text"]
    print(f"\n`dgpt predict` with {first.name}'s head -> {out}; first line:\n  {text[:70]!r}\n  -> {predictions[0]}")
    return after
