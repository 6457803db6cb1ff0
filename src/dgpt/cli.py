"""The `dgpt` command line. Every subcommand is a thin shell over `dgpt.api`."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import sys
import contextlib
from pathlib import Path

# Before torch loads: OpenMP threads that spin while waiting make steps several times slower when the
# cores are shared (other jobs, torchrun ranks); passive waiting costs nothing measurable otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dgpt import api  # noqa: E402
from dgpt.errors import DgptError  # noqa: E402
from dgpt.logs import messages_to  # noqa: E402
from dgpt.runlock import run_lock  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """Bad arguments end like every other bad input: one `dgpt: error:` line, exit status 2."""

    def error(self, message):
        self.exit(2, f"dgpt: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, ok, what: str):
    """An argparse type: a finite `kind` for which `ok` holds, else an error saying `what` was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE = _number(int, lambda v: v >= 1, "an integer >= 1")
MAX_SAMPLES, MAX_NEW_TOKENS, MAX_BATCH = 256, 100_000, 65_536  # bounds that keep one command within memory


def _config_args(p: argparse.ArgumentParser, what: str = "CONFIG") -> None:
    p.add_argument("config", metavar=what, help="TOML config file" + (" or run directory" if "RUN" in what else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set pretrain.steps=100")


def cmd_prepare(args) -> None:
    config = api.load_run_config(args.config, args.overrides)
    with run_lock(config.run_dir):
        api.prepare(config, oracles=args.oracles)


def cmd_count_pretokens(args) -> None:
    config = api.load_run_config(args.config, args.overrides)
    with run_lock(config.run_dir) if args.out is None else contextlib.nullcontext():
        api.count_pretokens(config, args.oracle, args.out, args.min_count)


def cmd_pretrain(args) -> None:
    config = api.load_run_config(args.config, args.overrides)
    with run_lock(config.run_dir):
        _print_summary(api.pretrain(config, stop_after=args.stop_after))


def _print_summary(summary) -> None:
    """Every training run's closing lines (`RunSummary`); under torchrun, rank 0 speaks for the run."""
    if os.environ.get("RANK", "0") == "0":
        print("\n".join(summary.lines()))


def cmd_flower_app(args) -> None:
    config = api.load_run_config(args.config, args.overrides)
    with run_lock(config.run_dir):  # it writes the run's config
        print(api.flower_app(config, finetune=args.finetune, evaluate=args.eval))


def cmd_eval(args) -> None:
    config = api.load_run_config(args.config, args.overrides)
    print("\n".join(api.evaluate(config, max_windows=args.max_windows, full=args.full).lines()))


def cmd_generate(args) -> None:
    model, tokenizer = api.load_pretrained(args.run_dir, args.device)
    texts = api.generate_text(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        num_samples=args.num_samples,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1}")
        print(text)


def cmd_info(args) -> None:
    from dgpt.runinfo import info_lines

    print("\n".join(info_lines(api.load_run_config(args.config, args.overrides))))


def cmd_export(args) -> None:
    from dgpt.interop.hf import export_hf

    print(f"exported {export_hf(Path(args.run_dir), Path(args.out_dir))}")


def cmd_import(args) -> None:
    from dgpt.interop.hf import import_hf

    print(f"imported into {import_hf(Path(args.hf_dir), Path(args.out_run_dir))}")


def cmd_finetune(args) -> None:
    config = api.load_run_config(args.config, args.overrides)
    with run_lock(config.run_dir):
        _print_summary(api.finetune(config, stop_after=args.stop_after))


def cmd_predict(args) -> None:
    if Path(args.output).is_dir():
        raise DgptError(f"{args.output}: --output is a directory; name the JSONL file to write")
    rows = api.predict(args.run_dir, args.oracle, args.input, args.output, device=args.device, batch_size=args.batch_size)
    print(f"wrote {len(rows)} predictions to {args.output}")


def cmd_plot(args) -> None:
    from dgpt.plot import plot_run
    from dgpt.plot_compare import plot_runs

    if len(args.run_dirs) > 1 and args.out is None:
        raise DgptError(f"{len(args.run_dirs)} runs to compare: name the folder for their overlaid plots with --out DIR")
    paths = plot_run(args.run_dirs[0], args.out) if len(args.run_dirs) == 1 else plot_runs(args.run_dirs, args.out)
    for path in paths:
        print(f"wrote {path}")


def cmd_ledger(args) -> None:
    from dgpt.audit import verify_ledger

    summary = verify_ledger(Path(args.run_dir), [Path(f) for f in args.receipts], args.keys and Path(args.keys))
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
        return
    print(f"ledger intact: {summary.rounds} rounds, {summary.checkpoints_checked} round checkpoints match, every "
          f"signature, statement and value holds; head {summary.head}")
    if summary.keys_checked:
        print(f"keys as in {args.keys}: {', '.join(summary.keys_checked)}")
    else:
        print("keys: the genesis record's own (--keys DIR checks them against copies held elsewhere)")
    for label, rounds in summary.confirmed.items():
        replayed = summary.replayed[label]
        print(f"receipts of '{label}' confirm rounds {_spans(rounds)}" + (f" (rounds {_spans(replayed)} replayed after "
                                                                          "a resume)" if replayed else ""))
    print(f"{'oracle':<24} {'rounds':>6} {'accepted':>8} {'tokens':>12} {'bytes sent':>12} {'contribution':>13} {'share':>7}")
    for name, t in summary.oracles.items():
        print(f"{name:<24} {t.rounds:>6} {t.accepted:>8} {t.tokens:>12,} {t.bytes:>12,} {t.value:>13.5f} {t.share:>7.1%}")


def _spans(rounds: list[int]) -> str:
    """1, 2, 3, 5 -> '1-3, 5'."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans) or "none"


def cmd_keygen(args) -> None:
    from dgpt.rundir import check_oracle_name
    from dgpt.runtimes.identity import keygen

    private, public = keygen(Path(args.out), check_oracle_name(args.name, "--name"))
    print(f"wrote {private} (private: keep it to yourself) and {public} (public: name it in the config)")


def cmd_demo(args) -> None:
    from dgpt.demo import run_demo

    with run_lock(args.run_dir):
        run_demo(Path(args.run_dir), rounds=args.rounds, inner_steps=args.inner_steps)


def _verbosity_args(p: argparse.ArgumentParser, default) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG, default=default,
                       help="also debug messages, and the traceback of an unexpected error")
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING, default=default,
                       help="only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dgpt", description="Decentralized GPT: pre-train and fine-tune across data owners")
    _verbosity_args(parser, logging.INFO)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="train the tokenizer and write every oracle's token shards")
    _config_args(p)
    p.add_argument("--oracle", dest="oracles", action="append", metavar="NAME",
                   help="only this oracle's shards (repeatable; the oracles this machine holds); needs "
                        "tokenizer.counts or tokenizer.path")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("count-pretokens", help="count one oracle's pre-tokens: what it shares to train the tokenizer")
    _config_args(p)
    p.add_argument("--oracle", required=True, metavar="NAME", help="the oracle whose training text is counted")
    p.add_argument("--out", help="count file (default: RUN_DIR/pretoken_counts/NAME.json)")
    p.add_argument("--min-count", type=POSITIVE, default=1, metavar="N",
                   help="leave out pre-tokens seen fewer than N times (default 1: keep all; > 1 changes the tokenizer)")
    p.set_defaults(func=cmd_count_pretokens)

    p = sub.add_parser("pretrain", help="pre-train (central, sim or torchrun runtime, from the config)")
    _config_args(p)
    p.add_argument("--stop-after", type=POSITIVE, default=None, help="stop (checkpointed) after this step/round")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("flower-app", help="write the Flower App of a runtime = 'flower' config; start it with `flwr run`")
    _config_args(p)
    p.add_argument("--finetune", action="store_true", help="an app that fine-tunes (DSFT) instead of pre-training")
    p.add_argument("--eval", action="store_true", help="an app (RUN_DIR/flower_eval_app) whose run has every SuperNode "
                   "validate the newest checkpoint on its own data and keep it in its run directory")
    p.set_defaults(func=cmd_flower_app)

    p = sub.add_parser("eval", help="re-score the newest checkpoint: loss and perplexity per oracle and global "
                                    "(pre-training), each oracle's head on its validation set (fine-tuning)")
    _config_args(p, "CONFIG_OR_RUN")
    windows = p.add_mutually_exclusive_group()
    windows.add_argument("--max-windows", type=POSITIVE, default=None,
                         help="validation windows per oracle (default: pretrain.eval_windows)")
    windows.add_argument("--full", action="store_true", help="every validation window")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a run's newest checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=_number(int, lambda v: 1 <= v <= MAX_NEW_TOKENS, f"an integer in [1, {MAX_NEW_TOKENS}]"),
                   default=100)
    p.add_argument("--min-new-tokens", type=_number(int, lambda v: 0 <= v <= MAX_NEW_TOKENS, f"an integer in [0, {MAX_NEW_TOKENS}]"),
                   default=0, metavar="N", help="end-of-text is not sampled before N new tokens (at most --max-new-tokens)")
    p.add_argument("--num-samples", type=_number(int, lambda v: 1 <= v <= MAX_SAMPLES, f"an integer in [1, {MAX_SAMPLES}]"),
                   default=1)
    p.add_argument("--temperature", type=_number(float, lambda v: v >= 0, "a number >= 0"), default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=_number(int, lambda v: v >= 0, "an integer >= 0"), default=0, help="0 = off")
    p.add_argument("--top-p", type=_number(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), default=0.95)
    p.add_argument("--seed", type=_number(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"), default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameters, oracles and their tokens, checkpoints")
    _config_args(p, "CONFIG_OR_RUN")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="write a run's newest checkpoint in another format")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers model directory")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="make a dgpt run from a local Hugging Face GPT-1 / GPT-2 directory")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_run_dir", metavar="OUT_RUN_DIR")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("finetune", help="fine-tune across oracles, one task head each (DSFT; sim or torchrun runtime)")
    _config_args(p)
    p.add_argument("--stop-after", type=POSITIVE, default=None, help="stop (checkpointed) after this round")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("predict", help="label a JSONL file with a fine-tuned run and one oracle's head")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--oracle", required=True, help="whose head to use")
    p.add_argument("--input", required=True, metavar="IN.jsonl", help="rows with the task's fields (a label is not needed)")
    p.add_argument("--output", required=True, metavar="OUT.jsonl", help="one {label, probabilities} object per input row")
    p.add_argument("--batch-size", type=_number(int, lambda v: 1 <= v <= MAX_BATCH, f"an integer in [1, {MAX_BATCH}]"),
                   default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ledger", help="verify a run's contribution ledger (hash chain, signatures, values "
                       "recomputed from the signed losses, checkpoints, oracles' receipts) and total each oracle's share")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="the totals as JSON")
    p.add_argument("--receipts", nargs="+", default=[], metavar="FILE",
                   help="oracles' receipts.jsonl: every signed head they hold must be in the ledger")
    p.add_argument("--keys", metavar="DIR", help="PARTY.pub files the genesis record's keys must equal")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("keygen", help="a new Ed25519 key pair for signing the ledger: DIR/NAME.key (0600) and DIR/NAME.pub")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--name", default="signing", help="the key's file name (default: signing)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl (loss, scores) into RUN_DIR/plots/; "
                                    "several runs: overlaid, one curve per run, into --out DIR")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", metavar="DIR", help="where the PNGs go (one run: default RUN_DIR/plots; several runs: required)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="offline end-to-end run on three oracles built from Python's standard library")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--rounds", type=POSITIVE, default=8)
    p.add_argument("--inner-steps", type=POSITIVE, default=25, help="inner steps per oracle per round (H)")
    p.set_defaults(func=cmd_demo)
    for p in sub.choices.values():  # -v / -q also after the command; given there, they win
        _verbosity_args(p, argparse.SUPPRESS)
    return parser


@contextlib.contextmanager
def _messages_on_stderr(level: int):
    """dgpt's messages as plain lines on stderr (stdout carries the commands' results) while the block runs;
    main may run more than once in a process (tests, notebooks), so logging is left as it was found."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        level = max(level, logging.WARNING)
    with messages_to(logging.StreamHandler(sys.stderr), level):
        yield


_OS_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or the file size limit",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def _os_error(e: OSError) -> str:
    """An error of the environment as one line: the file, what happened, and that nothing complete was lost."""
    what = _OS_ERRORS.get(e.errno, e.strerror or str(e))
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what += " (files are written under temporary names: the complete ones, the last checkpoint included, are intact)"
    return f"{e.filename}: {what}" if e.filename is not None else what


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or bad arguments (already reported in one line)
        return e.code if isinstance(e.code, int) else 2
    with _messages_on_stderr(args.log_level):
        try:
            args.func(args)
        except DgptError as e:
            print(f"dgpt: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            if args.log_level <= logging.DEBUG:
                raise
            print(f"dgpt: error: {_os_error(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("dgpt: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
            return 130
        except Exception as e:
            if args.log_level <= logging.DEBUG:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"dgpt: error: unexpected {type(e).__name__}: {first} (rerun with -v for the traceback)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
