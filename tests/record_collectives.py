"""Run the `dgpt` CLI under torchrun with torch.distributed's collectives recorded.

    torchrun ... tests/record_collectives.py OUT_PREFIX pretrain CONFIG

Each rank writes OUT_PREFIX.rank<R>.json: one {"op", "dtype", "numel", "nbytes"} per collective call, describing
the tensor that rank handed to it. The torchrun tests read it to check what actually went over the wire.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from dgpt.cli import main

calls = []


def recorded(collective):
    def call(*args, **kwargs):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        calls.append({"op": collective.__name__, "dtype": str(tensor.dtype).removeprefix("torch."),
                      "numel": tensor.numel(), "nbytes": tensor.nbytes})
        return collective(*args, **kwargs)

    return call


for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce", "gather", "scatter"):
    setattr(dist, name, recorded(getattr(dist, name)))

if __name__ == "__main__":
    status = main(sys.argv[2:])
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}.json", "w") as f:
        json.dump(calls, f)
    sys.exit(status)
