"""What dgpt puts in Flower messages, and the checks on what comes back. No pickle anywhere.

Tensors travel as Flower `Array`s holding their raw little-endian bytes (stype "raw"): the bytes of a
reply's arrays are exactly the `Payload.nbytes` the Strategy counts. bf16 has no numpy dtype, so its
16-bit patterns travel as int16 and are reinterpreted on arrival. Everything else is a `ConfigRecord`
(round id, oracle name) or a `MetricRecord` (token counts, losses).

A request (`request`) carries the round, Theta, every oracle's size and the shared settings: the TOML text of what
every party must agree on (`dgpt.config_shared`), its sha256 and the sha256 of the server's tokenizer; and, while a
round's ledger record waits for them, the coalition Thetas to validate (`candidates`, with the round they value in
`valued`). A reply (`reply`) carries the round and oracle, its metrics (the candidates' losses as loss_0, loss_1,
...), (train) its payload, and what the oracle signed (`statement`, `report`); a ClientApp that cannot take part
replies with an `error` record instead (`refusal`). Each record has its own function here, to be extended.
"""

from __future__ import annotations

import math

import torch

from dgpt.config_shared import sha256_text
from dgpt.errors import DgptError
from dgpt.federation.codec import Codec, Payload

RAW = "raw"  # the Array's bytes are the tensor's memory, little-endian, C order
# Flower message types: train H steps from Theta; validate Theta; keep Theta as the run's model (its run directory)
# and validate each of several candidate Thetas (the ledger's coalitions), in one message. Train and evaluate
# requests may carry candidate Thetas too: the oracle validates them first.
TRAIN, EVALUATE, MODEL, CANDIDATES = "train", "evaluate", "query.model", "evaluate.candidates"
WORKS = ("pretrain", "finetune")  # what a run trains: DUPT, or DSFT with each oracle's head on its SuperNode
# what each tensor dtype travels as (name on the wire, the dtype the bytes are read into)
_WIRE = {torch.float32: ("float32", torch.float32), torch.int8: ("int8", torch.int8), torch.bfloat16: ("int16", torch.int16)}
_READ = {"float32": torch.float32, "int8": torch.int8, "int16": torch.int16}


def to_array(tensor: torch.Tensor):
    from flwr.app import Array

    name, view = _WIRE[tensor.dtype]
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return Array(dtype=name, shape=tuple(flat.shape), stype=RAW, data=flat.view(view).numpy().tobytes())


def from_array(array) -> tuple[torch.Tensor | None, str]:
    """The tensor an Array holds as read from its bytes (dtype as sent), or why it cannot be read."""
    if array.stype != RAW or array.dtype not in _READ:
        return None, f"an array of {array.dtype!r} / {array.stype!r} (expected raw float32, int8 or int16)"
    dtype = _READ[array.dtype]
    numel = math.prod(array.shape) if array.shape else 1
    if numel * dtype.itemsize != len(array.data):
        return None, f"an array of shape {tuple(array.shape)} with {len(array.data)} bytes"
    if numel == 0:
        return torch.empty(tuple(array.shape), dtype=dtype), ""
    return torch.frombuffer(bytearray(array.data), dtype=dtype).reshape(array.shape), ""


def payload_record(payload: Payload):
    from flwr.app import ArrayRecord

    return ArrayRecord({"values": to_array(payload.values), "scales": to_array(payload.scales)})


def payload_from(record, codec: Codec) -> tuple[Payload | None, str]:
    """A reply's arrays as the Payload the Strategy checks (bf16 reinterpreted), or why they are not one."""
    if record is None or set(record.keys()) != {"values", "scales"}:
        return None, "its reply holds no 'values' and 'scales' arrays"
    tensors = {}
    for key in ("values", "scales"):
        tensor, problem = from_array(record[key])
        if problem:
            return None, f"{key}: {problem}"
        tensors[key] = tensor
    values = tensors["values"]
    if codec.kind == "bf16" and values.dtype == torch.int16:
        values = values.view(torch.bfloat16)
    return Payload(values, tensors["scales"]), ""


def payload_bytes(record) -> int:
    """The bytes of a reply's arrays as they were received."""
    return sum(len(array.data) for array in record.values())


def theta_record(theta: torch.Tensor):
    from flwr.app import ArrayRecord

    return ArrayRecord({"theta": to_array(theta.float())})


def theta_from(record, numel: int) -> torch.Tensor:
    """The global parameters a message carries, checked against the model's size."""
    tensor, problem = from_array(record["theta"]) if record is not None and "theta" in record else (None, "no 'theta'")
    if problem or tensor.dtype != torch.float32 or tensor.numel() != numel:
        raise DgptError(f"the server sent {problem or f'{tensor.numel()} {tensor.dtype} values'} where {numel} float32 "
                        "parameters were expected: is this SuperNode's config the server's model?")
    return tensor


def add_candidates(content, thetas: list[torch.Tensor], rnd: int) -> None:
    """Coalition Thetas of round `rnd` (the ledger's) for the oracle to validate, added to a request."""
    from flwr.app import ArrayRecord, ConfigRecord

    content["candidates"] = ArrayRecord({str(i): to_array(theta.float()) for i, theta in enumerate(thetas)})
    content["valued"] = ConfigRecord({"round": rnd})


def candidates_from(content, numel: int) -> tuple[int, list[torch.Tensor]]:
    """The round a request's candidate Thetas belong to and the Thetas, in order, each checked against the model's
    size (no Thetas: none to validate)."""
    record, valued = content.array_records.get("candidates"), content.config_records.get("valued")
    if record is None:
        return 0, []
    if sorted(record.keys()) != sorted(map(str, range(len(record.keys())))) or valued is None \
            or not isinstance(valued.get("round"), int):
        raise DgptError("the server's candidate Thetas are not numbered, or carry no round")
    return valued["round"], [theta_from({"theta": record[str(i)]}, numel) for i in range(len(record.keys()))]


def settings_record(shared_toml: str, tokenizer_sha256: str):
    """The shared settings as the server sends them: TOML text, its hash, and the tokenizer's fingerprint."""
    from flwr.app import ConfigRecord

    return ConfigRecord({"toml": shared_toml, "sha256": sha256_text(shared_toml), "tokenizer": tokenizer_sha256})


def settings_from(record) -> tuple[str, str]:
    """(shared TOML, tokenizer sha256) of a request, checked against the hash it came with."""
    fields = {k: record.get(k) if record is not None else None for k in ("toml", "sha256", "tokenizer")}
    if not all(isinstance(v, str) for v in fields.values()):
        raise DgptError("the server's message carries no shared settings: is the server's dgpt older than this SuperNode's?")
    if sha256_text(fields["toml"]) != fields["sha256"]:
        raise DgptError("the server's shared settings do not match the sha256 they came with")
    return fields["toml"], fields["tokenizer"]


def request(rnd: int, work: str, theta: torch.Tensor, sizes: dict[str, float], settings, head: dict | None = None,
            keep: bool = False):
    """What the server sends each asked SuperNode; from round 1 the ledger's newest signed head too. `keep`: also keep
    Theta as the run's model (its last validation)."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    content = RecordDict({"theta": theta_record(theta), "round": ConfigRecord({"round": rnd, "work": work, "keep": keep}),
                          "sizes": MetricRecord(sizes), "settings": settings})
    if head is not None:
        content["head"] = ConfigRecord(head)
    return content


def asks_to_keep(content) -> bool:
    asked = content.config_records.get("round")
    return asked is not None and asked.get("keep") is True


def reply(rnd: int, oracle: str, metrics: dict[str, float], payload: Payload | None = None, statement: dict | None = None,
          report: dict | None = None):
    """A ClientApp's answer: the round and oracle it is for, its metrics, (train) its encoded pseudo-gradient, and what
    it signed, each {body, signature}: its statement of what it trained and sent (train), its report of the
    validation losses it gave (of Theta, or of the ledger's candidate Thetas)."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    content = RecordDict({"round": ConfigRecord({"round": rnd, "oracle": oracle}), "metrics": MetricRecord(metrics)})
    if payload is not None:
        content["delta"] = payload_record(payload)
    for key, signed in (("statement", statement), ("report", report)):
        if signed is not None:
            content[key] = ConfigRecord(signed)
    return content


def refusal(rnd: int, oracle: str, reason: str):
    """A ClientApp's answer when it cannot take part (other settings, another tokenizer, an exception)."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"round": ConfigRecord({"round": rnd, "oracle": oracle}), "error": ConfigRecord({"reason": reason})})


def refusal_reason(content) -> str | None:
    """Why a reply's ClientApp could not take part (None: it did)."""
    record = content.config_records.get("error")
    return None if record is None else str(record.get("reason", "no reason given"))
