"""The `torchrun` runtime: one rank per oracle, the encoded pseudo-gradients exchanged with torch.distributed.

Launch: `torchrun --nproc-per-node N -m dgpt pretrain CONFIG` (multi-host: add --nnodes, --node-rank and
--rdzv-endpoint). Rank r holds oracle r of the config and reads only its shards. gloo on CPU, NCCL on GPU.
Every rank all_gathers every participant's payload as it was encoded (fp32, bf16, or int8 plus fp32 scales)
and runs the same Strategy on it: each rank checks what it received and none trusts another's word.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Callable

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose. torch.distributed.nn.functional binds `group=group.WORLD`
# as default arguments when first imported, and the first torch.optim optimizer imports it (through torch._dynamo).
# Imported after init_process_group, those defaults held the default process group, so destroy_process_group could
# not free it: gloo's worker threads ran on into interpreter shutdown, where one releasing a finished collective's
# tensors took the GIL, was ended by Python with pthread_exit, and that ended the rank in std::terminate
# ("terminate called without an active exception", SIGABRT) after a complete run.
import torch.distributed.nn  # noqa: F401,E402

from dgpt.config import Config
from dgpt.errors import DgptError
from dgpt.federation.codec import Codec, Payload
from dgpt.runtimes.federated import pretraining_work, train_federated
from dgpt.runtimes.summary import RunSummary
from dgpt.rundir import RunDir

logger = logging.getLogger(__name__)
# what a collective raises when a peer process died or stopped answering (gloo's and NCCL's wording)
_LOST_CONTACT = ("Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out", "aborted")


class DistTransport:
    name = "torchrun"
    prepares_data = False  # `dgpt prepare` runs first; ranks must not race on the shard files

    def __init__(self, names: list[str], device: torch.device, timeout: datetime.timedelta):
        self.names, self.device = names, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_leader = self.rank == 0
        # each rank counts its collectives in torchrun's store: after a failure, the ranks that fell behind are named
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
        self.calls = 0
        local_rank = torch.tensor([int(os.environ.get("LOCAL_RANK", 0))], device=device)
        # the first rank of each host, rank 0 first
        self.host_leaders = [0] + [r for r, lr in enumerate(self._gather(local_rank)) if int(lr) == 0 and r != 0]

    def _gather(self, value: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        self.store.set(f"dgpt/calls/{self.rank}", str(self.calls))
        out = [torch.empty_like(value) for _ in range(self.world)]
        dist.all_gather(out, value.contiguous())
        return out

    def gather_scalars(self, local: dict[str, float]) -> dict[str, float]:
        mine = torch.tensor([local.get(self.names[self.rank], float("nan"))], dtype=torch.float64, device=self.device)
        return {name: float(v) for name, v in zip(self.names, self._gather(mine))}

    def sent(self, name: str, payload: Payload, codec: Codec) -> Payload:
        return payload

    def gather_texts(self, local: dict[str, str]) -> dict[str, str]:
        """Each rank's texts as the UTF-8 bytes of one JSON object (lengths first, then the padded bytes): no pickle."""
        mine = torch.tensor(list(json.dumps(local).encode()), dtype=torch.uint8)
        sizes = [int(n) for n in self._gather(torch.tensor([mine.numel()], dtype=torch.int64, device=self.device))]
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[: mine.numel()] = mine
        merged: dict[str, str] = {}
        for size, part in zip(sizes, self._gather(padded.to(self.device))):
            texts = json.loads(part[:size].cpu().numpy().tobytes())
            merged.update({k: v for k, v in texts.items() if isinstance(v, str)})
        return merged

    def exchange(self, sent: dict[str, Payload], participants: list[str], codec: Codec) -> dict[str, Payload]:
        """all_gather of the encoded tensors themselves; a rank that sits out the round sends zeros, ignored."""
        mine = sent.get(self.names[self.rank]) or codec.empty(self.device)
        values = self._gather(mine.values.to(self.device))
        scales = self._gather(mine.scales.to(self.device)) if mine.scales.numel() else [mine.scales] * self.world
        return {n: Payload(v, s) for n, v, s in zip(self.names, values, scales) if n in participants}

    def barrier(self) -> None:
        dist.barrier()

    def behind(self) -> list[str]:
        """'oracle' (rank r) of every rank that never reached this rank's last collective: dead or silent."""
        counts = {r: int(self.store.get(f"dgpt/calls/{r}")) if self.store.check([f"dgpt/calls/{r}"]) else 0 for r in range(self.world)}
        return [f"'{self.names[r]}' (rank {r})" for r, n in counts.items() if n < self.calls]

    def each_filesystem(self, write: Callable[[], None], written: Callable[[], bool]) -> None:
        """Rank 0 writes; then, in turn, each other host's first rank writes unless it already sees the
        result (a run_dir shared with a host before it). Hosts without a shared filesystem each get a copy."""
        for writer in self.host_leaders:
            if self.rank == writer and (writer == 0 or not written()):
                write()
            dist.barrier()


def pretrain_torchrun(config: Config, *, stop_after_round: int | None = None, work=pretraining_work) -> RunSummary:
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
    shards = RunDir(config.run_dir).manifest(name)
    if work is pretraining_work and not shards.is_file():
        dist.destroy_process_group()
        raise DgptError(
            f"oracle '{name}' (rank {rank}): no prepared shards on this host ({shards} missing); run "
            f"`dgpt prepare CONFIG --oracle {name}` here. Ranks take the oracles in config order: across hosts, "
            "launch with static rendezvous (--node-rank, --master-addr) so that each rank runs where its oracle is"
        )
    logger.info("ranks: " + ", ".join(f"{r}={n}" for r, n in enumerate(names)))
    transport = None
    try:
        transport = DistTransport(names, torch.device(config.pretrain.device if use_cuda else "cpu"), timeout)
        summary = train_federated(config, transport, [name], stop_after_round=stop_after_round, work=work)
        dist.barrier()  # no rank tears its process group down while another is still in a collective
        return summary
    except DgptError as e:
        raise DgptError(f"oracle '{name}' (rank {rank}): {e}") from None
    except Exception as e:
        if not _lost_contact(e):
            logger.error(f"oracle '{name}' (rank {rank}) failed: {type(e).__name__}: {_first_line(e)}")
            raise
        gone = _ranks_behind(transport)
        raise DgptError(
            f"oracle '{name}' (rank {rank}): lost contact with the other ranks ({_first_line(e)}); "
            + (f"dead or silent: {', '.join(gone)}" if gone else "a rank died or was silent for federation.timeout_s")
            + ". Rerun the same command to resume from the last round checkpoint"
        ) from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _lost_contact(error: Exception) -> bool:
    """Whether a collective failed because a peer died or went silent (not because of a bug or an OOM here)."""
    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(s in str(error) for s in _LOST_CONTACT)


def _ranks_behind(transport: DistTransport | None) -> list[str]:
    try:
        return transport.behind() if transport is not None else []
    except Exception:  # the store went down with its host: nothing more to say
        return []


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
