"""The ClientApp, called in-process with Flower's own Message and Context as its SuperNode calls it. The ServerApp is
the one source of truth for a federation's shared settings: a SuperNode builds its config from the settings the
message carries and its own file's local keys only, refuses a tokenizer that is not the server's with its reason
(which the server logs; a round without usable replies never counts as trained), keeps the final model in its own
run directory for `dgpt eval`, and validates the ledger's candidate Thetas in one message."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tomllib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from conftest import rounds, strategy, tiny_config  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.audit import verify_ledger  # noqa: E402
from dgpt.config import Config, dump_config  # noqa: E402
from dgpt.config_shared import shared_toml, unclassified, with_local  # noqa: E402
from dgpt.data.tokenizer import TextTokenizer  # noqa: E402
from dgpt.errors import DgptError  # noqa: E402
from dgpt.rundir import RunDir  # noqa: E402
from dgpt.runinfo import info_lines  # noqa: E402
from dgpt.runtimes.flower import client, wire  # noqa: E402
from dgpt.runtimes.flower import exchange  # noqa: E402
from dgpt.runtimes.flower import server as flower_server  # noqa: E402
from dgpt.runtimes.flower.app import write_flower_app  # noqa: E402
from dgpt.runtimes.flower.server import FlowerServer  # noqa: E402
from dgpt.runtimes.setup import build_model, read_run  # noqa: E402
from dgpt.train.metrics import read_metrics  # noqa: E402
from test_flower_wire import Grid  # noqa: E402
from test_torchrun import assert_same_model  # noqa: E402
from torch.nn.utils import parameters_to_vector  # noqa: E402


@pytest.fixture(autouse=True)
def in_a_task(monkeypatch):
    """What a SuperNode sets in its ClientApp's process before calling it (a Message cannot be made without)."""
    for key, value in (("_run_id", 1), ("_node_id", 2), ("_task_id", 3)):
        monkeypatch.setattr(TaskIdentity, key, value)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Config:
    """The server's config (rounds 2, H 2), with every oracle's shards prepared in its run directory."""
    config = tiny_config(tmp_path_factory.mktemp("settings"), federation={"runtime": "flower", "rounds": 2, "inner_steps": 2})
    api.prepare(config)
    return config


def supernode_file(config: Config, path, **changes) -> str:
    """A SuperNode's own config file: the server's, with `changes` (section -> {key: value})."""
    for section, values in changes.items():
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
    path.write_text(dump_config(config))
    return str(path)


def ask(config: Config, node_file: str, oracle: str, rnd: int, kind: str = wire.TRAIN, run_dir: str | None = None,
        theta: torch.Tensor | None = None, candidates: list[torch.Tensor] = (), keep: bool = False) -> RecordDict:
    """The reply of `oracle`'s ClientApp to the server's `kind` message of round `rnd` (Theta: the seed's model)."""
    if theta is None:
        theta = parameters_to_vector(build_model(read_run(config, oracles=[]))[0].parameters()).detach()
    sizes = {n: 1000.0 for n in config.oracle_names()}
    settings = wire.settings_record(shared_toml(config), TextTokenizer.load(RunDir(config.run_dir).tokenizer).sha256)
    content = wire.request(rnd, "pretrain", theta, sizes, settings, keep=keep)
    if candidates:
        wire.add_candidates(content, candidates, rnd - 1)
    message = Message(content, dst_node_id=2, message_type=kind, group_id=str(rnd))
    node_config = {"config": node_file, "oracle": oracle, **({"run-dir": run_dir} if run_dir else {})}
    context = Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})
    return client.app(message, context).content


def test_every_config_key_is_shared_or_local(prepared, tmp_path):
    """New sections must be classified; the shared TOML holds no run directory, device or data path; a SuperNode's
    config takes every shared key from the server and only the local ones from its own file."""
    assert unclassified() == []
    text = shared_toml(prepared)
    assert "run_dir" not in text and "device" not in text and "train = " not in text
    assert tomllib.loads(text)["federation"]["rounds"] == 2
    local = tiny_config(tmp_path, federation={"rounds": 9, "inner_steps": 7}, pretrain={"lr": 1.0, "device": "cpu"},
                        seed=99, run_dir=str(tmp_path / "mine"))
    merged = with_local(text, local, "beta")
    assert merged.federation == prepared.federation and merged.seed == prepared.seed and merged.model == prepared.model
    assert merged.pretrain == dataclasses.replace(prepared.pretrain, device="cpu")
    assert merged.run_dir == str(tmp_path / "mine")
    assert merged.oracles[1].train == local.oracles[1].train and merged.oracles[0].train == []
    with pytest.raises(DgptError, match="not valid TOML"):
        with_local("rounds = [", local, "beta")


def test_a_supernode_file_with_other_rounds_trains_on_the_servers(prepared, tmp_path):
    """A SuperNode whose own file says 1 round (and another learning rate) is asked for round 2 of the server's 2:
    it trains H steps (its own file's schedule would have had none left: a ZeroDivisionError before)."""
    node_file = supernode_file(prepared, tmp_path / "node.toml", federation={"rounds": 1, "inner_steps": 5},
                               pretrain={"lr": 0.5})
    content = ask(prepared, node_file, "alpha", 2)
    assert wire.refusal_reason(content) is None
    assert content.config_records["round"]["oracle"] == "alpha" and "delta" in content.array_records
    assert content.metric_records["metrics"]["tokens"] == 2 * 4 * 32  # H = 2 steps of 4 windows of 32 tokens
    assert "rounds = 2" in (RunDir(prepared.run_dir).config).read_text()  # what the SuperNode trained with


def test_a_supernode_with_another_tokenizer_or_foreign_shards_is_refused_with_its_reason(prepared, tmp_path):
    other = tiny_config(tmp_path / "other", tokenizer={"vocab_size": 280}, federation={"runtime": "flower"})
    api.prepare(other)
    node_file = supernode_file(prepared, tmp_path / "node.toml")
    content = ask(prepared, node_file, "beta", 1, run_dir=other.run_dir)
    assert "is not the server's tokenizer" in wire.refusal_reason(content)
    assert content.config_records["round"]["oracle"] == "beta" and "delta" not in content.array_records
    # the server's tokenizer copied over shards of another vocabulary
    RunDir(other.run_dir).tokenizer.write_bytes(RunDir(prepared.run_dir).tokenizer.read_bytes())
    content = ask(prepared, node_file, "beta", 1, kind=wire.EVALUATE, run_dir=other.run_dir)
    assert "made with a different tokenizer" in wire.refusal_reason(content)
    content = ask(prepared, node_file, "mallory", 1)
    assert "no oracle 'mallory'" in wire.refusal_reason(content)


class Refusing(Grid):
    """SuperNodes that all answer with an error record."""

    def pull_messages(self, ids):
        return [SimpleNamespace(content=wire.refusal(self.rnd, self.answers[self.sent[i].dst_node_id], "bad shards"),
                                has_error=lambda: False, metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]


def test_the_server_logs_refusals_and_a_round_of_refusals_moves_nothing(monkeypatch, caplog):
    monkeypatch.setattr(exchange, "Message", lambda content, **meta: SimpleNamespace(content=content, **meta))
    server = exchange.Exchange(SimpleNamespace(round_timeout_s=60.0, min_oracles=1), Refusing(3, {11: "alpha", 12: "beta"}))
    with caplog.at_level(logging.WARNING):  # ends at once: every oracle answered
        replies = server.ask(RecordDict(), dict.fromkeys(["alpha", "beta"], wire.TRAIN), wire.TRAIN, 3, None)
    assert replies.contents == {} and set(replies.refused) == {"alpha", "beta"}
    assert "round 3: oracle 'alpha' (SuperNode 11) cannot take part: bad shards" in caplog.text
    result = strategy({"alpha": 1.0, "beta": 1.0}, 3).aggregate({})
    assert result.update is None and "no update arrived" in result.skipped


def test_the_final_model_is_kept_where_the_oracles_data_is(prepared, tmp_path):
    """The run's last validation (or, for an oracle that missed it, a model message of its own): the SuperNode's run
    directory (its tokenizer and its oracle's shards only) gains the round's checkpoint and config, so `dgpt eval`
    scores it there on that oracle's data; `dgpt eval` and `info` on a directory without data (the server's) say
    what to run instead."""
    org, server = RunDir(tmp_path / "org_beta"), RunDir(tmp_path / "server")
    for run in (org, server):
        run.root.mkdir()
        run.tokenizer.write_bytes(RunDir(prepared.run_dir).tokenizer.read_bytes())
    shutil.copytree(RunDir(prepared.run_dir).oracle_data("beta"), org.oracle_data("beta"))
    node_file = supernode_file(prepared, tmp_path / "node.toml", federation={"rounds": 7})
    validated = ask(prepared, node_file, "beta", 2, kind=wire.EVALUATE, run_dir=str(org.root), keep=True)
    assert validated.metric_records["metrics"]["kept"] == 1.0 and org.checkpoint("round", 2).is_dir()
    config = api.load_run_config(org.root)
    assert config.federation.rounds == 2
    evaluation = api.evaluate(config)
    assert list(evaluation.scores) == ["beta"] and evaluation.checkpoint == org.checkpoint("round", 2)
    assert evaluation.scores["beta"]["loss"] == pytest.approx(validated.metric_records["metrics"]["valid_loss"], rel=1e-6)
    content = ask(prepared, node_file, "beta", 3, kind=wire.MODEL, run_dir=str(org.root))
    assert content.metric_records["metrics"]["kept"] == 1.0 and api.evaluate(config).checkpoint == org.checkpoint("round", 3)
    (server.config).write_text(dump_config(dataclasses.replace(prepared, run_dir=str(server.root))))
    with pytest.raises(DgptError, match="holds no oracle's data.*--eval"):
        api.evaluate(api.load_run_config(server.root))
    assert "its data is on its SuperNode" in "\n".join(info_lines(api.load_run_config(server.root)))


def test_candidate_thetas_are_validated_in_one_message(prepared, tmp_path):
    """The ledger's coalitions: one message with several Thetas, one loss each, equal to validating each alone."""
    node_file = supernode_file(prepared, tmp_path / "node.toml")
    theta = parameters_to_vector(build_model(read_run(prepared, oracles=[]))[0].parameters()).detach()
    moved = theta + 0.05 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(0))
    content = ask(prepared, node_file, "gamma", 1, kind=wire.CANDIDATES, candidates=[theta, moved])
    losses = content.metric_records["metrics"]
    for j, candidate in enumerate((theta, moved)):
        alone = ask(prepared, node_file, "gamma", 1, kind=wire.EVALUATE, theta=candidate).metric_records["metrics"]
        assert losses[f"loss_{j}"] == alone["valid_loss"]
    assert losses["loss_0"] != losses["loss_1"]


class InProcess:
    """A Grid whose SuperNodes are virtual (SuperNode i is the i-th oracle, in the app's run directory, as on Flower's
    simulation engine), each answering with the ClientApp in this process; `waves` counts the server's pushes."""

    def __init__(self, config_path, count: int):
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i}, state=RecordDict(),
                                          run_config={"config": str(config_path)}) for i in range(count)}
        self.sent, self.waves = {}, 0

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        self.waves += 1
        ids = [f"{self.waves}:{m.metadata.dst_node_id}" for m in messages]
        self.sent.update(zip(ids, messages))
        return ids

    def pull_messages(self, ids):
        replies = []
        for id_ in ids:
            message = self.sent.pop(id_)
            reply = client.app(message, self.contexts[message.metadata.dst_node_id])
            replies.append(SimpleNamespace(content=reply.content, has_error=reply.has_error,
                                           metadata=SimpleNamespace(reply_to_message_id=id_)))
        return replies


@pytest.mark.parametrize("per_message", [None, 3])
def test_the_ledger_values_a_round_without_a_message_of_its_own(tmp_path, monkeypatch, per_message):
    """The ServerApp and the ClientApps in this process, the Shapley ledger on: a round's coalition Thetas ride on the
    next messages (round 2's train messages, the last round's validation), so 2 rounds take 5 message waves (round
    0's validation, 2 of training, the last validation, the ledger's last head with the model), none for the ledger;
    with 3 Thetas a message, the 5 of each round's 8 that do not fit take 2 waves of their own. The model, bytes and
    ledger values equal sim's, and every value follows from the oracles' signed reports."""
    if per_message:
        monkeypatch.setattr(flower_server, "MESSAGE_BYTES", per_message * 4 * 27_712)  # the tiny model's fp32 Theta
    fed = {"rounds": 2, "inner_steps": 2, "outer_lr": 0.7, "outer_momentum": 0.9, "eval_interval": 2}
    sim = tiny_config(tmp_path / "sim", federation=fed)
    api.pretrain(sim)
    config = tiny_config(tmp_path / "fl", federation={**fed, "runtime": "flower"})
    api.prepare(config)
    write_flower_app(config)  # RUN/config.toml: what the virtual SuperNodes read
    grid = InProcess(RunDir(config.run_dir).config, len(config.oracles))
    FlowerServer(config, grid).run()
    assert grid.waves == (9 if per_message else 5)
    assert_same_model(sim, config)
    assert [r["bytes_total"] for r in rounds(config)] == [r["bytes_total"] for r in rounds(sim)]
    values = [{n: o["value"] for n, o in r["oracles"].items()} for r in read_metrics(config.run_path / "ledger.jsonl")[1:]]
    want = [{n: o["value"] for n, o in r["oracles"].items()} for r in read_metrics(sim.run_path / "ledger.jsonl")[1:]]
    for got, expected in zip(values, want, strict=True):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    run = RunDir(config.run_dir)
    checked = verify_ledger(run.root, [run.receipts(n) for n in config.oracle_names()], run.keys)
    assert checked.confirmed == {n: [0, 1, 2] for n in config.oracle_names()}


def test_a_clientapp_sends_no_plain_update_when_the_settings_ask_for_secure_aggregation(prepared, tmp_path):
    """A train message that did not come through SecAgg+ (a server that skips it) gets a refusal, not the update."""
    asking = dataclasses.replace(prepared, federation=dataclasses.replace(prepared.federation, secure_aggregation=True),
                                 ledger=dataclasses.replace(prepared.ledger, method="off"))
    content = ask(asking, supernode_file(prepared, tmp_path / "own.toml"), "alpha", 1)
    assert "did not come through SecAgg+" in wire.refusal_reason(content) and not content.array_records
