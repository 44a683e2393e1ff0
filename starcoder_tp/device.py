"""One small layer per device kind: which backend, how to synchronise, how much memory was used."""
from __future__ import annotations

import importlib
import resource
import sys
from dataclasses import dataclass

import torch

DEVICE_KINDS = ("cpu", "cuda", "npu")
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


class DeviceUnavailable(RuntimeError):
    """The run asks for a device (or the adapter for it) that this machine lacks: the user's
    choice to correct, as a bad value is (the command line exits 2), not a rank's failure."""


def import_torch_npu():
    """Import torch_npu (Ascend) on demand, with an error that says how to get it."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as err:
        raise DeviceUnavailable(
            "--device npu needs the Ascend adapter torch_npu, which is not importable here "
            f"({err}). Install the CANN toolkit and the torch_npu build matching torch "
            f"{torch.__version__} (see requirements-npu.txt and the README's Ascend section)."
        ) from None


@dataclass(frozen=True)
class Device:
    """The device kind a run uses; rank r runs on device index `device_id + r` (local rank)."""

    kind: str
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"device {self.kind!r} is not supported; choose one of {', '.join(DEVICE_KINDS)}")
        if self.device_id < 0:
            raise ValueError(f"device id must be >= 0, got {self.device_id}")

    @property
    def backend(self) -> str:
        return BACKENDS[self.kind]

    def check_available(self, world_size: int) -> None:
        """Raise before any rank is spawned when the device cannot host `world_size` local ranks."""
        if self.kind == "cpu":
            return
        if self.kind == "npu":
            import_torch_npu()  # registers torch.npu
        module = getattr(torch, self.kind)
        if not module.is_available():
            raise DeviceUnavailable(f"--device {self.kind}: no {self.kind} device is available on this machine")
        count = module.device_count()
        if self.device_id + world_size > count:
            raise ValueError(
                f"--device-id {self.device_id} with {world_size} rank(s) needs devices "
                f"{self.device_id}..{self.device_id + world_size - 1}, but only {count} {self.kind} device(s) exist"
            )

    def torch_device(self, local_rank: int) -> torch.device:
        if self.kind == "cpu":
            return torch.device("cpu")
        if self.kind == "npu":
            import_torch_npu()  # registers the "npu" device type with torch
        return torch.device(self.kind, self.device_id + local_rank)

    def bind(self, local_rank: int) -> torch.device:
        """Make this process use its own device; returns it."""
        dev = self.torch_device(local_rank)
        if self.kind == "cuda":
            torch.cuda.set_device(dev)
        elif self.kind == "npu":
            torch.npu.set_device(dev)
        return dev

    def synchronize(self) -> None:
        """Wait for queued device work: a clock read is only honest after this."""
        if self.kind == "cuda":
            torch.cuda.synchronize()
        elif self.kind == "npu":
            torch.npu.synchronize()

    def reset_peak_memory(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self.kind == "npu":
            torch.npu.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak_memory_bytes(self) -> int:
        """Peak device memory on cuda/npu; on cpu the process's peak RSS since reset_peak_memory."""
        if self.kind == "cuda":
            return int(torch.cuda.max_memory_allocated())
        if self.kind == "npu":
            return int(torch.npu.max_memory_allocated())
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Start this process's RSS high-water mark (Linux's VmHWM) again from its current RSS;
    False where the kernel offers no reset (then the peak is the process's whole life's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS: Linux's VmHWM, which belongs to the process's own memory map.
    Not getrusage's ru_maxrss: a spawned child (fork, then exec) starts from its parent's RSS
    at the fork, so a rank started by a 1 GB pytest process would report at least 1 GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc (macOS: bytes; elsewhere kB)
    return int(peak if sys.platform == "darwin" else peak * 1024)
