"""All-reduce and all-gather through shared memory, for the ranks of one host.

gloo over loopback TCP costs about 1-2 ms per small all-reduce on a 2-core machine (its I/O
threads compete with the compute for the cores), and a decode step needs two per layer; one
shared segment polled by the ranks costs tens of microseconds. The protocol: rank r copies its
tensor into its slot of buffer (seq % 2), then publishes `seq` in its own flag; every rank waits
until all flags reach `seq` and sums the slots in rank order, so every rank gets bit-identical
results. Double buffering makes reuse safe: a rank publishes seq + 1 only after it finished
reading seq, so nobody overwrites a slot that is still being read.

x86-64 only: its stores are seen by other cores in program order (TSO), so the flag is never
seen before the data. Chunks are kept small, below glibc's threshold for non-temporal copies,
which would be weakly ordered.
"""
from __future__ import annotations

import os
import platform
import time
import uuid
from pathlib import Path

import torch

SLOT_BYTES = 512 << 10
FLAG_STRIDE = 8  # int64 per flag line (64 bytes): no false sharing between ranks' flags


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and Path("/dev/shm").is_dir()


def create_segment(world_size: int, slot_bytes: int = SLOT_BYTES) -> str:
    """Create the zeroed segment file; the caller unlinks it once every rank has mapped it."""
    path = f"/dev/shm/starcoder_tp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    size = world_size * FLAG_STRIDE * 8 + 2 * world_size * slot_bytes
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class ShmComm:
    def __init__(self, path: str, rank: int, world_size: int, timeout_s: float, slot_bytes: int = SLOT_BYTES):
        self.rank, self.world_size, self.timeout_s, self.slot_bytes = rank, world_size, timeout_s, slot_bytes
        flag_bytes = world_size * FLAG_STRIDE * 8
        size = flag_bytes + 2 * world_size * slot_bytes
        self._raw = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        self._flags = self._raw[:flag_bytes].view(torch.int64).view(world_size, FLAG_STRIDE)
        self._flags_np = self._flags.numpy()[:, 0]  # the same memory, read without torch overhead
        self._data = self._raw[flag_bytes:].view(2, world_size, slot_bytes)
        self._seq = 0
        # (buffer, numel, dtype) -> (this rank's slot, every rank's slots), typed views: a decode
        # step exchanges the same few shapes thousands of times, and each view costs microseconds.
        self._views: dict[tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _slots(self, parity: int, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (parity, numel, dtype)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 256:  # sampling's ragged last chunks, many request shapes
                self._views.clear()
            nbytes = numel * dtype.itemsize
            # Views made in inference mode could not be written outside it later (and the model
            # runs in it, the timers' collectives outside): made outside, they serve both.
            with torch.inference_mode(False):
                buffers = self._data[parity]  # [N, slot_bytes]
                views = self._views[key] = (buffers[self.rank, :nbytes].view(dtype),
                                            buffers[:, :nbytes].view(dtype))
        return views

    def _exchange(self, chunk: torch.Tensor) -> torch.Tensor:
        """Publish `chunk` (1-D, contiguous, <= slot) and return all ranks' chunks, [N, numel]."""
        self._seq += 1
        mine, every = self._slots(self._seq % 2, chunk.numel(), chunk.dtype)
        mine.copy_(chunk)
        self._flags_np[self.rank] = self._seq  # a plain store, after the data's (x86 TSO)
        self._wait(self._seq)
        return every

    def _wait(self, seq: int) -> None:
        flags = self._flags_np
        if flags.min() >= seq:
            return
        # From the wait's start, checked at every yield: set after 64 yields and checked every 64,
        # as it was, the timeout came late by up to 128 yields, each a time slice on a loaded
        # machine, and the parent's own watch on the stopped rank could fire first.
        deadline = time.monotonic() + self.timeout_s
        spins = 0
        while flags.min() < seq:
            spins += 1
            if spins % 64 == 0:
                os.sched_yield()  # several ranks per core must still make progress
                if time.monotonic() > deadline:
                    late = [r for r in range(self.world_size) if flags[r] < seq]
                    raise RuntimeError(f"rank(s) {late} did not reach collective #{seq} within {self.timeout_s:.0f}s "
                                       f"(rank {self.rank} waited)")

    def _chunks(self, flat: torch.Tensor):
        step = self.slot_bytes // flat.element_size()
        for start in range(0, flat.numel(), step):
            yield flat[start:start + step]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place, in rank order (identical bits on every rank)."""
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        for chunk in self._chunks(flat):
            parts = self._exchange(chunk)  # [N, n]
            # Summed straight into the caller's tensor, in rank order: ((p0 + p1) + p2) + ...
            torch.add(parts[0], parts[1], out=chunk)
            for r in range(2, self.world_size):
                chunk.add_(parts[r])
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view_as(t))
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[N, *t.shape], every rank's `t` in rank order."""
        flat = t.contiguous().view(-1)
        if flat.numel() * flat.element_size() <= self.slot_bytes:
            return self._exchange(flat).clone().view(self.world_size, *t.shape)
        out = torch.empty((self.world_size, flat.numel()), dtype=t.dtype)  # sampling's full logits
        done = 0
        for chunk in self._chunks(flat):
            out[:, done:done + chunk.numel()] = self._exchange(chunk)
            done += chunk.numel()
        return out.view(self.world_size, *t.shape)
