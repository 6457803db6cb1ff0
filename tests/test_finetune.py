"""DSFT end to end: `dgpt finetune` / `dgpt predict` for every task type, heads that never leave their
oracle, a shared head, resume, torchrun == sim, and one clear line for each kind of bad input."""

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from taskdata import write_jsonl, write_task

from dgpt import api
from dgpt.audit import verify_ledger
from dgpt.cli import main
from dgpt.config import config_from_dict, dump_config
from dgpt.data.tasks import TaskExamples
from dgpt.errors import DgptError
from dgpt.model.gpt import GPT
from dgpt.rundir import RunDir
from dgpt.runtimes.federated import train_federated
from dgpt.runtimes.finetune import finetune_work
from dgpt.runtimes.sim import SimTransport
from dgpt.train.checkpoint import WEIGHTS, latest_checkpoint
from dgpt.train.metrics import read_metrics
from dgpt.train.privacy import Mechanism, PrivateGradients

KINDS = ("classification", "entailment", "similarity", "regression", "multiple_choice")
FINETUNE = {"rounds": 2, "inner_steps": 2, "batch_size": 8, "lr": 1e-3, "eval_batch_size": 16}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("pre"), federation={"rounds": 2, "inner_steps": 2})
    api.pretrain(config)
    return config.run_path


def ft_config(tmp_path, pretrained, kinds=KINDS, finetune=None, names=None, labels=None, **top):
    oracles = [{"name": n, "task": write_task(tmp_path / "tasks" / n, k, seed=i)} for i, (n, k) in enumerate(zip(names or kinds, kinds))]
    for oracle in oracles if labels else []:
        oracle["task"]["labels"] = labels
    data = {"run_dir": str(tmp_path / "ft"), "seed": 5, "oracles": oracles, "pretrain": {"dtype": "float32"},  # as tiny_config
            "finetune": {"init_from": str(pretrained), **FINETUNE, **(finetune or {})}, **top}
    return config_from_dict(data, "<test>")


def write_config(config, path):
    path.write_text(dump_config(config))
    return str(path)


def head_of(config, name):
    rnd = int(latest_checkpoint(config.run_path).name.split("_")[1])
    return torch.load(RunDir(config.run_path).oracle_state(name, rnd), weights_only=True)["head"]


def test_finetune_and_predict_every_task_type_via_cli(tmp_path, pretrained, capsys):
    config = ft_config(tmp_path, pretrained, finetune={"max_len": 16})
    assert main(["finetune", write_config(config, tmp_path / "ft.toml")]) == 0
    assert "training examples truncated to 16 tokens" in capsys.readouterr().err
    rows = [r for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "round" and "metrics" in r]
    assert [r["round"] for r in rows] == [0, 1, 2]
    last = rows[-1]["metrics"]
    assert set(last["classification"]) == {"accuracy", "macro_f1"}  # three labels: macro-F1
    assert set(last["entailment"]) == set(last["similarity"]) == {"accuracy", "f1"}
    assert set(last["regression"]) == {"pearson", "spearman"}
    assert set(last["multiple_choice"]) == {"accuracy"}
    for oracle in config.oracles:
        valid = oracle.task.valid[0]
        target = tmp_path / f"{oracle.name}.out.jsonl"
        assert main(["predict", str(config.run_path), "--oracle", oracle.name, "--input", valid, "--output", str(target)]) == 0
        lines = [json.loads(line) for line in target.read_text().splitlines()]
        assert len(lines) == 12
        first = lines[0]
        if oracle.name == "regression":
            assert set(first) == {"label"} and isinstance(first["label"], float)
        elif oracle.name == "multiple_choice":
            assert first["label"] in (0, 1) and len(first["probabilities"]) == 2
        else:
            assert first["label"] in oracle_labels(oracle.name)
            assert set(first["probabilities"]) == {str(v) for v in oracle_labels(oracle.name)}
            assert sum(first["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def oracle_labels(name):
    return ["alpha", "beta", "gamma"] if name == "classification" else [0, 1]


@pytest.mark.parametrize("fresh", [True, False])
def test_task_tokens_start_from_fresh_embeddings(tmp_path, pretrained, fresh):
    """GPT-1 adds <|pad|> <|start|> <|delim|> <|extract|> at fine-tuning with random embeddings; every other row is
    the checkpoint's (finetune.fresh_task_tokens = false keeps all of them)."""
    config = ft_config(tmp_path, pretrained, kinds=("classification",), finetune={"fresh_task_tokens": fresh})
    local = finetune_work(config, SimTransport(), config.oracle_names())
    got = local.model.transformer.wte.weight.detach()
    saved = load_file(str(latest_checkpoint(pretrained) / WEIGHTS))["transformer.wte.weight"]
    torch.manual_seed(config.seed)
    drawn = GPT(local.model.config).transformer.wte.weight.detach()
    task_rows = [1, 2, 3, 4]  # the tokenizer's ids for the four tokens
    torch.testing.assert_close(got[task_rows], drawn[task_rows] if fresh else saved[task_rows])
    assert not torch.equal(drawn[task_rows], saved[task_rows])
    others = [i for i in range(got.size(0)) if i not in task_rows]
    torch.testing.assert_close(got[others], saved[others])


def test_heads_never_leave_their_oracle(tmp_path, pretrained):
    config = ft_config(tmp_path, pretrained, kinds=("classification", "entailment", "multiple_choice"))
    seen = {}

    def work(*args):
        seen["work"] = local = finetune_work(*args)
        for name, loop in local.loops.items():
            loop.train_step = guarded(name, loop, local.loops)
        return local

    class Inspecting(SimTransport):
        def exchange(self, sent, participants, codec):
            body = sum(p.numel() for p in seen["work"].model.parameters())
            assert codec.numel == body and all(p.values.numel() == body for p in sent.values())
            seen["rounds"] = seen.get("rounds", 0) + 1
            return super().exchange(sent, participants, codec)

    initial = {}

    def guarded(name, loop, loops):
        step = loop.train_step
        initial.setdefault(name, {k: v.clone() for k, v in loop.model.head.state_dict().items()})

        def train_step():
            others = {n: [p.detach().clone() for p in l.model.head.parameters()] for n, l in loops.items() if n != name}
            loss = step()
            for n, before in others.items():
                assert all(torch.equal(a, b) for a, b in zip(before, loops[n].model.head.parameters())), f"{name} moved {n}'s head"
            return loss

        return train_step

    train_federated(config, Inspecting(), config.oracle_names(), work=work)
    local = seen["work"]
    assert seen["rounds"] == 2
    sent = {id(p) for p in local.params}
    assert not any(id(p) in sent for loop in local.loops.values() for p in loop.model.head.parameters())
    assert all(k.startswith("transformer.") for k in load_file(str(latest_checkpoint(config.run_path) / WEIGHTS)))
    for name in local.loops:  # each head trained, and kept in its oracle's own state file
        assert not torch.equal(head_of(config, name)["linear.weight"], initial[name]["linear.weight"])


def test_shared_head_is_aggregated_with_the_body(tmp_path, pretrained):
    kinds, names, finetune = ("classification", "classification"), ("first", "second"), {"shared_head": True}
    with pytest.raises(DgptError, match="explicit, identical labels list$"):
        ft_config(tmp_path, pretrained, kinds, finetune, names)
    config = ft_config(tmp_path, pretrained, kinds, finetune, names, labels=["alpha", "beta", "gamma"])
    sizes = []

    class Counting(SimTransport):
        def exchange(self, sent, participants, codec):
            sizes.append(codec.numel)
            return super().exchange(sent, participants, codec)

    train_federated(config, Counting(), config.oracle_names(), work=finetune_work)
    a, b = head_of(config, "first"), head_of(config, "second")
    assert all(torch.equal(a[k], b[k]) for k in a)
    body = sum(t.numel() for t in load_file(str(latest_checkpoint(config.run_path) / WEIGHTS)).values())
    assert sizes == [body + 32 * 3 + 3] * 2


def test_lambda_zero_trains_a_different_model(tmp_path, pretrained):
    results = {}
    for lam in (0.0, 0.5):
        config = ft_config(tmp_path / str(lam), pretrained, kinds=("classification",), finetune={"lambda_lm": lam})
        api.finetune(config)
        results[lam] = load_file(str(latest_checkpoint(config.run_path) / WEIGHTS))["transformer.wte.weight"]
    assert not torch.equal(results[0.0], results[0.5])


def test_first_order_ledger_values_fine_tuning_rounds(tmp_path, pretrained):
    """ledger.method = "first_order" on DSFT: each oracle's validation task-loss gradient, one pass per round; the
    values add up and agree with the evaluated Shapley values of the same rounds."""
    kinds = ("classification", "entailment")
    runs = {m: ft_config(tmp_path / m, pretrained, kinds, ledger={"method": m}) for m in ("shapley", "first_order")}
    rows = {}
    for method, config in runs.items():
        api.finetune(config)
        rows[method] = [json.loads(line) for line in RunDir(config.run_path).ledger.read_text().splitlines()][1:]
        assert verify_ledger(config.run_dir).rounds == len(rows[method])  # recomputed from the signed losses / products
    for exact, first in zip(rows["shapley"], rows["first_order"]):
        assert first["cost"]["evaluations"] == 1 and first["theta_after"] == exact["theta_after"]
        values = {n: o["value"] for n, o in first["oracles"].items()}
        assert sum(values.values()) == pytest.approx(first["value"]["full"], abs=1e-6)
        for name, o in exact["oracles"].items():
            assert values[name] == pytest.approx(o["value"], rel=0.2)  # a first-order estimate, on a random trajectory


def test_resume_equals_an_uninterrupted_run(tmp_path, pretrained):
    whole = ft_config(tmp_path / "whole", pretrained, kinds=("entailment", "multiple_choice"))
    api.finetune(whole)
    parts = ft_config(tmp_path / "parts", pretrained, kinds=("entailment", "multiple_choice"))
    api.finetune(parts, stop_after=1)
    api.finetune(parts)
    wa, wb = (load_file(str(latest_checkpoint(c.run_path) / WEIGHTS)) for c in (whole, parts))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key])
    for name in ("entailment", "multiple_choice"):
        torch.testing.assert_close(head_of(whole, name), head_of(parts, name))


def test_dp_sgd_fine_tunes_every_task_type(tmp_path, pretrained):
    config = ft_config(tmp_path, pretrained, privacy={"noise_multiplier": 1.0})
    work = finetune_work(config, SimTransport(), config.oracle_names())
    for name, loop in work.loops.items():  # per-example gradients (vmap) equal one backward pass per example
        loop.model.eval()
        ids, lengths, labels = loop.sampler.sample(3)
        loop.privacy = PrivateGradients(Mechanism(0.0, 1e6, 0.5, 3.0), delta=1e-5)  # no noise, nothing clipped
        loop.privacy.gradients(loop.model, loop.example_loss, (ids, lengths, labels), chunk=2)
        got = [p.grad.clone() for p in loop.model.parameters()]
        loop.model.zero_grad()
        for i in range(3):
            loop.example_loss(ids[i : i + 1], lengths[i : i + 1], labels[i : i + 1]).backward()
        for p, g in zip(loop.model.parameters(), got):
            torch.testing.assert_close(g, p.grad / 3, rtol=1e-4, atol=1e-6, msg=name)
    summary = api.finetune(config)
    assert set(summary.epsilon) == set(config.oracle_names()) and all(e > 0 for e in summary.epsilon.values())


def test_extending_a_finished_fine_tuning_run(tmp_path, pretrained):
    """finetune.rounds raised from 2 to 4: the run continues from round 2 with each oracle's head, its linear decay
    (which had reached 0) re-planned from there to the new end; the round-2 checkpoint stays."""
    config = ft_config(tmp_path, pretrained, kinds=("entailment", "multiple_choice"))
    api.finetune(config)
    longer = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, rounds=4))
    assert api.finetune(longer).done == 4
    assert [r["round"] for r in read_metrics(config.run_path / "metrics.jsonl") if r["kind"] == "round"] == [0, 1, 2, 3, 4]
    run = RunDir(config.run_path)
    assert [p.name for p in run.list_checkpoints()] == ["round_0000002", "round_0000003", "round_0000004"]
    schedule = torch.load(run.oracle_state("entailment", 4), weights_only=True)["schedule"]
    assert schedule == {"total_steps": 8, "rewarm": (4, 0.0, FINETUNE["lr"], 0)}  # GPT-1's warmup of 0.2%: none here


def test_torchrun_finetune_equals_sim(tmp_path, pretrained):
    kinds = ("classification", "entailment", "similarity", "multiple_choice")  # one rank per task type
    sim = ft_config(tmp_path / "sim", pretrained, kinds=kinds)
    summary = api.finetune(sim)
    dist = ft_config(tmp_path / "dist", pretrained, kinds=kinds, federation={"runtime": "torchrun"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(kinds)}",
           "-m", "dgpt", "finetune", write_config(dist, tmp_path / "dist.toml")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone prints the run's summary, with every rank's tokens
    assert result.stdout.count("final global validation loss") == 1 and "at round 2 of 2 (torchrun)" in result.stdout
    assert f"trained {summary.tokens:,} tokens" in result.stdout
    wa, wb = (load_file(str(latest_checkpoint(c.run_path) / WEIGHTS)) for c in (sim, dist))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
    for name in kinds:
        torch.testing.assert_close(head_of(sim, name), head_of(dist, name), rtol=1e-4, atol=1e-5)
    rows = [[r for r in read_metrics(c.run_path / "metrics.jsonl") if r["kind"] == "round"] for c in (sim, dist)]
    flat = [[(n, k, v) for r in rs for n, m in r["metrics"].items() for k, v in m.items()] for rs in rows]
    assert [x[:2] for x in flat[0]] == [x[:2] for x in flat[1]]
    assert [x[2] for x in flat[0]] == pytest.approx([x[2] for x in flat[1]])
    outputs = [api.predict(c.run_path, "similarity", c.oracles[2].task.valid[0], tmp_path / f"{i}.jsonl") for i, c in enumerate((sim, dist))]
    assert [o["label"] for o in outputs[0]] == [o["label"] for o in outputs[1]]


def test_epochs_are_exact_and_split_oracles_train_what_one_oracle_would(tmp_path, pretrained, monkeypatch):
    """finetune.epochs = 3 trains every example exactly 3 times (the last batch and the last round are shorter), and two
    oracles holding the halves of a task train on as many examples together as one oracle holding all of it."""
    rows = [json.loads(line) for line in open(write_task(tmp_path / "task", "classification", n_train=42)["train"][0])]
    drawn = collections.Counter()  # (examples, index) -> times trained on
    batch = TaskExamples.batch

    def counting(examples, indices):
        drawn.update((id(examples), i) for i in indices)
        return batch(examples, indices)

    monkeypatch.setattr(TaskExamples, "batch", counting)  # no validation sets: every batch is a training batch
    trained = {}
    for holders in ({"all": rows}, {"first": rows[:21], "second": rows[21:]}):
        drawn.clear()
        oracles = [{"name": name, "task": {"type": "classification", "labels": ["alpha", "beta", "gamma"],
                                           "train": [str(write_jsonl(tmp_path / f"{name}.jsonl", part))]}}
                   for name, part in holders.items()]
        run = tmp_path / "-".join(holders)
        config = config_from_dict({"run_dir": str(run), "seed": 5, "oracles": oracles, "finetune": {
            "init_from": str(pretrained), **FINETUNE, "rounds": 0, "epochs": 3, "inner_steps": 3}}, "<test>")
        summary = api.finetune(config)
        assert len(drawn) == 42 and set(drawn.values()) == {3}, holders.keys()
        trained[len(holders)] = sum(drawn.values())
        # 42 examples in batches of 8: 16 steps (the last of 6 examples) in rounds of 3, 3, 3, 3, 3, 1; halves: 8 steps
        # (the last of 7) in rounds of 3, 3, 2. Synchronous data parallel would have sent a gradient per step.
        steps = 16 if len(holders) == 1 else 8
        assert summary.done == summary.total == -(-steps // 3)
        params = sum(t.numel() for t in load_file(str(latest_checkpoint(run) / WEIGHTS)).values())
        assert summary.dp_bytes == 2 * 4 * params * steps * len(holders)
    assert trained == {1: 126, 2: 126}


# --- bad input: one line, non-zero exit, nothing written ------------------------------------------------


def fails(capsys, argv, message):
    assert main(["-q", *argv]) == 2  # -q: messages logged before the error (truncated examples) left out
    err = capsys.readouterr().err
    assert err == f"dgpt: error: {message}\n"


def test_bad_label_missing_field_choices_and_empty_set(tmp_path, pretrained, capsys):
    config = ft_config(tmp_path, pretrained, kinds=("entailment", "multiple_choice"))
    ent, mc = config.oracles[0].task, config.oracles[1].task
    path = write_config(config, tmp_path / "c.toml")

    valid = write_jsonl(tmp_path / "bad_label.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}, {"premise": "a", "hypothesis": "b", "label": 7}])
    fails(capsys, ["finetune", path, "--set", f"oracles.0.task.valid=['{valid}']"],
          f"{valid}:2: label 7 is not in the label set of oracle 'entailment' (0, 1)")

    missing = write_jsonl(tmp_path / "missing.jsonl", [{"premise": "a", "label": 0}])
    fails(capsys, ["finetune", path, "--set", f"oracles.0.task.train=['{missing}']"],
          f"{missing}:1: no 'hypothesis' field (oracle 'entailment', task type entailment)")

    rows = [json.loads(line) for line in open(mc.train[0])][:3]
    rows[2]["choices"].append("and one more")
    ragged = write_jsonl(tmp_path / "ragged.jsonl", rows)
    fails(capsys, ["finetune", path, "--set", f"oracles.1.task.train=['{ragged}']"],
          f"{ragged}:3: 3 choices, but oracle 'multiple_choice' has a head for 2 (every row needs the same number of choices)")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails(capsys, ["finetune", path, "--set", f"oracles.0.task.train=['{empty}']"],
          f"oracle 'entailment': no labeled training examples in {empty}")
    assert ent.train and not config.run_path.exists()  # nothing was written by the failed runs


def test_checkpoint_vocabulary_without_special_tokens(tmp_path, pretrained, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    run = tmp_path / "foreign"
    shutil.copytree(pretrained / "checkpoints", run / "checkpoints")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["some text"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    hf.save(str(run / "tokenizer.json"))
    before = sorted(p.name for p in run.rglob("*"))
    config = ft_config(tmp_path, pretrained, kinds=("classification",), finetune={"init_from": str(run)})
    fails(capsys, ["finetune", write_config(config, tmp_path / "c.toml")],
          f"{run / 'tokenizer.json'}: tokenizer lacks the special token(s) <|endoftext|>, <|pad|>, <|start|>, <|delim|>, <|extract|>")
    assert sorted(p.name for p in run.rglob("*")) == before


def test_missing_task_scratch_without_tokenizer_and_unknown_oracle(tmp_path, pretrained, capsys):
    config = ft_config(tmp_path, pretrained, kinds=("classification",))
    path = write_config(config, tmp_path / "c.toml")
    fails(capsys, ["finetune", path, "--set", "finetune.init_from=''"],
          "finetune.init_from is empty (from scratch): set tokenizer.path to the tokenizer.json to use")
    no_task = tiny_config(tmp_path / "plain")
    fails(capsys, ["finetune", write_config(no_task, tmp_path / "p.toml")],
          "fine-tuning needs an [oracles.task] for every oracle; missing for: alpha, beta, gamma")
    assert main(["finetune", path]) == 0
    capsys.readouterr()
    fails(capsys, ["predict", str(config.run_path), "--oracle", "nobody", "--input", config.oracles[0].task.valid[0], "--output", str(tmp_path / "o.jsonl")],
          f"{config.run_path}: no oracle 'nobody' in this run (oracles: classification)")
