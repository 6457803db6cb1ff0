"""DSFT: what the round driver trains when fine-tuning (`LocalWork` for `train_federated`).

The body (the GPT: decoder + tied LM head used by the auxiliary L1) starts from a DUPT checkpoint
(`finetune.init_from`) or from scratch, and is aggregated every round exactly like pre-training.
Each oracle keeps its own head W_y(O_j) in its loop: it is never part of the sent vector, unless
`finetune.shared_head` asks for one head aggregated with the body (every oracle has the same task).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from dgpt.config import Config, FinetuneConfig, OracleConfig, dump_config
from dgpt.data.tasks import ExampleSampler, TaskExamples, TaskSpec, encode_examples, load_split, read_rows, task_spec
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError
from dgpt.fileio import write_text
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT
from dgpt.model.heads import TaskHead, TaskModel
from dgpt.rundir import RunDir, checkpoint_number
from dgpt.runtimes.federated import Transport, Work, load_oracle_state, oracle_seed
from dgpt.runtimes.setup import load_newest, model_config_for, newest_weights
from dgpt.train.checkpoint import load_weights_into
from dgpt.train.local import LoopSettings, check_training_memory, describe_dtype, pick_device
from dgpt.train.task_eval import METRICS, evaluate_task, task_gradient
from dgpt.train.task_loop import TaskLoop

logger = logging.getLogger(__name__)


def starting_point(config: Config) -> tuple[TextTokenizer, GPTConfig, Path | None]:
    """Tokenizer, model config and the DUPT weights to start from (None: from scratch)."""
    if config.finetune.init_from:
        return newest_weights(Path(config.finetune.init_from))
    if not config.tokenizer.path:
        raise DgptError("finetune.init_from is empty (from scratch): set tokenizer.path to the tokenizer.json to use")
    tokenizer = TextTokenizer.load(config.tokenizer.path)
    return tokenizer, model_config_for(config, tokenizer.vocab_size), None


def load_task(oracle: OracleConfig, tokenizer: TextTokenizer, max_len: int) -> tuple[TaskSpec, TaskExamples, TaskExamples | None]:
    """An oracle's head spec, training examples and validation examples (None without a valid split)."""
    task, name = oracle.task, oracle.name
    base = TaskSpec(task.type, list(task.labels), task.regression, task.num_choices, dict(task.columns), max_len)
    rows = read_rows(task.train, base, name)
    if not rows:
        raise DgptError(f"oracle '{name}': no labeled training examples in {', '.join(task.train) or 'task.train (empty)'}")
    spec = task_spec(task, rows, max_len, name)
    train = encode_examples(rows, spec, tokenizer, name)
    valid = load_split(task.valid, spec, tokenizer, name) if task.valid else None
    for split, examples in (("training", train), ("validation", valid)):
        if examples is not None and examples.truncated:
            logger.info(f"oracle '{name}': {examples.truncated} of {len(examples)} {split} examples truncated to {max_len} tokens")
    return spec, train, valid


def finetune_work(config: Config, transport: Transport, local_names: list[str]) -> Work:
    ft, run_dir = config.finetune, RunDir(config.run_dir)
    untasked = [o.name for o in config.oracles if o.task is None and o.name in local_names]  # a SuperNode knows only its own
    if not config.oracles or untasked:
        raise DgptError(f"fine-tuning needs an [oracles.task] for every oracle; missing for: {', '.join(untasked) or '(no oracles)'}")
    tokenizer, model_config, init = starting_point(config)
    max_len = ft.max_len or model_config.n_ctx
    if max_len > model_config.n_ctx:
        raise DgptError(f"finetune.max_len {max_len} exceeds the model's n_ctx {model_config.n_ctx}")
    device = pick_device(config.pretrain.device)
    check_training_memory(model_config, device, "finetune.batch_size", ft.batch_size, max_len, len(local_names),
                          config.privacy.enabled)
    oracles = {o.name: o for o in config.oracles}
    data = {name: load_task(oracles[name], tokenizer, max_len) for name in local_names}
    sizes = transport.gather_scalars({name: float(len(train)) for name, (_, train, _) in data.items()})
    if transport.is_leader:
        tokenizer.save(run_dir.tokenizer)
        write_text(run_dir.config, dump_config(config))
    rounds, steps, examples = schedule(ft, int(max(sizes.values())))
    settings = loop_settings(config, steps)
    logger.info(describe_dtype(config.pretrain.dtype, device))
    gpt = shared_body(config, tokenizer, model_config, init).to(device)
    names = config.oracle_names()
    shared = _head(data[local_names[0]][0], model_config, ft.classifier_dropout, config.seed, device) if ft.shared_head else None
    loops = {}
    for name, (spec, train, _) in data.items():
        seed = oracle_seed(config.seed, names.index(name))
        head = shared or _head(spec, model_config, ft.classifier_dropout, seed, device)
        sampler = ExampleSampler(train, seed, name)
        loops[name] = TaskLoop(TaskModel(gpt, head), spec, settings, sampler, steps, device, seed, ft.lambda_lm, examples)
        if config.privacy.enabled:
            loops[name].make_private(config.privacy, name)
    params = list(gpt.parameters()) + (list(shared.parameters()) if shared is not None else [])

    def evaluate() -> dict[str, dict[str, float]]:
        return {
            name: evaluate_task(loops[name].model, valid, spec, ft.eval_batch_size, device, settings.dtype)
            for name, (spec, _, valid) in data.items() if valid is not None and len(valid)
        }

    def gradient() -> dict[str, torch.Tensor]:
        return {name: task_gradient(loops[name].model, valid, params, ft.eval_batch_size, device, settings.dtype)
                for name, (_, _, valid) in data.items() if valid is not None and len(valid)}

    return Work(gpt, params, loops, sizes, evaluate, rounds, ft.inner_steps, METRICS, "examples", steps, gradient,
                private_heads=shared is None)


def schedule(ft: FinetuneConfig, largest: int) -> tuple[int, int, int | None]:
    """Rounds, each oracle's optimizer steps, and the examples each oracle trains (None: every batch full).

    `finetune.rounds` set: that many rounds of H full steps. Otherwise exactly `epochs` passes over the largest
    oracle's set: the last batch and the last round are as short as that needs, so oracles holding parts of a task
    train on as many examples together as one oracle holding all of it.
    """
    if ft.rounds:
        return ft.rounds, ft.rounds * ft.inner_steps, None
    examples = max(1, round(ft.epochs * largest))
    steps = math.ceil(examples / ft.batch_size)
    return math.ceil(steps / ft.inner_steps), steps, examples


def loop_settings(config: Config, total_steps: int) -> LoopSettings:
    """GPT-1's fine-tuning schedule from [finetune]: AdamW, linear warmup over a fraction of all steps, linear decay to 0."""
    ft = config.finetune
    return LoopSettings(
        lr=ft.lr, batch_size=ft.batch_size, warmup_steps=round(ft.warmup * total_steps), schedule="linear",
        weight_decay=ft.weight_decay, beta1=ft.beta1, beta2=ft.beta2, grad_clip=ft.grad_clip, dtype=config.pretrain.dtype,
    )


def shared_body(config: Config, tokenizer: TextTokenizer, model_config: GPTConfig, init: Path | None) -> GPT:
    """The shared GPT: from the run's seed, with the DUPT checkpoint's weights when there is one."""
    torch.manual_seed(config.seed)
    gpt = GPT(model_config)
    if init is not None:
        fresh = _task_token_ids(tokenizer) if config.finetune.fresh_task_tokens else []
        drawn = gpt.transformer.wte.weight.detach()[fresh].clone()
        load_weights_into(gpt, init, model_config)
        with torch.no_grad():  # GPT-1 adds these tokens at fine-tuning, with new random embeddings
            gpt.transformer.wte.weight[fresh] = drawn
    return gpt


def _task_token_ids(tokenizer: TextTokenizer) -> list[int]:
    """<|pad|> <|start|> <|delim|> <|extract|>: never inputs in pre-training, so their tied embeddings were only
    trained as outputs that are never right (pushed away from every hidden state)."""
    return [tokenizer.pad_id, tokenizer.start_id, tokenizer.delim_id, tokenizer.extract_id]


def _head(spec: TaskSpec, model_config: GPTConfig, dropout: float, seed: int, device: torch.device) -> TaskHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same head in every runtime
        head = TaskHead(model_config.d_model, spec.type, spec.num_outputs, dropout, spec.regression)
    return head.to(device)


def load_task_model(run_dir: Path, oracle: str, device: torch.device) -> tuple[TaskModel, TaskSpec, TextTokenizer]:
    """A fine-tuning run's newest body with one oracle's head (read from that oracle's own state file)."""
    tokenizer, gpt, weights = load_newest(run_dir)
    head, spec = load_head(run_dir, oracle, checkpoint_number(weights.parent), gpt.config)
    return TaskModel(gpt, head).to(device).eval(), spec, tokenizer


def load_head(run_dir: Path, oracle: str, rnd: int, model_config: GPTConfig) -> tuple[TaskHead, TaskSpec]:
    """One oracle's head and task spec at round `rnd`, from its own state file."""
    run = RunDir(run_dir)
    path = run.oracle_state(oracle, rnd)
    if not path.is_file():
        raise DgptError(f"{run_dir}: no oracle '{oracle}' in this run (oracles: {', '.join(run.oracles_with_state()) or 'none'})")
    state = load_oracle_state(path)
    if "head" not in state or "task" not in state:
        raise DgptError(f"{path}: oracle '{oracle}' has no task head; is {run_dir} a fine-tuning run?")
    spec = TaskSpec(**state["task"])
    head = TaskHead(model_config.d_model, spec.type, spec.num_outputs, 0.0, spec.regression)
    head.load_state_dict(state["head"])
    return head, spec
