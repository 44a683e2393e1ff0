"""Ranks started by torchrun (one node or several) instead of the local worker group: joining
its process group, the one start-up every command shares, and WorkerGroup's `generate` over
the ranks already running."""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .comm import TPGroup
from .device import Device
from .generate import check_request
from .model import TPCausalLM, load_model
from .malloc import as_a_cpu_rank
from .group_spec import DEFAULT_CALL_TIMEOUT_S, GroupSpec, configure_threads
from .timing import GenerationResult, timed_generate


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def torchrun_world_size(requested: int | None) -> int:
    """torchrun's WORLD_SIZE, refusing a --world-size that says otherwise."""
    world_size = int(os.environ["WORLD_SIZE"])
    if requested and requested != world_size:
        raise ValueError(f"--world-size {requested} differs from torchrun's WORLD_SIZE={world_size}")
    return world_size


def init_from_torchrun(device: Device, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> tuple[TPGroup, int]:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns the group and the local rank, which picks the device.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device.bind(local_rank)
    dist.init_process_group(device.backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return TPGroup(rank, world_size), local_rank


class TorchrunGroup:
    """The ranks torchrun started (this process is one of them), behind WorkerGroup's
    `generate`, so that the perf runner drives them alike. Every rank runs the same requests in
    the same order (the perf loop and its prompts are deterministic); the collectives inside
    keep them in step, and a dead peer surfaces as a collective error after --rank-timeout."""

    def __init__(self, model: TPCausalLM, device: Device, tp: TPGroup):
        self.model, self.device, self.tp = model, device, tp

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, max_seq_len: int | None = None,
                 **kwargs) -> tuple[GenerationResult, list[int]]:
        """This rank's result (its times are already the slowest rank's) and every rank's peak memory."""
        check_request(self.model.config, prompts, max_new_tokens, max_seq_len)
        self.device.reset_peak_memory()
        result = timed_generate(self.model, self.device, prompts, max_new_tokens, max_seq_len=max_seq_len, **kwargs)
        dev = self.model.transformer.ln_f.weight.device
        peak = torch.tensor([float(self.device.peak_memory_bytes())], dtype=torch.float64, device=dev)
        return result, [int(m) for m in self.tp.all_gather(peak).flatten().tolist()]

    def close(self) -> None:
        """Nothing to stop: torchrun owns the processes (torchrun_rank destroys the process group)."""


@dataclass
class TorchrunRank:
    model: TPCausalLM
    tp: TPGroup
    local_rank: int
    device: Device
    shard_dir: Path
    setup_s: float  # joining, shards, load

    @property
    def group(self) -> TorchrunGroup:
        return TorchrunGroup(self.model, self.device, self.tp)


@contextlib.contextmanager
def torchrun_rank(device: Device, shards: Callable[[int, bool], Path], *, threads_per_rank: int | None,
                  kernels: str, compile: bool, timeout_s: float) -> Iterator[TorchrunRank]:
    """This process as one of torchrun's ranks: join the group, have the shards cut once per node
    (`shards(world_size, cut)` returns their directory; local rank 0 calls it with cut=True
    first, the others after a barrier with cut=False), pin the threads, load this rank's part.
    The process group is destroyed on the way out."""
    started = time.perf_counter()
    tp, local_rank = init_from_torchrun(device, timeout_s)
    try:
        if device.kind == "cpu":
            # The allocator that keeps freed blocks, and 2 MiB pages: before this process's first
            # large block, which the cut below makes on local rank 0 (c10 reads the setting once,
            # and the kernel plan's key names it).
            as_a_cpu_rank()
        if local_rank == 0:  # one cut per node, into that node's cache
            shards(tp.world_size, True)
        dist.barrier()
        shard_dir = shards(tp.world_size, False)
        if device.kind == "cpu":
            configure_threads(local_rank, GroupSpec(str(shard_dir), tp.world_size, device, threads_per_rank,
                                                    pin_cores=False))
        model = load_model(shard_dir, tp, device.torch_device(local_rank), kernels=kernels, compile=compile)
        yield TorchrunRank(model, tp, local_rank, device, Path(shard_dir), time.perf_counter() - started)
    finally:
        dist.destroy_process_group()
