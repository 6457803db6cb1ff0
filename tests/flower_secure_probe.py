"""dgpt's ServerApp and ClientApp, instrumented for test_flower_secure (the test copies this file into the Flower App,
whose run config's `probe` names a folder). Nothing of dgpt is replaced:

- the ServerApp is dgpt's `main`, handed a Grid that writes every byte string of every reply it returns (each Array's
  data, each bytes value in a ConfigRecord) to PROBE/server/ before dgpt or Flower's workflow reads it: all the
  ServerApp process ever receives from the SuperNodes;
- the ClientApp is dgpt's handlers behind dgpt's mods, plus one mod inside SecAgg+'s that writes aside, in
  PROBE/client/, the Theta each train request carries and the true pseudo-gradient and weight of each reply before
  SecAgg+ masks it; the SuperNode the run config's `drop` names ("PARTITION:ROUND") drops out in that round after
  sharing its keys, before it sends its masked vector.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid, ServerApp

from dgpt.runtimes.flower import client, secure, server, wire


def _folder(context: Context, side: str) -> Path:
    folder = Path(str(context.run_config["probe"])) / side
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class RecordingGrid:
    def __init__(self, grid: Grid, folder: Path):
        self.grid, self.folder, self.count = grid, folder, itertools.count()

    def _record(self, replies: list[Message]) -> list[Message]:
        for reply in replies:
            if reply.has_error():
                continue
            n = next(self.count)
            for name, record in reply.content.array_records.items():
                for key, array in record.items():
                    (self.folder / f"{n}_{name}_{key}.bin").write_bytes(array.data)
            for name, record in reply.content.config_records.items():
                for key, value in record.items():
                    for i, item in enumerate(value if isinstance(value, list) else [value]):
                        if isinstance(item, bytes):
                            (self.folder / f"{n}_{name}_{key}_{i}.bin").write_bytes(item)
        return replies

    def pull_messages(self, message_ids):
        return self._record(list(self.grid.pull_messages(message_ids)))

    def send_and_receive(self, messages, *, timeout=None):
        return self._record(list(self.grid.send_and_receive(messages, timeout=timeout)))

    def __getattr__(self, name):
        return getattr(self.grid, name)


probe_server = ServerApp()


@probe_server.main()
def main(grid: Grid, context: Context) -> None:
    server.main(RecordingGrid(grid, _folder(context, "server")), context)


def write_aside(message: Message, context: Context, call_next) -> Message:
    if not secure.masking():
        return call_next(message, context)
    folder = _folder(context, "client")
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    if str(context.run_config.get("drop")) == f"{context.node_config['partition-id']}:{fitins.config['c.round.round']}":
        raise RuntimeError("this SuperNode drops out after sharing its keys")
    (theta,) = parameters_to_ndarrays(fitins.parameters)
    reply = call_next(message, context)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    name, rnd = fitres.metrics["c.round.oracle"], fitres.metrics["c.round.round"]
    (delta,) = parameters_to_ndarrays(fitres.parameters)
    np.savez(folder / f"{name}_{rnd}.npz", theta=theta, delta=delta, weight=fitres.num_examples)
    return reply


probe_client = ClientApp(mods=[secure.secure_mod, write_aside])
probe_client.train()(client.train)
probe_client.evaluate()(client.evaluate)
probe_client.evaluate(wire.CANDIDATES.split(".")[1])(client.candidates)
probe_client.query(wire.MODEL.split(".")[1])(client.keep_model)
