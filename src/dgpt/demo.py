"""`dgpt demo`: decentralized pre-training end to end, offline, on text every Python installation carries.

Three oracles (docstrings of the text/network modules, docstrings of the numeric/data modules, and
standard-library source code) train one tiny GPT through the `sim` runtime. The demo prints each
oracle's validation loss before and after, the bytes communicated against synchronous data parallel,
and generated samples.
"""

from __future__ import annotations

import time
from pathlib import Path

from dgpt import api
from dgpt.config import Config, FederationConfig, ModelConfig, PretrainConfig, TokenizerConfig
from dgpt.data.embedded import write_embedded_corpora
from dgpt.federation.accounting import human_bytes
from dgpt.train.evaluate import perplexity
from dgpt.train.metrics import read_metrics

PROMPTS = ("Return the", "The socket", "def __init__(self")


def demo_config(run_dir: Path, rounds: int, inner_steps: int) -> Config:
    oracles = write_embedded_corpora(run_dir / "corpus")
    return Config(
        run_dir=str(run_dir),
        seed=1337,
        model=ModelConfig(preset="tiny"),
        tokenizer=TokenizerConfig(vocab_size=4096),
        oracles=oracles,
        pretrain=PretrainConfig(batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20, eval_windows=24, checkpoint_interval=rounds),
        federation=FederationConfig(runtime="sim", rounds=rounds, inner_steps=inner_steps),
    )


def run_demo(run_dir: Path, rounds: int = 8, inner_steps: int = 25) -> dict:
    t0 = time.perf_counter()
    print(f"dgpt demo: 3 oracles from Python's standard library -> {run_dir}")
    config = demo_config(run_dir, rounds, inner_steps)
    api.prepare(config)
    result = api.pretrain(config)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "round"]
    before, after = rows[0]["oracles"], rows[-1]["oracles"]
    print(f"\n{'oracle':<22} {'valid loss before':>18} {'after':>8} {'perplexity after':>17}")
    for name in before:
        print(f"{name:<22} {before[name]:>18.3f} {after[name]:>8.3f} {perplexity(after[name]):>17.1f}")
    print(
        f"\ncommunicated {human_bytes(rows[-1]['bytes_total'])} over {rounds} rounds of {inner_steps} inner steps; "
        f"synchronous data parallel: {human_bytes(rows[-1]['dp_bytes'])}"
    )
    model, tokenizer = api.load_pretrained(run_dir, "cpu")
    print("\nsamples:")
    for prompt in PROMPTS:
        (text,) = api.generate_text(model, tokenizer, prompt, max_new_tokens=40, temperature=0.8, top_k=40, seed=0)
        print(f"--- {prompt!r}\n{text}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; run directory: {run_dir}")
    return {"before": before, "after": after}
