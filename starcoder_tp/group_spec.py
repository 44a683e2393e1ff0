"""What a worker group is asked to be (GroupSpec), and how its ranks share this machine's cores.

Both the local worker group (parallel.py) and torchrun's ranks (torchrun.py) start from it.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

from . import shm_comm
from .device import Device
from .malloc import malloc_choice

DEFAULT_START_TIMEOUT_S = 300.0
DEFAULT_CALL_TIMEOUT_S = 60.0  # how long a rank waits on another (collectives): a hung rank is named then
DEFAULT_REQUEST_TIMEOUT_S = 3600.0  # one whole generation; long grids cases on a CPU take minutes
COMPILE_ALLOWANCE_S = 600.0  # with --compile, a first step at a new shape compiles for up to this long, silently


@dataclass(frozen=True)
class GroupSpec:
    """Everything a rank needs to start."""

    shard_dir: str
    world_size: int
    device: Device = Device("cpu")
    threads_per_rank: int | None = None  # None: the machine's cores shared evenly
    pin_cores: bool = True
    timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    comm: str = "auto"  # "shm": shared-memory collectives; "dist": the backend's; "auto": shm on one CPU host
    kernels: str = "auto"  # the linear kernels on CPU (kernels.KERNEL_MODES): 'auto' measures them
    compile: bool = False  # decode steps through torch.compile (see TPCausalLM.compile_decode)

    def __post_init__(self) -> None:
        malloc_choice()  # a bad STARCODER_TP_MALLOC stops here, before any rank is spawned
        if self.comm not in ("auto", "shm", "dist"):
            raise ValueError(f"comm {self.comm!r} is not one of 'auto', 'shm', 'dist'")
        if self.comm == "shm" and (self.device.kind != "cpu" or not shm_comm.supported()):
            raise ValueError(f"comm 'shm' needs --device cpu on x86-64 with /dev/shm, not {self.device.kind} "
                             f"on {platform.machine()}")
        if self.use_shm:
            shm_comm.stream_setting()  # a bad STARCODER_TP_SHM_STREAM stops here too
            shm_comm.small_setting()  # and STARCODER_TP_SHM_SMALL

    @property
    def use_shm(self) -> bool:
        if self.world_size == 1 or self.comm == "dist":
            return False
        return self.comm == "shm" or (self.device.kind == "cpu" and shm_comm.supported())


def default_threads(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def oversubscription(spec: GroupSpec) -> str:
    """A warning when the ranks' threads outnumber the cores this process may use ('' if not):
    ranks spin while they wait, so oversubscribed they slow each other down many times over."""
    if spec.device.kind != "cpu":
        return ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = spec.threads_per_rank or default_threads(spec.world_size)
    if threads * spec.world_size <= cores:
        return ""
    return (f"{spec.world_size} rank(s) x {threads} thread(s) = {threads * spec.world_size} threads on {cores} usable "
            f"core(s): the ranks slow each other down, so these figures are not this machine's "
            f"(at most {max(1, cores // spec.world_size)} thread(s) per rank fit)")


def configure_threads(rank: int, spec: GroupSpec) -> int:
    """One slice of the cores per rank: oversubscribed ranks slow each other down badly."""
    threads = spec.threads_per_rank or default_threads(spec.world_size)
    torch.set_num_threads(threads)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if spec.pin_cores and spec.device.kind == "cpu" and len(cores) >= threads * spec.world_size:
        os.sched_setaffinity(0, cores[rank * threads:(rank + 1) * threads])
    return threads
