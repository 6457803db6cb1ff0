"""Generation speed: dgpt's KV cache against no cache and against `transformers`' `generate`.

Run (from the project root, venv active; ~10 min on 2 CPU cores, ~1 min with --quick):

    python benchmarks/generation.py [--quick] [--new-tokens 200] [--repeats 3]

Model: the throughput config (vocab = a BPE tokenizer trained here with 8192 tokens, n_ctx 256, 4 layers,
d_model 256, 4 heads), random weights, a 8-token prompt, greedy, exactly `--new-tokens` new tokens, batch 1
and 8. Sides, timed interleaved (median of `--repeats` rounds):
  dgpt cache      `generate(..., use_cache=True)`
  dgpt no cache   `generate(..., use_cache=False)` (re-encodes the whole sequence every token)
  HF openai-gpt   the run exported with `dgpt.interop.hf.export_hf`, `model.generate(do_sample=False,
                  use_cache=True)`; note that transformers' OpenAI GPT has no KV cache at all
  HF gpt2         the same shape with ln = "pre", exported as GPT2LMHeadModel (which has a KV cache), against
                  dgpt's pre-LN model with its cache: the cache-against-cache comparison
Target: dgpt cache >= 4x dgpt no cache at batch 1. Writes benchmarks/results/generation.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _timing import interleaved, machine_load, table, write_report
import torch  # after _timing, which sets OMP_WAIT_POLICY

from dgpt.data.tokenizer import TextTokenizer
from dgpt.interop.hf import export_hf
from dgpt.model.generate import generate
from dgpt.model.gpt import GPT, GPTConfig
from dgpt.train.checkpoint import save_checkpoint, weights_of

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
PROMPT, TARGET = 8, 4.0


def corpus_texts(limit: int = 3_000_000):
    """Training text for the tokenizer: the shared pretraining corpus, or Python's own sources."""
    files = sorted(DATA.glob("*/train.txt")) or sorted(Path(torch.__file__).parents[1].glob("*.py"))[:200]
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")[: limit // max(len(files), 1)]


def exported_pair(root: Path, tokenizer: TextTokenizer, ln: str):
    """dgpt model (random weights) and the transformers model loaded from its export."""
    from transformers import AutoModelForCausalLM

    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=256, n_layer=4, n_head=4, d_model=256, d_ff=1024, ln=ln)
    torch.manual_seed(0)
    model = GPT(config).eval()
    run_dir = root / f"run_{ln}"
    tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, "step", 1, weights_of(model), config, {}, keep=2)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(run_dir, root / f"hf_{ln}")).eval()
    return model, hf


def hf_generate(hf, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=hf.config.pad_token_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 new tokens, 1 round")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 20, 1
    torch.set_num_threads(2)
    load = machine_load()
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = TextTokenizer.train(corpus_texts(), vocab_size=8192)
        post, hf_post = exported_pair(Path(tmp), tokenizer, "post")
        pre, hf_pre = exported_pair(Path(tmp), tokenizer, "pre")
    rows, checks = [], []
    for batch in (1, 8):
        prompt = torch.randint(0, tokenizer.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        sides = {
            "dgpt cache": lambda m=post: generate(m, prompt, new, temperature=0, use_cache=True),
            "dgpt no cache": lambda m=post: generate(m, prompt, new, temperature=0, use_cache=False),
            "HF openai-gpt": lambda m=hf_post: hf_generate(m, prompt, new),
            "dgpt pre-LN cache": lambda m=pre: generate(m, prompt, new, temperature=0, use_cache=True),
            "HF gpt2 cache": lambda m=hf_pre: hf_generate(m, prompt, new),
        }
        outputs = {name: fn() for name, fn in sides.items()}  # warm-up, and the tokens to compare
        same = [torch.equal(outputs["dgpt cache"], outputs[n]) for n in ("dgpt no cache", "HF openai-gpt")]
        same.append(torch.equal(outputs["dgpt pre-LN cache"], outputs["HF gpt2 cache"]))
        checks.append(f"batch {batch}: greedy tokens identical — dgpt cache vs no cache: {same[0]}, "
                      f"vs HF openai-gpt: {same[1]}; dgpt pre-LN vs HF gpt2: {same[2]}")
        sec = interleaved(sides, args.repeats)
        tok_s = {n: batch * new / s for n, s in sec.items()}
        speedup = tok_s["dgpt cache"] / tok_s["dgpt no cache"]
        rows.append([batch, *(f"{tok_s[n]:,.0f}" for n in sides), f"**{speedup:.1f}x**",
                     f"{tok_s['dgpt cache'] / tok_s['HF openai-gpt']:.1f}x",
                     f"{tok_s['dgpt pre-LN cache'] / tok_s['HF gpt2 cache']:.2f}x"])
        print(table(["batch", *sides], [rows[-1][:6]]), flush=True)
    met = float(rows[0][6].strip("*x")) >= TARGET
    sections = [
        f"## {new} new tokens after a {PROMPT}-token prompt, greedy (new tokens per second, all rows of the batch)", "",
        table(["batch", *(f"{n} tok/s" for n in sides), "cache / no cache", "cache / HF openai-gpt",
               "pre-LN cache / HF gpt2"], rows), "",
        f"Target: dgpt cache >= {TARGET:.0f}x no cache at batch 1 — **{'met' if met else 'NOT met'}** "
        f"({rows[0][6].strip('*')}). Median of {args.repeats} interleaved rounds after one warm-up round.", "",
        *(f"- {c}" for c in checks), "",
        "transformers' `OpenAIGPTLMHeadModel` has no KV cache (`use_cache=True` is ignored; every step re-encodes "
        "the whole sequence), so 'HF openai-gpt' is an uncached baseline. The GPT-2 columns (ln = 'pre', exported as "
        "`GPT2LMHeadModel`, which does cache) compare cache against cache.",
    ]
    write_report("generation", "Generation: KV cache vs no cache vs transformers",
                 f"`python benchmarks/generation.py {' '.join(sys.argv[1:])}`. Load at the start: `{load}`", sections)


if __name__ == "__main__":
    main()
