"""DUPT benchmark: centralised vs decentralised (DiLoCo) pre-training of one GPT-1 decoder, side by side.

Run (from the project root, venv active; ~20 min on 2 free CPU cores, far longer when they are shared; ~1 min
with --quick):

    python benchmarks/dupt.py [--steps 600] [--batch 8] [--quick] [--jobs 2] [--out benchmarks/results] [--runs runs/bench_dupt]
    python benchmarks/dupt.py --replot        # rewrite dupt.md and the plots from dupt_runs.json
    python benchmarks/dupt.py --arms central,H=50 --outer-lr 2 --outer-momentum 0 --runs /tmp/sweep  # a sweep: prints only
    python benchmarks/dupt.py --steps 2400 --arms "central,H=50,central batch 8,H=50 IID" --stem dupt_horizon_2400
    python benchmarks/dupt.py --ln pre --inner-lr 2e-3 --outer-lr 1 --outer-momentum 0 --arms "central,H=50,H=50 fedexp" --runs /tmp/s

Four non-IID oracles of unequal size (Shakespeare, WikiText-2, Python docs, Topical-Chat from
../shared/data/pretrain) pre-train one model. Every arm trains on the same number of tokens:
`--steps` optimizer steps of batch B per oracle (decentralised), or `--steps` steps of batch 4B on
the pooled data (centralised). Arms:
  central                 pooled data, global batch 4B                   (the baseline)
  H=1, 10, 50, 200        sim runtime, DiLoCo outer Nesterov SGD (lr 0.7, momentum 0.9)
  H=50 int8               int8 pseudo-gradients (per-tensor scales)
  H=50 drop 0.5           each oracle misses each round with probability 0.5 (fewer tokens trained)
  H=50 poison <agg>       one oracle sends -10 x its pseudo-gradient; mean, trimmed_mean (0.25), median
Controls say where the gap to central comes from:
  central batch 8         one trainer with one oracle's batch (a quarter of the tokens): what one oracle gets alone
  H=50 IID, H=1 IID       every oracle holds the pooled corpus: no non-IID data
  ... fedexp              the same arms with FedExP extrapolation of the aggregated update
Measured per arm: global validation loss (per-oracle losses weighted by training tokens, the same
weights for every arm) and its ratio to central, per-oracle validation losses, bytes moved (total and
sent by oracles) against what synchronous data parallel would move for the same steps, wall time.
Writes dupt.md, dupt_runs.json, dupt_loss_vs_tokens.png and dupt_loss_vs_bytes.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("TQDM_MININTERVAL", "30")  # keep the nohup log readable; read when tqdm is imported

import torch  # noqa: E402
from dupt_report import summarise, write_outputs  # noqa: E402
from federated_runs import DATASETS, FULL, QUICK, RUNNERS, base_config, fresh_run_dir, messages_as  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.config import config_from_dict  # noqa: E402
from dgpt.data.tokenizer import TextTokenizer  # noqa: E402
from dgpt.model.gpt import GPT  # noqa: E402
from dgpt.runtimes.setup import model_config_for  # noqa: E402

# name, kind, federation overrides, poisoned?
ARMS = [
    ("central", "central", {}, False),
    ("H=1", "sim", {"inner_steps": 1}, False),
    ("H=10", "sim", {"inner_steps": 10}, False),
    ("H=50", "sim", {"inner_steps": 50}, False),
    ("H=200", "sim", {"inner_steps": 200}, False),
    ("H=50 int8", "sim", {"inner_steps": 50, "compression": "int8"}, False),
    ("H=50 drop 0.5", "sim", {"inner_steps": 50, "drop_prob": 0.5}, False),
    ("H=50 poison mean", "sim", {"inner_steps": 50, "aggregator": "mean"}, True),
    ("H=50 poison trimmed", "sim", {"inner_steps": 50, "aggregator": "trimmed_mean", "trim_fraction": 0.25}, True),
    ("H=50 poison median", "sim", {"inner_steps": 50, "aggregator": "median"}, True),
    ("central batch 8", "central_one_batch", {}, False),
    ("H=50 IID", "sim_iid", {"inner_steps": 50}, False),
    ("H=1 IID", "sim_iid", {"inner_steps": 1}, False),
    ("H=1 fedexp", "sim", {"inner_steps": 1, "extrapolation": "fedexp"}, False),
    ("H=50 fedexp", "sim", {"inner_steps": 50, "extrapolation": "fedexp"}, False),
    ("H=50 fedexp int8", "sim", {"inner_steps": 50, "extrapolation": "fedexp", "compression": "int8"}, False),
    ("H=50 IID fedexp", "sim_iid", {"inner_steps": 50, "extrapolation": "fedexp"}, False),
    ("H=1 IID fedexp", "sim_iid", {"inner_steps": 1, "extrapolation": "fedexp"}, False),
]


def run_arm(arm: tuple, runs: Path, setup: dict, steps: int) -> tuple[list[dict], float]:
    """One arm in a worker process (one torch thread: much faster than two when the cores are shared)."""
    torch.set_num_threads(1)
    name, kind, fed, poisoned = arm
    print(f"=== {name}: start", flush=True)
    t0 = time.perf_counter()
    curve = RUNNERS[kind](fresh_run_dir(runs, name), setup, steps, fed, poisoned)
    seconds = time.perf_counter() - t0
    print(f"=== {name}: done in {seconds:.0f} s", flush=True)
    return curve, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="inner steps per oracle in total (a multiple of 200)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (~1 minute): 200 steps at most")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once (one process, one thread each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_dupt"), help="run directories (scratch)")
    parser.add_argument("--replot", action="store_true", help="only rewrite STEM.md and the plots from STEM_runs.json")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="outer SGD learning rate (DiLoCo: 0.7)")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="outer Nesterov momentum (DiLoCo: 0.9)")
    parser.add_argument("--arms", help="comma-separated subset of the arms (central and H=50 among them); prints only, "
                        "unless --stem names a report for it")
    parser.add_argument("--ln", choices=("pre", "post"), default="post", help="layer-norm placement (GPT-1: post)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr (cosine to a tenth)")
    parser.add_argument("--inner-lr", type=float, help="peak lr of the decentralised arms' inner AdamW (default: --lr)")
    parser.add_argument("--batch", type=int, help="windows per oracle step (default 8; central: 4x)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", help="pretrain.dtype of every arm: float32, bfloat16, auto")
    parser.add_argument("--preset", help="a dgpt model preset (its own shape) instead of the benchmark's tiny model")
    parser.add_argument("--data", choices=sorted(DATASETS), default="small", help="small: the four shared corpora; "
                        "large: Gutenberg and Linux docs (pretrain_large) with WikiText-2 and Topical-Chat")
    parser.add_argument("--stem", help="output file names: STEM.md, STEM_runs.json, STEM_loss_vs_*.png (default: dupt)")
    args = parser.parse_args()
    if args.replot:
        return write_outputs(json.loads((args.out / f"{args.stem or 'dupt'}_runs.json").read_text()), args.out)
    setup, steps = (QUICK, min(200, args.steps)) if args.quick else (FULL, args.steps)
    model = {"preset": args.preset} if args.preset else setup["model"]
    setup = {**setup, "model": {**model, "ln": args.ln}, "device": args.device, "dtype": args.dtype, "data": args.data, "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum,
             "batch": args.batch or setup["batch"], "lr": args.lr, "inner_lr": args.inner_lr or args.lr}
    arms = [a for a in ARMS if not args.arms or a[0] in args.arms.split(",")]
    horizon = max(a[2].get("inner_steps", 1) for a in arms)
    if steps % horizon:
        parser.error(f"--steps must be a multiple of {horizon} (the largest H)")
    args.out.mkdir(parents=True, exist_ok=True)

    shared = config_from_dict(base_config(args.runs / "_data", setup, steps, setup["batch"], {}, 1))
    with messages_as("prepare"):
        stats = api.prepare(shared)
    weights = {n: stats[n]["train"]["tokens"] for n in DATASETS[args.data]}
    vocab = TextTokenizer.load(args.runs / "_data" / "tokenizer.json").vocab_size
    model_config = model_config_for(shared, vocab)
    params = GPT(model_config).num_params()
    epochs = {n: round(steps * setup["batch"] * model_config.n_ctx / t, 2) for n, t in weights.items()}
    print(f"epochs per oracle over its training tokens: {epochs}")
    dp_per_step = 2 * 4 * params * len(weights)  # each of 4 oracles sends and receives one fp32 gradient per step
    print(f"model {params:,} parameters; {steps} steps x {setup['batch']} windows x {setup['model']['n_ctx']} tokens "
          f"per oracle; oracle training tokens {weights}")

    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_arm, arm, args.runs, setup, steps) for arm in arms]
        results = []
        for arm, future in zip(arms, futures):
            curve, seconds = future.result()
            results.append(summarise(arm[0], curve, weights, 0 if arm[1] == "central_one_batch" else dp_per_step, seconds))
            print(f"{arm[0]}: global loss {results[-1]['loss']:.4f}", flush=True)
    if len(arms) < len(ARMS) and not args.stem:
        return
    write_outputs({"stem": args.stem or "dupt", "command": " ".join(shlex.quote(a) for a in sys.argv[1:]), "steps": steps, "quick": args.quick, "jobs": args.jobs, "setup": setup, "params": params, "epochs": epochs,
                   "weights": weights, "arms": results}, args.out)


if __name__ == "__main__":
    main()
