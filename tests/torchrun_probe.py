"""Run the `dgpt` CLI under torchrun with torch.distributed's collectives recorded, and optionally one rank vanishing.

    torchrun ... tests/torchrun_probe.py OUT_PREFIX pretrain CONFIG

Each rank writes OUT_PREFIX.rank<R>.json: one {"op", "dtype", "numel", "nbytes"} per collective call, describing the
tensor that rank handed to it (what actually went over the wire). With DGPT_PROBE_VANISH="R:N" in the environment,
rank R exits silently (status 0, no message) instead of starting its N-th gather: a host that went away. With
DGPT_PROBE_LIE="R:F", rank R multiplies every pseudo-gradient it sends by F (e.g. nan or 1000) and signs it: a rank
that lies.
OUT_PREFIX.rank<R>.threads.json lists the names of the threads still running once the command returned.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dgpt.cli import main
from dgpt.runtimes.torchrun import DistTransport

calls = []
vanish_rank, vanish_call = map(int, os.environ.get("DGPT_PROBE_VANISH", "-1:0").split(":"))
lie_rank, lie_factor = os.environ.get("DGPT_PROBE_LIE", "-1:1").split(":")


def recorded(collective):
    def call(*args, **kwargs):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        calls.append({"op": collective.__name__, "dtype": str(tensor.dtype).removeprefix("torch."),
                      "numel": tensor.numel(), "nbytes": tensor.nbytes})
        return collective(*args, **kwargs)

    return call


def vanishing(gather):
    def call(self, value):
        if self.rank == vanish_rank and self.calls + 1 == vanish_call:
            os._exit(0)
        return gather(self, value)

    return call


def lying(sent):
    def call(self, name, payload, codec):
        if self.rank == int(lie_rank):
            payload = codec.encode(codec.decode(payload) * float(lie_factor))
        return sent(self, name, payload, codec)

    return call


DistTransport._gather = vanishing(DistTransport._gather)
DistTransport.sent = lying(DistTransport.sent)


for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce", "gather", "scatter"):
    setattr(dist, name, recorded(getattr(dist, name)))

if __name__ == "__main__":
    status = main(sys.argv[2:])
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}.json", "w") as f:
        json.dump(calls, f)
    threads = sorted(p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm"))
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}.threads.json", "w") as f:
        json.dump(threads, f)
    sys.exit(status)
