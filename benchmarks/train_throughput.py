"""Training throughput: dgpt's GPT against `transformers.OpenAIGPTLMHeadModel`, same config and weights.

Run (from the project root, venv active; ~10-15 min on 2 CPU cores, ~2 min with --quick):

    python benchmarks/train_throughput.py [--quick] [--repeats 5] [--steps 3] [--cuda]

Config: vocab 8192, n_ctx 256, 4 layers, d_model 256, 4 heads, d_ff 1024, batch 8, fp32, AdamW (dgpt's
`make_optimizer`), grad clip 1.0, 2 threads. Cells: {eager, torch.compile} x {dropout 0.1, 0}; both models
get the same weights (dgpt -> HF through `dgpt.interop.hf.key_map`), the same loss function and the same
step. All sides are timed interleaved (round robin, order reversed every round), median of `--repeats`
rounds of `--steps` steps each. MFU = tokens/s x `flops_per_token` / the fp32 matmul peak measured in this
run (median of a 2048^3 matmul loop before and after). Cells where dgpt is not >= 1.1x HF are profiled
(torch.profiler, top ops by self CPU time). Also: the `gpt1` preset (vocab 40478) at batch 1, eager, in a
fresh process: tokens/s and peak RSS. With a GPU (or `--cuda`, which does only that part): bf16 autocast
MFU of `gpt1` against a bf16 matmul peak measured in the same run.
Writes benchmarks/results/train_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _timing import interleaved, interleaved_times, machine_load, python_child, run_measured, table, write_report
import torch  # after _timing, which sets OMP_WAIT_POLICY
import torch.nn.functional as F

from dgpt.config import PretrainConfig
from dgpt.interop.hf import key_map
from dgpt.model.gpt import GPT, PRESETS, GPTConfig, flops_per_token
from dgpt.train.local import make_optimizer

SHAPE = dict(vocab_size=8192, n_ctx=256, n_layer=4, n_head=4, d_model=256, d_ff=1024)
BATCH, TARGET = 8, 1.1


def dgpt_config(dropout: float, **shape) -> GPTConfig:
    return GPTConfig(**{**SHAPE, **shape}, embd_dropout=dropout, attn_dropout=dropout, resid_dropout=dropout)


def hf_twin(model: GPT):
    """An OpenAIGPTLMHeadModel with the same config and weights as `model` (post-LN, gelu_tanh)."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    c = model.config
    hf = OpenAIGPTLMHeadModel(OpenAIGPTConfig(
        vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.d_model, n_layer=c.n_layer, n_head=c.n_head,
        afn="gelu", embd_pdrop=c.embd_dropout, attn_pdrop=c.attn_dropout, resid_pdrop=c.resid_dropout,
        layer_norm_epsilon=c.ln_eps, tie_word_embeddings=True))
    ours, theirs = model.state_dict(), hf.state_dict()
    with torch.no_grad():
        for src, dst, transposed in key_map(c):
            theirs[dst].copy_(ours[src].t() if transposed else ours[src])
    return hf


class Trainer:
    """One side of a cell: model (maybe compiled), AdamW, a fixed batch; `step()` is one optimizer step."""

    def __init__(self, model, config: GPTConfig, logits_of, compile_: bool, batch: int, seed: int = 0):
        self.model = model.train()
        self.forward = torch.compile(model) if compile_ else model
        self.logits_of = logits_of
        self.optimizer = make_optimizer(model, PretrainConfig())
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (batch, config.n_ctx + 1), generator=gen)
        self.x, self.y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step(self) -> float:
        logits = self.logits_of(self.forward(self.x))
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), self.y.reshape(-1))  # = dgpt's lm_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def matmul_peak(dtype=torch.float32, device="cpu", n=2048, repeats=5) -> float:
    """FLOP/s of an n x n x n matmul: median over `repeats` timings."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    calls = 3 if device == "cpu" else 50
    (a @ b), sync()
    sec = interleaved({"mm": lambda: ((a @ b), sync())}, repeats, calls)["mm"]
    return 2 * n**3 / sec


def profile_top(trainer: Trainer, rows: int = 8) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            trainer.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=45)


def cpu_cells(args) -> tuple[list[str], float]:
    peak0 = matmul_peak()
    flops = flops_per_token(dgpt_config(0.0))
    sides, cells = {}, []
    for mode in args.modes.split(","):
        for p in (0.1, 0.0):
            torch.manual_seed(0)
            ours = GPT(dgpt_config(p))
            theirs = hf_twin(ours)
            if p == 0.0:  # the twins compute the same function
                ids = torch.randint(0, SHAPE["vocab_size"], (2, 16))
                torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
            key = f"{mode} p={p}"
            sides[f"dgpt {key}"] = Trainer(ours, ours.config, lambda out: out, mode == "compile", BATCH)
            sides[f"HF {key}"] = Trainer(theirs, ours.config, lambda out: out.logits, mode == "compile", BATCH)
            cells.append(key)
    t0 = time.perf_counter()
    for name, trainer in sides.items():  # warm-up, compilation included
        for _ in range(args.warmup):
            trainer.step()
        print(f"warmed up {name} ({time.perf_counter() - t0:.0f}s)", flush=True)
    times = interleaved_times({n: t.step for n, t in sides.items()}, args.repeats, args.steps)
    peak = max(peak0, matmul_peak())
    tok = BATCH * SHAPE["n_ctx"]
    rows, failing = [], []
    for key in cells:
        ours, theirs = (tok / statistics.median(times[f"{side} {key}"]) for side in ("dgpt", "HF"))
        ratio = ours / theirs
        per_round = sorted(h / d for d, h in zip(times[f"dgpt {key}"], times[f"HF {key}"]))
        rows.append([key, f"{ours:,.0f}", f"{theirs:,.0f}", f"**{ratio:.2f}x**",
                     f"{per_round[0]:.2f} / {per_round[-1]:.2f}",
                     f"{min(times[f'HF {key}']) / min(times[f'dgpt {key}']):.2f}x", f"{ours * flops / peak:.1%}",
                     f"{theirs * flops / peak:.1%}", "met" if ratio >= TARGET else "NOT met"])
        if ratio < TARGET:
            failing.append(key)
    out = [f"## CPU, fp32, batch {BATCH} (target: dgpt >= {TARGET}x HF in every cell)", "",
           f"fp32 matmul peak (2048^3, measured before and after, max of the two): **{peak / 1e9:.1f} GFLOP/s**; "
           f"{flops / 1e6:.1f} MFLOP per token (`flops_per_token`). Median of {args.repeats} interleaved rounds "
           f"x {args.steps} steps after {args.warmup} warm-up steps.", "",
           table(["cell", "dgpt tok/s", "HF tok/s", "dgpt / HF (medians)", "per-round ratio min / max",
                  "ratio of best steps", "dgpt MFU", "HF MFU", f">= {TARGET}x"], rows), "",
           "Per-round ratio: dgpt/HF speed within one round (the two sides ran next to each other); its spread shows "
           "how much background load moved between the sides. Ratio of best steps: fastest dgpt step against fastest "
           "HF step (the least disturbed estimate)."]
    if failing:
        out += ["", "What stands in the way where the target is missed (read from the profiles below): compiled, both "
                "models spend most of their time in the same matrix multiplies (`mm`, `addmm`: identical shapes and "
                "weights), and `torch.compile` fuses HF's separate GELU / mask / scale kernels, which is where dgpt "
                "wins in eager mode. What remains different is attention: with attention dropout > 0 the fused CPU "
                "kernel of `scaled_dot_product_attention` cannot apply dropout and the math fallback runs (`bmm` + "
                "`bernoulli_`), which compiled code does not fuse as well as HF's explicit attention. Writing attention "
                "out explicitly when training with attention dropout is the change to try; the gain is at most ~10%, "
                "so >= 1.1x over compiled HF is probably out of reach on CPU, where the shared matmuls dominate."]
    for key in failing if not args.quick else []:
        out += ["", f"### Profile of `{key}` (2 steps, top ops by self CPU time)", ""]
        for side in ("dgpt", "HF"):
            out += [f"{side}:", "", "```", profile_top(sides[f"{side} {key}"]), "```"]
    return out, peak


def gpt1_child(steps: int) -> None:
    """In a fresh process: gpt1 preset, batch 1, eager fp32 training steps; prints JSON."""
    torch.set_num_threads(2)
    config = GPTConfig(**{**PRESETS["gpt1"], "vocab_size": 40478})
    trainer = Trainer(GPT(config), config, lambda out: out, False, 1)
    trainer.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"tok_s": config.n_ctx / statistics.median(times), "params": trainer.model.num_params(),
                      "flops": flops_per_token(config)}))


def gpt1_row(steps: int, peak: float) -> list[str]:
    _, rss, rc, output = run_measured(python_child(__file__, "--gpt1-child", str(steps)))
    if rc != 0:
        return ["## gpt1 preset", "", f"child failed (exit {rc}):", "```", output[-2000:], "```"]
    r = json.loads(output.strip().splitlines()[-1])
    return ["## `gpt1` preset, batch 1 (n_ctx 512, vocab 40478), eager fp32, fresh process", "",
            table(["params", "tok/s", "MFU", "peak RSS"],
                  [[f"{r['params'] / 1e6:.1f} M", f"{r['tok_s']:,.0f}", f"{r['tok_s'] * r['flops'] / peak:.1%}",
                    f"{rss:,.0f} MiB"]]),
            "", f"Median of {steps} steps after one warm-up step; peak RSS is the child's own `ru_maxrss` (os.wait4)."]


def cuda_section(steps: int) -> list[str]:
    if not torch.cuda.is_available():
        print("CUDA: no GPU present on this machine; skipping the bf16 gpt1 measurement")
        return ["## GPU", "", "No GPU present on this machine (`torch.cuda.is_available()` is False): the bf16 "
                "`gpt1` MFU measurement (`--cuda`) was skipped."]
    peak = matmul_peak(torch.bfloat16, "cuda", n=8192)
    config = GPTConfig(**{**PRESETS["gpt1"], "vocab_size": 40478})
    model = GPT(config).cuda().train()
    optimizer = make_optimizer(model, PretrainConfig())
    batch = 16
    x = torch.randint(0, config.vocab_size, (batch, config.n_ctx + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        F.cross_entropy(logits.float().reshape(-1, config.vocab_size), x[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    step(), step()
    sec = interleaved({"gpt1": step}, 5, steps)["gpt1"]
    tok_s = batch * config.n_ctx / sec
    return ["## GPU: `gpt1`, bf16 autocast, batch 16, eager", "", table(
        ["device", "bf16 matmul peak", "tok/s", "MFU"],
        [[torch.cuda.get_device_name(), f"{peak / 1e12:.0f} TFLOP/s", f"{tok_s:,.0f}",
          f"{tok_s * flops_per_token(config) / peak:.1%}"]])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up step, 2 rounds of 1 step")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median)")
    ap.add_argument("--steps", type=int, default=1, help="steps per side per round")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per side (compilation included)")
    ap.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    ap.add_argument("--no-gpt1", action="store_true", help="skip the gpt1 preset row")
    ap.add_argument("--cuda", action="store_true", help="only the GPU bf16 gpt1 measurement")
    ap.add_argument("--gpt1-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gpt1_child is not None:
        return gpt1_child(args.gpt1_child)
    torch.set_num_threads(2)
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 1, 1
    load = machine_load()
    if args.cuda:
        sections = cuda_section(args.steps)
    else:
        sections, peak = cpu_cells(args)
        sections += ([""] + gpt1_row(2 if args.quick else 3, peak)) * (not args.no_gpt1) + [""] + cuda_section(args.steps)
    write_report("train_throughput", "Training throughput: dgpt vs transformers OpenAI GPT",
                 f"`python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`. Load at the start: `{load}`",
                 sections)


if __name__ == "__main__":
    main()
