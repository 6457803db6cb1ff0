"""What dgpt puts in Flower messages, and the checks on what comes back. No pickle anywhere.

Tensors travel as Flower `Array`s holding their raw little-endian bytes (stype "raw"): the bytes of a
reply's arrays are exactly the `Payload.nbytes` the Strategy counts. bf16 has no numpy dtype, so its
16-bit patterns travel as int16 and are reinterpreted on arrival. Everything else is a `ConfigRecord`
(round id, oracle name) or a `MetricRecord` (token counts, losses).
"""

from __future__ import annotations

import math

import torch

from dgpt.federation.codec import Codec, Payload

RAW = "raw"  # the Array's bytes are the tensor's memory, little-endian, C order
TRAIN, EVALUATE = "train", "evaluate"  # Flower message types: train H steps from Theta; validate Theta
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
    from dgpt.errors import DgptError

    tensor, problem = from_array(record["theta"]) if record is not None and "theta" in record else (None, "no 'theta'")
    if problem or tensor.dtype != torch.float32 or tensor.numel() != numel:
        raise DgptError(f"the server sent {problem or f'{tensor.numel()} {tensor.dtype} values'} where {numel} float32 "
                        "parameters were expected: is this SuperNode's config the server's model?")
    return tensor
