"""Leakage benchmark: canary exposure (the "secret sharer" method) with and without example-level DP-SGD.

Run (from the project root, venv active; see the README's "Privacy" for the time it takes alone):

    python benchmarks/privacy.py [--steps 1000] [--inner-steps 50] [--candidates 4096] [--canaries 2]
    python benchmarks/privacy.py --quick        # a smoke run (two small oracles, a few steps): proves it works

Canaries "my account number is D D D D D D D D" (8 random digits, every canary distinct) are planted in one
oracle's training text (Shakespeare, the smallest corpus: each planted copy is seen most often), `--canaries` of
them at each of 1, 4, 16 and 64 repetitions, each copy its own document at a random place (`data.dedup` is off so
that the copies stay). Every arm trains the four shared corpora as oracles (`federated`, the sim runtime, FedAvg
outer step) or pooled (`central`, at the federated run's tokens), with no DP, DP-SGD at epsilon 8 and at epsilon 1
(`privacy.target_epsilon`, delta 1e-5, max_grad_norm 1; unit: one training window of the oracle).

Exposure of a canary under a model (Carlini et al., "The Secret Sharer", 2019): its log-perplexity (the summed
negative log-likelihood of its 8 digits after "my account number is") is ranked among those of the C = 10^8
possible digit strings; exposure = log2(C) - log2(rank). The rank is estimated from `--candidates` uniformly random
digit strings, two ways: `sampled`, -log2((1 + n_lower) / (S + 1)) with n_lower the sampled candidates scored lower
(exact in expectation; at most log2(S + 1), a ceiling the table marks with >=), and `extrapolated`, -log2 F(x) with
F a skew-normal fitted to the candidates' log-perplexities (Carlini et al.'s estimate; it can exceed the ceiling).
A random string's expected exposure is about 1.4 bits.

Three models are scored: the pooled `central` model, the final `federated` model, and the `single update` model an
aggregator rebuilds from the canary oracle's pseudo-gradient alone, Theta - Delta_j (its own locally trained model),
in the round where that canary's exposure is highest. Each arm's final validation loss (token-weighted, the four
oracles) and training tokens/s are reported with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_MININTERVAL", "30")

import torch  # noqa: E402
from scipy import stats  # noqa: E402
from torch.nn.utils import parameters_to_vector  # noqa: E402

from _timing import machine_load, table, write_report  # noqa: E402
from federated_runs import DATASETS, SHORT, base_config, fresh_run_dir, messages_as  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.config import config_from_dict  # noqa: E402
from dgpt.runtimes.federated import copy_into, pretraining_work  # noqa: E402
from dgpt.runtimes.sim import pretrain_sim  # noqa: E402

SECRET = "literature_shakespeare"
PREFIX = "my account number is"
DIGITS = 8
REPEATS = (1, 4, 16, 64)
LEVELS = {"no DP": {}, "DP eps 8": {"target_epsilon": 8.0}, "DP eps 1": {"target_epsilon": 1.0}}
FULL = dict(model={"preset": "tiny", "n_layer": 2, "d_model": 128, "n_head": 4, "d_ff": 512, "n_ctx": 64, "ln": "pre"},
            batch=8, eval_windows=48, lr=2e-3, inner_lr=2e-3, outer_lr=1.0, outer_momentum=0.0, oracles=None, chars=None)
QUICK = dict(model={"preset": "tiny", "n_layer": 1, "d_model": 64, "n_head": 2, "d_ff": 256, "n_ctx": 32, "ln": "pre"},
             batch=4, eval_windows=8, lr=2e-3, inner_lr=2e-3, outer_lr=1.0, outer_momentum=0.0,
             oracles=[SECRET, "encyclopedia_wikitext2"], chars=150_000)


def digits(rng: random.Random) -> str:
    return " ".join(rng.choice("0123456789") for _ in range(DIGITS))


def plant(corpora: Path, setup: dict, per_level: int, seed: int) -> tuple[dict[str, Path], dict[str, int]]:
    """Every oracle's text (cut to `chars` in quick mode), the canaries' copies inserted into the secret oracle's;
    returns the oracle folders and each canary with its repetitions."""
    rng = random.Random(seed)
    canaries: dict[str, int] = {}
    while len(canaries) < per_level * len(REPEATS):
        canaries.setdefault(f"{PREFIX} {digits(rng)}", REPEATS[len(canaries) // per_level])
    folders = {}
    for name, source in DATASETS["small"].items():
        if setup["oracles"] and name not in setup["oracles"]:
            continue
        folder = corpora / name
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            text = (source / f"{split}.txt").read_text(encoding="utf-8")[: setup["chars"]]
            if name == SECRET and split == "train":
                docs = text.split("\n\n")
                for canary, times in canaries.items():
                    for _ in range(times):
                        docs.insert(rng.randrange(len(docs) + 1), canary)
                text = "\n\n".join(docs)
            (folder / f"{split}.txt").write_text(text, encoding="utf-8")
        folders[name] = folder
    return folders, canaries


def raw_config(run_dir: Path, setup: dict, folders: dict[str, Path], steps: int, inner_steps: int, runtime: str,
               privacy: dict) -> dict:
    rounds = steps // inner_steps
    fed = {"runtime": runtime, "rounds": rounds, "inner_steps": inner_steps, "eval_interval": rounds}
    batch = setup["batch"] if runtime == "sim" else setup["batch"] * len(folders)
    central_steps = steps if runtime == "central" else 0
    raw = base_config(run_dir, setup, central_steps or steps, batch, fed, 10**9)
    raw["pretrain"]["steps"] = central_steps
    raw["oracles"] = [{"name": n, "train": [str(d / "train.txt")], "valid": [str(d / "valid.txt")]} for n, d in folders.items()]
    raw["data"] = {"dedup": False}  # the canaries' copies are exact duplicates: keep them
    raw["privacy"] = {"delta": 1e-5, "max_grad_norm": 1.0, **privacy}
    return raw


class Scorer:
    """Log-perplexity of digit strings after PREFIX under a model: the summed NLL of the digits' tokens."""

    def __init__(self, tokenizer, candidates: list[str], canaries: list[str]):
        self.tokenizer = tokenizer
        prefix = tokenizer.encode(PREFIX)
        texts = candidates + canaries
        rows = [[tokenizer.eot_id] + tokenizer.encode(t) for t in texts]
        assert all(r[1 : 1 + len(prefix)] == prefix for r in rows), "the prefix must tokenize alike in every string"
        width = max(map(len, rows))
        self.ids = torch.tensor([r + [tokenizer.eot_id] * (width - len(r)) for r in rows])
        positions = torch.arange(width - 1)
        lengths = torch.tensor([len(r) for r in rows])
        self.mask = (positions >= len(prefix)) & (positions < (lengths - 1).unsqueeze(1))  # targets: the digits
        self.count = len(candidates)

    @torch.no_grad()
    def __call__(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates' log-perplexities, canaries' log-perplexities)."""
        model.eval()
        nll = []
        for chunk in range(0, len(self.ids), 512):
            ids = self.ids[chunk : chunk + 512]
            logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)
            token = -logp.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
            nll.append((token * self.mask[chunk : chunk + 512]).sum(1))
        scores = torch.cat(nll)
        return scores[: self.count], scores[self.count :]


def exposures(candidates: torch.Tensor, canaries: torch.Tensor) -> list[dict]:
    """Each canary's sampled and extrapolated exposure among the candidates."""
    shape = stats.skewnorm.fit(candidates.numpy())
    out = []
    for x in canaries.tolist():
        lower = int((candidates < x).sum())
        tail = stats.skewnorm.logcdf(x, *shape) / math.log(2)
        out.append({"sampled": -math.log2((1 + lower) / (len(candidates) + 1)), "extrapolated": float(-tail),
                    "at_ceiling": lower == 0})
    return out


def train(run_dir: Path, raw: dict, snapshot_every: int | None) -> tuple[dict, list[torch.Tensor]]:
    """One arm; with `snapshot_every` (federated), the secret oracle's locally trained model at the end of each of
    its rounds (Theta - Delta_j: what its pseudo-gradient alone gives away)."""
    config = config_from_dict(raw)
    snapshots: list[torch.Tensor] = []

    def work(*args):
        local = pretraining_work(*args)
        loop, step = local.loops[SECRET], local.loops[SECRET].train_step

        def train_step():
            loss = step()
            if loop.step % snapshot_every == 0:
                snapshots.append(parameters_to_vector(local.params).detach().clone())
            return loss

        loop.train_step = train_step
        return local

    with messages_as(run_dir.name):
        t0 = time.perf_counter()
        summary = pretrain_sim(config, work=work) if snapshot_every else api.pretrain(config)
        seconds = time.perf_counter() - t0
    result = {"loss": summary.loss, "tokens": summary.tokens, "seconds": summary.seconds, "wall_s": seconds,
              "tokens_per_s": summary.tokens / summary.seconds, "epsilon": summary.epsilon}
    return result, snapshots


def score_arm(run_dir: Path, scorer_of, snapshots: list[torch.Tensor]) -> dict:
    model, tokenizer = api.load_pretrained(run_dir, device="cpu")
    scorer = scorer_of(tokenizer)
    final = exposures(*scorer(model))
    if not snapshots:
        return {"final": final}
    per_round = []
    for vector in snapshots:
        copy_into(list(model.parameters()), vector)
        per_round.append(exposures(*scorer(model)))
    best = [max(range(len(per_round)), key=lambda r: per_round[r][i]["extrapolated"]) for i in range(len(final))]
    return {"final": final, "single": [{**per_round[r][i], "round": r + 1} for i, r in enumerate(best)]}


def cell(values: list[dict], key: str) -> str:
    mean = sum(v[key] for v in values) / len(values)
    return (">=" if key == "sampled" and all(v["at_ceiling"] for v in values) else "") + f"{mean:.1f}"


def report(data: dict, args) -> str:
    reps = data["repetitions"]
    sections = []
    for key in ("extrapolated", "sampled"):
        rows = []
        for times in REPEATS:
            which = [i for i, r in enumerate(reps) if r == times]
            row = [f"{times}x"]
            for level in LEVELS:
                arms = data["arms"][level]
                row += [cell([arms["central"]["exposure"]["final"][i] for i in which], key),
                        cell([arms["federated"]["exposure"]["final"][i] for i in which], key),
                        cell([arms["federated"]["exposure"]["single"][i] for i in which], key)]
            rows.append(row)
        headers = ["repetitions"] + [f"{lv}: {m}" for lv in LEVELS for m in ("central", "federated", "single update")]
        sections += [f"## Exposure in bits ({key}; mean over each row's {args.canaries} canar{'y' if args.canaries == 1 else 'ies'})", "", table(headers, rows), ""]
    cost = []
    for level, arms in data["arms"].items():
        for kind in ("central", "federated"):
            arm = arms[kind]
            eps = ", ".join(f"{SHORT.get(n, n)} {e:.2f}" for n, e in arm["epsilon"].items()) or "-"
            cost.append([level, kind, f"{arm['loss']:.4f}", f"{arm['tokens_per_s']:,.0f}", eps])
    sections += ["## What each setting costs", "", table(["privacy", "run", "validation loss", "tokens/s", "epsilon spent"], cost), ""]
    return "\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="inner steps per oracle (central: the same number of pooled steps)")
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=4096)
    parser.add_argument("--canaries", type=int, default=2, help="canaries per repetition level")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_privacy"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    if args.quick:
        args.steps, args.inner_steps, args.candidates, args.canaries = 12, 4, 256, 1
        args.runs = args.runs.with_name(args.runs.name + "_quick")
    folders, canaries = plant(args.runs / "corpora", setup, args.canaries, seed=11)
    rng = random.Random(12)
    candidates = [f"{PREFIX} {digits(rng)}" for _ in range(args.candidates)]
    with messages_as("prepare"):
        api.prepare(config_from_dict(raw_config(args.runs / "_data", setup, folders, args.steps, args.inner_steps, "sim", {})))

    def scorer_of(tokenizer):
        return Scorer(tokenizer, candidates, list(canaries))

    started = machine_load()
    data = {"canaries": list(canaries), "repetitions": list(canaries.values()), "arms": {}}
    for level, privacy in LEVELS.items():
        data["arms"][level] = {}
        for runtime, kind in (("central", "central"), ("sim", "federated")):
            run_dir = fresh_run_dir(args.runs, f"{kind}_{level}")
            raw = raw_config(run_dir, setup, folders, args.steps, args.inner_steps, runtime, privacy)
            result, snapshots = train(run_dir, raw, args.inner_steps if runtime == "sim" else None)
            result["exposure"] = score_arm(run_dir, scorer_of, snapshots)
            data["arms"][level][kind] = result
            print(f"{level} {kind}: loss {result['loss']:.4f}, {result['tokens_per_s']:,.0f} tokens/s, "
                  f"64x exposure {[e['extrapolated'] for e, r in zip(result['exposure']['final'], canaries.values()) if r == 64]}")
    (args.runs / "privacy_runs.json").write_text(json.dumps(data, indent=1))
    intro = (f"{len(folders)} oracles ({', '.join(SHORT.get(n, n) for n in folders)}), the canaries in {SHORT[SECRET]}'s text; "
             f"model {json.dumps(setup['model'])}; {args.steps} inner steps per oracle (H = {args.inner_steps}, FedAvg outer "
             f"step), batch {setup['batch']} windows per oracle (DP: Poisson, that many expected); central: the same "
             f"steps with the pooled batch. {args.candidates} random candidates per ranking; {args.canaries} "
             f"canar{'y' if args.canaries == 1 else 'ies'} per repetition level. Machine load at the start: `{started}`."
             + (" **Smoke run (--quick): the numbers mean nothing.**" if args.quick else ""))
    out = args.runs if args.quick else None
    write_report("privacy", "Canary exposure with and without DP-SGD", intro, [report(data, args)],
                 **({"out": out} if out else {}))


if __name__ == "__main__":
    main()
