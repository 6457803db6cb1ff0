"""The `torchrun` runtime: one rank per oracle, pseudo-gradients combined with torch.distributed.

Launch: `torchrun --nproc-per-node N -m dgpt pretrain CONFIG` (multi-host: add --nnodes,
--node-rank and --rdzv-endpoint). Rank r holds oracle r of the config and reads only its shards.
gloo on CPU, NCCL on GPU. `mean` needs one all_reduce of w_j * Delta_j; the robust rules need every
Delta_j and all_gather them, then run the same aggregation code as `sim`.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from dgpt.config import Config, FederationConfig
from dgpt.data.shards import MANIFEST
from dgpt.errors import DgptError
from dgpt.federation.aggregate import aggregate_round, clip_to_norm, is_finite, normalise
from dgpt.runtimes.federated import LocalUpdate, RoundOutcome, pretraining_work, train_federated


class DistTransport:
    prepares_data = False  # `dgpt prepare` runs first; ranks must not race on the shard files

    def __init__(self, names: list[str], device: torch.device):
        self.names, self.device = names, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_leader = self.rank == 0
        local_rank = torch.tensor([int(os.environ.get("LOCAL_RANK", 0))], device=device)
        # the first rank of each host, rank 0 first
        self.host_leaders = [0] + [r for r, lr in enumerate(self._gather(local_rank)) if int(lr) == 0 and r != 0]

    def _gather(self, value: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(value) for _ in range(self.world)]
        dist.all_gather(out, value.contiguous())
        return out

    def gather_scalars(self, local: dict[str, float]) -> dict[str, float]:
        mine = torch.tensor([local.get(self.names[self.rank], float("nan"))], dtype=torch.float64, device=self.device)
        return {name: float(v) for name, v in zip(self.names, self._gather(mine))}

    def aggregate(
        self, updates: dict[str, LocalUpdate], fed: FederationConfig, weights: dict[str, float], numel: int
    ) -> RoundOutcome:
        name = self.names[self.rank]
        mine = updates.get(name)
        # status per rank: 0 = sat out, 1 = accepted, 2 = non-finite; bytes and loss for the ledger; ||Delta_j||
        status = 0.0 if mine is None else (1.0 if is_finite(mine.delta) else 2.0)
        values = [status, mine.bytes_sent, mine.train_loss, float(mine.delta.norm())] if mine else [status, 0, 0, 0]
        info = torch.tensor(values, dtype=torch.float64, device=self.device)
        rows = self._gather(info)
        accepted = [n for n, r in zip(self.names, rows) if r[0] == 1]
        rejected = [n for n, r in zip(self.names, rows) if r[0] == 2]
        sent = {n: int(r[1]) for n, r in zip(self.names, rows) if r[0] > 0}
        losses = {n: float(r[2]) for n, r in zip(self.names, rows) if r[0] > 0}
        norms = {n: float(r[3]) for n, r in zip(self.names, rows) if r[0] == 1}
        if not accepted:
            return RoundOutcome(None, accepted, rejected, sent, losses, norms)
        local = mine.delta if name in accepted else torch.zeros(numel, device=self.device)
        if fed.aggregator == "mean":
            w = normalise(weights, accepted).get(name, 0.0)
            update = clip_to_norm(local, fed.clip_norm) * w
            dist.all_reduce(update)
        else:
            deltas = dict(zip(self.names, self._gather(local)))
            update, _, _ = aggregate_round({n: deltas[n] for n in accepted}, fed.aggregator, weights, fed.trim_fraction, fed.clip_norm)
        return RoundOutcome(update, accepted, rejected, sent, losses, norms)

    def barrier(self) -> None:
        dist.barrier()

    def each_filesystem(self, write: Callable[[], None], written: Callable[[], bool]) -> None:
        """Rank 0 writes; then, in turn, each other host's first rank writes unless it already sees the
        result (a run_dir shared with a host before it). Hosts without a shared filesystem each get a copy."""
        for writer in self.host_leaders:
            if self.rank == writer and (writer == 0 or not written()):
                write()
            dist.barrier()


def pretrain_torchrun(
    config: Config, *, stop_after_round: int | None = None, log: Callable[[str], None] = print, work=pretraining_work
) -> dict:
    """One oracle per rank; `work` picks what is trained (`dgpt.runtimes.finetune.finetune_work`)."""
    if "RANK" not in os.environ:
        command = "pretrain" if work is pretraining_work else "finetune"
        raise DgptError(f"federation.runtime = 'torchrun' needs a torchrun launch: torchrun --nproc-per-node N -m dgpt {command} CONFIG")
    names = config.oracle_names()
    world = int(os.environ["WORLD_SIZE"])
    if world != len(names):
        raise DgptError(f"torchrun world size {world} does not match the {len(names)} oracles in the config ({', '.join(names)})")
    use_cuda = config.pretrain.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        config.pretrain.device = f"cuda:{local_rank}"
    timeout = datetime.timedelta(seconds=config.federation.timeout_s)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    rank = dist.get_rank()
    name = names[rank]
    shards = Path(config.run_dir) / "data" / name / MANIFEST
    if work is pretraining_work and not shards.is_file():
        dist.destroy_process_group()
        raise DgptError(
            f"oracle '{name}' (rank {rank}): no prepared shards on this host ({shards} missing); run "
            f"`dgpt prepare CONFIG --oracle {name}` here. Ranks take the oracles in config order: across hosts, "
            "launch with static rendezvous (--node-rank, --master-addr) so that each rank runs where its oracle is"
        )
    rank_log = log if rank == 0 else (lambda _msg: None)
    rank_log("ranks: " + ", ".join(f"{r}={n}" for r, n in enumerate(names)))
    try:
        transport = DistTransport(names, torch.device(config.pretrain.device if use_cuda else "cpu"))
        return train_federated(config, transport, [name], stop_after_round=stop_after_round, log=rank_log, work=work)
    except (RuntimeError, dist.DistBackendError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DgptError(
            f"oracle '{name}' (rank {rank}): distributed training stopped ({first}); a rank died or timed out. "
            "Rerun the same command to resume from the last round checkpoint"
        ) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
