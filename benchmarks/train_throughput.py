"""Training throughput: dgpt against transformers' OpenAIGPTLMHeadModel and nanoGPT's GPT, one process.

Run (from the project root, venv active; alone on the machine, ~30 min on 2 CPU cores, ~4 min with --quick):

    python benchmarks/train_throughput.py [--quick] [--threads 1,2] [--repeats 5] [--steps 2]
    python benchmarks/train_throughput.py --device cuda --preset gpt1 --batch 16 --threads 0   # a GPU

Shapes (default): vocab 8192, n_ctx 256, 4 layers, d_model 256, 4 heads, d_ff 1024, batch 8 (`--preset`
takes a dgpt preset's shape instead, `--vocab` the vocabulary). Every side gets the same optimizer (dgpt's
`make_optimizer`: AdamW, decay on matrices), grad clip 1.0, the same batch, and trains its own default way:
  dgpt         `model(x, y)`: the LM head and cross-entropy fused per chunk (`dgpt.model.lm_loss`)
  HF           `OpenAIGPTLMHeadModel(x).logits`, then `F.cross_entropy` (dgpt's weights, post-LN like dgpt)
  nanoGPT      `GPT(x, y)` from ../shared/peers/nanogpt/model.py, imported from there (pre-LN, exact GELU);
               skipped with a message when that folder is absent
Cells: {eager, compiled} x {dropout 0.1, 0} x {fp32, bf16 autocast}, each at every `--threads` count. All
sides of all cells are timed interleaved (round robin, order reversed every round), median of `--repeats`
rounds of `--steps` steps. MFU = tokens/s x `flops_per_token` / the matmul peak of that dtype, measured in
this run (2048^3 on the CPU, 8192^3 on a GPU; max of before and after). Where dgpt is not >= 1.2x the faster
peer, dgpt's step is profiled (top ops by self time). `uptime` is recorded at the start and the end.
Writes benchmarks/results/train_throughput.md (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

from _timing import RESULTS, interleaved, interleaved_times, machine_load, table, write_report
import torch  # after _timing, which sets OMP_WAIT_POLICY
import torch.nn.functional as F

from dgpt.config import PretrainConfig
from dgpt.interop.hf import key_map
from dgpt.model.config import PRESETS, GPTConfig
from dgpt.model.gpt import GPT, flops_per_token
from dgpt.train.local import LoopSettings, make_optimizer

NANOGPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "nanogpt" / "model.py"
SHAPE = dict(vocab_size=8192, n_ctx=256, n_layer=4, n_head=4, d_model=256, d_ff=1024)
TARGET = 1.2


def load_nanogpt():
    """nanoGPT's model module, imported from the shared peers folder (never copied), or None."""
    if not NANOGPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("nanogpt_model", NANOGPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def nano_twin(nanogpt, c: GPTConfig):
    cfg = nanogpt.GPTConfig(block_size=c.n_ctx, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                            n_embd=c.d_model, dropout=c.attn_dropout, bias=True)
    return nanogpt.GPT(cfg)


def plain_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


# how each side turns (model output, targets) into its loss, and whether its forward takes the targets
LOSS = {
    "dgpt": (True, lambda out, y: out),
    "HF": (False, lambda out, y: plain_loss(out.logits, y)),
    "nanoGPT": (True, lambda out, y: out[1]),
}


class Trainer:
    """One side of a cell: model (maybe compiled), AdamW, a fixed batch; `step()` is one optimizer step."""

    def __init__(self, side: str, model, config: GPTConfig, compile_: bool, bf16: bool, batch: int, device):
        self.model = model.to(device).train()
        self.forward = torch.compile(self.model) if compile_ else self.model
        self.takes_targets, self.loss_of = LOSS[side]
        self.device, self.bf16 = torch.device(device), bf16
        self.optimizer = make_optimizer(self.model, LoopSettings.of(PretrainConfig(batch_size=batch)))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, config.n_ctx + 1), generator=gen).to(device)
        self.x, self.y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(self.x, self.y) if self.takes_targets else self.forward(self.x)
            loss = self.loss_of(out, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str, quick: bool = False) -> float:
    """FLOP/s of an n x n x n matmul: median of 5 timings (`quick`: a small matmul, a rough figure)."""
    n, calls = (512, 1) if quick else (2048, 3) if device == "cpu" else (8192, 50)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    (a @ b), sync()
    return 2 * n**3 / interleaved({"mm": lambda: ((a @ b), sync())}, 5, calls)["mm"]


def build_sides(args, config_of, nanogpt) -> tuple[dict[str, Trainer], list[tuple]]:
    sides, cells = {}, []
    for dtype in args.dtype.split(","):
        for mode in args.modes.split(","):
            for p in args.dropouts:
                torch.manual_seed(0)
                ours = GPT(config_of(p))
                models = {"dgpt": ours, "HF": hf_twin(ours)}
                if p == 0.0:  # the twins compute the same function
                    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
                    torch.testing.assert_close(ours.eval()(ids), models["HF"].eval()(ids).logits, rtol=1e-4, atol=1e-4)
                if nanogpt is not None:
                    models["nanoGPT"] = nano_twin(nanogpt, ours.config)
                cell = (mode, p, dtype)
                for side, model in models.items():
                    sides[f"{side} {key(cell)}"] = Trainer(side, model, ours.config, mode == "compile", dtype == "bf16",
                                                           args.batch, args.device)
                cells.append(cell)
    return sides, cells


def key(cell: tuple) -> str:
    mode, p, dtype = cell
    return f"{dtype} {mode} p={p}"


def profile_top(trainer: Trainer, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            trainer.step()
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=45)


def measure(args, sides, cells, config, threads: int) -> tuple[list[str], list[tuple]]:
    """One thread count: peaks, interleaved steps of every side; (report lines, cells below target)."""
    if threads:
        torch.set_num_threads(threads)
    dev = args.device
    peaks0 = {d: matmul_peak(d, dev, args.quick) for d in (torch.float32, torch.bfloat16)}
    times = interleaved_times({n: t.step for n, t in sides.items()}, args.repeats, args.steps)
    peaks = {d: max(peaks0[d], matmul_peak(d, dev, args.quick)) for d in peaks0}
    flops, tok = flops_per_token(config), args.batch * config.n_ctx
    peers = [s for s in ("HF", "nanoGPT") if any(n.startswith(s + " ") for n in sides)]
    rows, short = [], []
    for cell in cells:
        speed = {s: tok / statistics.median(times[f"{s} {key(cell)}"]) for s in ["dgpt"] + peers}
        best = max(peers, key=speed.get)
        ratio = speed["dgpt"] / speed[best]
        peak = peaks[torch.bfloat16 if cell[2] == "bf16" else torch.float32]
        rows.append([key(cell), *(f"{speed[s]:,.0f}" for s in ["dgpt"] + peers), f"**{ratio:.2f}x** ({best})",
                     *(f"{speed[s] * flops / peak:.1%}" for s in ["dgpt"] + peers), "met" if ratio >= TARGET else "NOT met"])
        if ratio < TARGET:
            short.append(cell)
    where = f"{threads} thread{'s' * (threads != 1)}" if threads else dev
    out = [f"## {where}: batch {args.batch} (target: dgpt >= {TARGET}x the faster peer in every cell)", "",
           f"Matmul peaks measured in this run: fp32 **{peaks[torch.float32] / 1e9:,.1f} GFLOP/s**, bf16 "
           f"**{peaks[torch.bfloat16] / 1e9:,.1f} GFLOP/s**; {flops / 1e6:.1f} MFLOP per token (`flops_per_token`). "
           f"Median of {args.repeats} interleaved rounds x {args.steps} steps.", "",
           table(["cell", "dgpt tok/s", *(f"{s} tok/s" for s in peers), "dgpt / faster peer",
                  "dgpt MFU", *(f"{s} MFU" for s in peers), f">= {TARGET}x"], rows)]
    return out, short


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="fp32,bf16", help="comma-separated cells: fp32, bf16 (autocast)")
    ap.add_argument("--preset", default="", help="a dgpt model preset's shape instead of the default shape")
    ap.add_argument("--vocab", type=int, default=SHAPE["vocab_size"])
    ap.add_argument("--batch", type=int, default=8, help="windows per step")
    ap.add_argument("--steps", type=int, default=2, help="steps per side per round")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per side (compilation included)")
    ap.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts (0: leave as is)")
    ap.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    ap.add_argument("--dropout", default="0.1,0", help="comma-separated dropout rates")
    ap.add_argument("--no-profile", action="store_true", help="no profiles of the cells below target")
    ap.add_argument("--quick", action="store_true", help="smoke run: eager only, 1 thread count, 2 rounds of 1 step, "
                    "rough matmul peaks")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the results file")
    args = ap.parse_args()
    args.dropouts = [float(p) for p in args.dropout.split(",")]
    if args.quick:
        args.repeats, args.steps, args.warmup, args.modes = 2, 1, 1, "eager"
        args.threads = args.threads.split(",")[-1]
    shape = {**SHAPE, **PRESETS.get(args.preset, {}), "vocab_size": args.vocab}

    def config_of(p: float) -> GPTConfig:
        return GPTConfig(**shape, embd_dropout=p, attn_dropout=p, resid_dropout=p)

    load = machine_load()
    nanogpt = load_nanogpt()
    if nanogpt is None:
        print(f"nanoGPT: {NANOGPT} is absent; timing dgpt against transformers only")
    sides, cells = build_sides(args, config_of, nanogpt)
    t0 = time.perf_counter()
    for name, trainer in sides.items():  # warm-up, compilation included
        for _ in range(args.warmup):
            trainer.step()
        print(f"warmed up {name} ({time.perf_counter() - t0:.0f}s)", flush=True)
    sections, short = [], []
    for threads in (int(t) for t in args.threads.split(",")):
        lines, missed = measure(args, sides, cells, config_of(0.0), threads)
        sections += lines + [""]
        short += [(threads, c) for c in missed]
        print("\n".join(lines), flush=True)
    sections += ["MFU: the fraction of the measured matmul peak of the cell's dtype that the step's model FLOPs "
                 "reach. nanoGPT is pre-LN with exact GELU (dgpt and HF: post-LN, tanh GELU); the FLOPs are the same."]
    for threads, cell in short[:4] if not (args.quick or args.no_profile) else []:
        if threads:
            torch.set_num_threads(threads)
        sections += ["", f"### dgpt's step, `{key(cell)}`, {threads} thread(s): top ops by self time (2 steps)", "",
                     "```", profile_top(sides[f"dgpt {key(cell)}"]), "```"]
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    write_report("train_throughput", "Training throughput: dgpt vs transformers OpenAI GPT vs nanoGPT",
                 f"`python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}` on {device}. "
                 f"Load at the start: `{load}`", sections, out=args.out)


if __name__ == "__main__":
    main()
