"""What the flower runtime puts on the wire and what its server refuses, without starting Flower's processes."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from conftest import tiny_config  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from dgpt import api  # noqa: E402
from dgpt.config import config_from_dict  # noqa: E402
from dgpt.errors import DgptError  # noqa: E402
from dgpt.federation.codec import Codec  # noqa: E402
from dgpt.runtimes.flower import exchange, wire  # noqa: E402
from dgpt.runtimes.flower.exchange import Exchange, Replies  # noqa: E402

SEGMENTS = [300, 45, 7]
FED = SimpleNamespace(round_timeout_s=60.0, min_oracles=1)


@pytest.mark.parametrize("kind", ["none", "bf16", "int8"])
def test_payload_arrays_hold_exactly_the_counted_bytes(kind):
    codec = Codec(kind, SEGMENTS)
    payload = codec.encode(torch.randn(sum(SEGMENTS)))
    record = wire.payload_record(payload)
    assert wire.payload_bytes(record) == payload.nbytes
    back, problem = wire.payload_from(record, codec)
    assert problem == ""
    assert back.values.dtype == payload.values.dtype and torch.equal(back.values.view(-1), payload.values.view(-1))
    assert torch.equal(codec.decode(back), codec.decode(payload))


def test_malformed_arrays_are_refused_with_a_reason():
    codec = Codec("int8", SEGMENTS)
    good = wire.payload_record(codec.encode(torch.randn(sum(SEGMENTS))))
    pickled = ArrayRecord({"values": Array(dtype="object", shape=(3,), stype="numpy.ndarray", data=b"\x80\x04"),
                           "scales": good["scales"]})
    short = ArrayRecord({"values": Array(dtype="int8", shape=(352,), stype=wire.RAW, data=b"\x00" * 10),
                         "scales": good["scales"]})
    for record, reason in ((pickled, "expected raw"), (short, "with 10 bytes"), (ArrayRecord({"x": good["values"]}), "no 'values'")):
        payload, problem = wire.payload_from(record, codec)
        assert payload is None and reason in problem
    # well-formed arrays of the wrong kind reach the Strategy, whose check names them
    wrong = wire.payload_record(Codec("none", SEGMENTS).encode(torch.randn(sum(SEGMENTS))))
    payload, problem = wire.payload_from(wrong, codec)
    assert problem == "" and payload.values.dtype == torch.float32


def test_theta_of_another_model_is_refused():
    record = wire.theta_record(torch.zeros(10))
    assert wire.theta_from(record, 10).shape == (10,)
    with pytest.raises(DgptError, match="where 11 float32 parameters"):
        wire.theta_from(record, 11)


def _reply(rnd, oracle, size=1.0):
    """A reply as the Grid hands it over (a Message outside a Flower run cannot be made)."""
    content = RecordDict({"round": ConfigRecord({"round": rnd, "oracle": oracle}), "metrics": MetricRecord({"size": size})})
    return SimpleNamespace(content=content, has_error=lambda: False)


def test_server_refuses_stale_unknown_and_duplicate_replies(tmp_path):
    server = Exchange(FED, None)
    replies, asked = Replies(), {"alpha": wire.EVALUATE, "beta": wire.EVALUATE}
    server.take(_reply(3, "alpha"), 11, 4, asked, replies)  # made from round 3's Theta
    server.take(_reply(4, "mallory"), 12, 4, asked, replies)  # no such oracle asked
    server.take(_reply(4, "beta", float("nan")), 12, 4, asked, replies)  # its size is no number
    server.take(_reply(4, "beta"), 12, 4, {**asked, "beta": wire.TRAIN}, replies)  # no train loss
    assert replies.contents == {}
    server.take(_reply(4, "alpha"), 11, 4, asked, replies)
    server.take(_reply(4, "alpha"), 13, 4, asked, replies)  # a second SuperNode claiming alpha
    assert list(replies.contents) == ["alpha"] and server.node_of == {"alpha": 11}


class Grid:
    """A Grid whose SuperNodes answer at once, each as the oracle `answers` names (None: it never answers)."""

    def __init__(self, rnd: int, answers: dict[int, str | None]):
        self.rnd, self.answers, self.sent = rnd, answers, {}

    def get_node_ids(self):
        return list(self.answers)

    def push_messages(self, messages):
        self.sent.update({f"to {m.dst_node_id}": m for m in messages})
        return [f"to {m.dst_node_id}" for m in messages]

    def pull_messages(self, ids):
        replies = [(id_, _reply(self.rnd, self.answers[self.sent[id_].dst_node_id])) for id_ in ids
                   if self.answers[self.sent[id_].dst_node_id]]
        for id_, reply in replies:
            reply.metadata = SimpleNamespace(reply_to_message_id=id_)
        return [reply for _, reply in replies]


def test_a_round_ends_once_every_asked_oracle_answered(monkeypatch):
    """alpha's old SuperNode (11) is still listed but silent; alpha answers from a new one (12): the round does not
    wait out round_timeout_s for the old one, and alpha is now reached at 12."""
    monkeypatch.setattr(exchange, "Message", lambda content, **meta: SimpleNamespace(content=content, **meta))
    server = Exchange(FED, Grid(2, {11: None, 12: "alpha", 13: "beta"}))
    server.node_of, server.met = {"alpha": 11, "beta": 13}, {11, 13}
    t0 = time.monotonic()
    replies = server.ask(RecordDict(), dict.fromkeys(["alpha", "beta"], wire.EVALUATE), wire.EVALUATE, 2, None)
    assert time.monotonic() - t0 < 10
    assert sorted(replies.contents) == ["alpha", "beta"] and server.node_of == {"alpha": 12, "beta": 13}
    assert sorted(m.dst_node_id for m in server.grid.sent.values()) == [11, 12, 13]


def test_flower_config_checks_and_install_hint(tmp_path):
    config = tiny_config(tmp_path, federation={"runtime": "flower"})
    with pytest.raises(DgptError, match="flwr run"):
        api.pretrain(config)
    app = api.flower_app(config)
    assert 'clientapp = "dgpt.runtimes.flower.client:app"' in (app / "pyproject.toml").read_text()
    assert 'work = "pretrain"' in (app / "pyproject.toml").read_text()
    assert 'work = "finetune"' in (api.flower_app(config, finetune=True) / "pyproject.toml").read_text()
    with pytest.raises(DgptError, match="finetune.shared_head"):  # a shared head would leave the SuperNodes
        api.flower_app(dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, shared_head=True)), True)
    for bad, match in (({"min_oracles": 4}, "min_oracles"), ({"round_timeout_s": 0}, "round_timeout_s")):
        with pytest.raises(DgptError, match=match):
            config_from_dict({"oracles": [{"name": n} for n in "abc"], "federation": bad})
    with pytest.raises(DgptError, match="first_order.*flower runtime"):  # refused at load, not in the ServerApp
        config_from_dict({"oracles": [{"name": n} for n in "abc"], "federation": {"runtime": "flower"},
                          "ledger": {"method": "first_order"}})
