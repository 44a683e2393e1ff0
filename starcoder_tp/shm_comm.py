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
which would be weakly ordered. An all-reduce of STREAM_MIN_BYTES or more may publish its chunks
by stream_copy.c's non-temporal stores instead, fenced before the flag: the lines go to memory
rather than staying modified in the writer's cache. Which is faster depends on where the ranks
run: on the EPYC Zen 4 VM a 2 MiB all-reduce took 1.19 ms copied and 0.34 streamed while its two
vCPUs read memory at twice one's rate (two cores, as we read it), 0.24 copied and 0.39 streamed
while they read at one's (one core's two threads, sharing its caches), and the VM moves between
the two within seconds. So from every PROBE_EVERY-th large all-reduce on, four of one size are timed, each way
twice, and the faster way publishes until the next probe (Probes; RESULTS.md, "The all-reduce's
slots written past the cache"). The way does not change the values. A rank's own part is summed
from its chunk, still in its cache, not from its slot: the same values, in the same rank order.

An all-reduce below STREAM_MIN_BYTES in fp32 or bf16 (a decode step's) runs the same protocol in one call
of shm_reduce.c, where the library is built (use_small_reduce): in Python, the copy, flag and torch.add
around a 4-KiB exchange cost ~10-20 µs an all-reduce, twice a layer (RESULTS.md, "The small all-reduce in
one call"). Ranks on either path agree bit for bit.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import time
import uuid
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Callable

import torch

SLOT_BYTES = 512 << 10
FLAG_STRIDE = 8  # int64 per flag line (64 bytes): no false sharing between ranks' flags
# Below 64 KiB (a decode step's one row: 4 KiB in fp32) the two ways were within the noise of each
# other on the EPYC Zen 4; at it (a batch-16 step's fp32 partial) streaming took 27 µs against 60
# copied while the VM ran its vCPUs on two cores, 30 against 32 while on one.
STREAM_MIN_BYTES = 64 << 10
# Large all-reduces from the start of one probe to the next: a batch-16 decode step of the bench-size
# models has 16-18 (a probe every ~0.2 s), a prefill as many, one per row-parallel linear.
PROBE_EVERY = 128
PROBE_ORDER = (0, 1, 1, 0)  # a probe's all-reduces: each way twice (the first way alternates), each its least
PROBE_MISSES = 4  # all-reduces of another size a probe passes over before it starts again at that size
PROBE_MOST = len(PROBE_ORDER) + 2 * PROBE_MISSES  # timed all-reduces before a probe that has not ended is dropped
STREAM_ENV = "STARCODER_TP_SHM_STREAM"  # auto (default): probed; 0: always copied; 1: always streamed
SMALL_ENV = "STARCODER_TP_SHM_SMALL"  # 1 (default): all-reduces below STREAM_MIN_BYTES by shm_reduce.c; 0: in Python
SMALL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # shm_reduce.c's `bf16` argument
SMALL_WAIT_S = 0.05  # each call's wait at most: between calls the deadline is checked and Ctrl-C gets through


class ShmView(ctypes.Structure):  # shm_reduce.c's struct shm_view
    _fields_ = [("flags", ctypes.c_void_p), ("data", ctypes.c_void_p), ("flag_stride", ctypes.c_long),
                ("slot_bytes", ctypes.c_long), ("rank", ctypes.c_long), ("world_size", ctypes.c_long)]


def stream_setting() -> str:
    """STREAM_ENV's value, checked: the parent checks it before it starts any rank."""
    wanted = os.environ.get(STREAM_ENV, "auto")
    if wanted not in ("auto", "0", "1"):
        raise ValueError(f"{STREAM_ENV}={wanted!r}: expected auto (probed), 0 (copied) or 1 (streamed)")
    return wanted


def small_setting() -> bool:
    """SMALL_ENV's value, checked (the parent checks it before it starts any rank): whether small all-reduces
    run in shm_reduce.c."""
    wanted = os.environ.get(SMALL_ENV, "1")
    if wanted not in ("0", "1"):
        raise ValueError(f"{SMALL_ENV}={wanted!r}: expected 0 (in Python) or 1 (shm_reduce.c, the default)")
    return wanted == "1"


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and Path("/dev/shm").is_dir()


def create_segment(world_size: int, slot_bytes: int = SLOT_BYTES) -> str:
    """Create the zeroed segment and return its path; the caller removes it (remove_segment) once
    every rank has mapped it. Until then multiprocessing's resource tracker holds its name: were
    this process killed first, the tracker removes it when the last process sharing it is gone."""
    size = world_size * FLAG_STRIDE * 8 + 2 * world_size * slot_bytes
    segment = shared_memory.SharedMemory(f"starcoder_tp-{os.getpid()}-{uuid.uuid4().hex[:12]}", create=True, size=size)
    segment.close()  # (the ranks map it by its path; this process has no use for a mapping)
    return f"/dev/shm/{segment.name}"


def remove_segment(path: str) -> None:
    """Unlink a segment of create_segment, and take its name off the resource tracker's list."""
    try:
        segment = shared_memory.SharedMemory(Path(path).name)
    except FileNotFoundError:  # (unlinked by someone else: the name must still leave the tracker's list)
        resource_tracker.unregister(f"/{Path(path).name}", "shared_memory")
        return
    segment.close()
    segment.unlink()


class Probes:
    """Whether a large all-reduce publishes by streaming, from the last probe: from every PROBE_EVERY-th
    large all-reduce on, four of one size are timed, each way twice (PROBE_ORDER; which way goes first
    alternates), and the way whose least time a byte was less kept. Every rank runs the same
    all-reduces in the same order, so all probe the same ones; each decides for itself (no rank reads
    how another wrote)."""

    def __init__(self) -> None:
        self.streaming = False
        self.calls = 0  # large all-reduces so far
        self.won = {False: 0, True: 0}  # probes each way won
        self._want: list[bool] = []  # the ways this probe has still to time, in turn
        self._per_byte: dict[bool, float] = {}
        self._size: int | None = None  # the probe's all-reduces' bytes
        self._misses = 0  # all-reduces of another size during this probe
        self._timed = 0  # all-reduces this probe has timed (misses too)

    def next(self) -> tuple[bool, bool]:
        """(stream this large all-reduce, time it for the probe)."""
        self.calls += 1
        if not self._want and self.calls % PROBE_EVERY == 1:  # (the first large all-reduce too)
            self._want = self._turns(first=(self.calls // PROBE_EVERY) % 2 == 1)
        return (self._want[0], True) if self._want else (self.streaming, False)

    def record(self, streamed: bool, seconds: float, nbytes: int) -> None:
        """A probed all-reduce of `nbytes` took `seconds`: once the probe's turns are timed, keep the faster."""
        self._timed += 1
        if self._timed > PROBE_MOST:  # (sizes taking turns too fast for one to finish: the way kept as it was)
            self._end()
            return
        if self._size is not None and nbytes != self._size:
            self._misses += 1
            if self._misses <= PROBE_MISSES:
                return  # (not this probe's size: its turn comes again at the next all-reduce)
            self._want, self._size = self._turns(first=streamed), None  # (again, from this one)
        if self._size is None:
            self._per_byte, self._size, self._misses = {}, nbytes, 0
        self._per_byte[streamed] = min(self._per_byte.get(streamed, float("inf")), seconds / nbytes)
        self._want.pop(0)
        if not self._want:
            self.streaming = self._per_byte[True] < self._per_byte[False]
            self.won[self.streaming] += 1
            self._end()

    @staticmethod
    def _turns(first: bool) -> list[bool]:
        """A probe's ways in turn (PROBE_ORDER), `first` the way of its first turn."""
        return [first != bool(turn) for turn in PROBE_ORDER]

    def _end(self) -> None:
        self._want, self._per_byte, self._size, self._misses, self._timed = [], {}, None, 0, 0


class ShmComm:
    def __init__(self, path: str, rank: int, world_size: int, timeout_s: float, slot_bytes: int = SLOT_BYTES):
        self.rank, self.world_size, self.timeout_s, self.slot_bytes = rank, world_size, timeout_s, slot_bytes
        flag_bytes = world_size * FLAG_STRIDE * 8
        size = flag_bytes + 2 * world_size * slot_bytes
        self._raw = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        self._flags = self._raw[:flag_bytes].view(torch.int64).view(world_size, FLAG_STRIDE)
        self._flags_np = self._flags.numpy()[:, 0]  # the same memory, read without torch overhead
        self._data = self._raw[flag_bytes:].view(2, world_size, slot_bytes)
        # Every slot's pages touched now (this rank's written, the others' read): a probe's first
        # all-reduces would otherwise take their faults, the first way's more than the second's.
        self._data[:, rank].zero_()
        self._data.max()
        self._seq = 0
        # (buffer, numel, dtype) -> (this rank's slot, every rank's slots), typed views: a decode
        # step exchanges the same few shapes thousands of times, and each view costs microseconds.
        self._views: dict[tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._stream_copy = None  # stream_copy.c's, from use_stream_copy
        self.publishing = "copied"  # how large all-reduces publish: copied, streamed or probed (the plan's line)
        self.probes = Probes()
        self.waited_s = 0.0  # a probed all-reduce's waits for the other ranks
        self._small = None  # shm_reduce.c's, from use_small_reduce
        self._view = ShmView(self._raw.data_ptr(), self._data.data_ptr(), FLAG_STRIDE, slot_bytes, rank, world_size)
        self._view_ptr = ctypes.addressof(self._view)

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

    def use_stream_copy(self, stream_copy) -> str:
        """Let large all-reduces publish by `stream_copy` (stream_copy.c's, or None where the library is
        not built: always copied), as STREAM_ENV says; returns `publishing`."""
        wanted = stream_setting()
        self._stream_copy = stream_copy if wanted != "0" else None
        self.publishing = "copied" if self._stream_copy is None else "streamed" if wanted == "1" else "probed"
        self.probes.streaming = self.publishing == "streamed"
        return self.publishing

    def use_small_reduce(self, small_all_reduce) -> bool:
        """Let all-reduces below STREAM_MIN_BYTES run in one call of `small_all_reduce` (shm_reduce.c's, or None
        where the library is not built: in Python), unless SMALL_ENV is 0; returns whether they do."""
        self._small = small_all_reduce if small_setting() else None
        return self._small is not None

    @property
    def small_in_c(self) -> bool:
        """Whether small all-reduces run in one call of shm_reduce.c (use_small_reduce)."""
        return self._small is not None

    def bound_all_reduce_(self, t: torch.Tensor) -> Callable[[], None] | None:
        """all_reduce_(t) as a call with its checks made once, where `t` takes the small path (shm_reduce.c),
        else None: a fused decode step sums the same partial twice a layer (fused_step.py). The caller holds
        `t`, contiguous, at the same address."""
        kind = self._small_kind(t.nbytes, t.dtype)
        if kind is None or not t.is_contiguous():
            return None
        return functools.partial(self._all_reduce_small, t.data_ptr(), t.numel(), kind, self._small)

    def _small_kind(self, nbytes: int, dtype: torch.dtype) -> int | None:
        """shm_reduce.c's code for `dtype` where an all-reduce of `nbytes` takes the small path (one call), else None."""
        if self._small is None or not 0 < nbytes < min(STREAM_MIN_BYTES, self.slot_bytes + 1):
            return None
        return SMALL_DTYPES.get(dtype)

    def _all_reduce_small(self, data_ptr: int, numel: int, kind: int, small=None) -> None:
        small = small if small is not None else self._small  # (a bound call keeps the function it was made with)
        self._seq += 1
        late = small(self._view_ptr, self._seq, data_ptr, numel, kind, 1, SMALL_WAIT_S)
        if late < 0:
            return
        deadline = time.monotonic() - SMALL_WAIT_S + self.timeout_s  # (from the wait's start, as _wait's)
        while late >= 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank(s) {self._late(self._seq)} did not reach collective #{self._seq} within "
                                   f"{self.timeout_s:.0f}s (rank {self.rank} waited)")
            late = small(self._view_ptr, self._seq, data_ptr, numel, kind, 0, SMALL_WAIT_S)

    def _late(self, seq: int) -> list[int]:
        return [r for r in range(self.world_size) if self._flags_np[r] < seq]

    def _exchange(self, chunk: torch.Tensor, streamed: bool = False, timed: bool = False) -> torch.Tensor:
        """Publish `chunk` (1-D, contiguous, <= slot) and return all ranks' chunks, [N, numel]; `timed`:
        add the time waited for the other ranks to `waited_s`."""
        self._seq += 1
        mine, every = self._slots(self._seq % 2, chunk.numel(), chunk.dtype)
        if streamed:
            self._stream_copy(mine.data_ptr(), chunk.data_ptr(), chunk.numel() * chunk.element_size())  # (fenced)
        else:
            mine.copy_(chunk)
        self._flags_np[self.rank] = self._seq  # a plain store, after the data's (x86 TSO)
        if timed:
            started = time.perf_counter()
            self._wait(self._seq)
            self.waited_s += time.perf_counter() - started
        else:
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
                    raise RuntimeError(f"rank(s) {self._late(seq)} did not reach collective #{seq} within "
                                       f"{self.timeout_s:.0f}s (rank {self.rank} waited)")

    def _chunks(self, flat: torch.Tensor):
        step = self.slot_bytes // flat.element_size()
        for start in range(0, flat.numel(), step):
            yield flat[start:start + step]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place, in rank order (identical bits on every rank)."""
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        nbytes = flat.nbytes
        # (an empty tensor never exchanges, on either path: ranks on the two paths keep the same sequence)
        if (kind := self._small_kind(nbytes, t.dtype)) is not None:
            self._all_reduce_small(flat.data_ptr(), flat.numel(), kind)  # (one call, not ~20 µs of torch's ops)
        else:
            self._all_reduce_large(flat, nbytes)
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view_as(t))
        return t

    def _all_reduce_large(self, flat: torch.Tensor, nbytes: int) -> None:
        streamed = timed = False
        if self.publishing != "copied" and nbytes >= STREAM_MIN_BYTES:
            streamed, timed = self.probes.next() if self.publishing == "probed" else (True, False)
        # A probe times this rank's copies and sums, not its waits: those are the other ranks' lateness
        # (a prefill's linears end up to milliseconds apart), which would outweigh the way it times.
        if timed:
            started, self.waited_s = time.perf_counter(), 0.0
        for chunk in self._chunks(flat):
            parts = self._exchange(chunk, streamed, timed)  # [N, n]
            # Summed straight into the caller's tensor, in rank order: ((p0 + p1) + p2) + ...; ranks 0
            # and 1 read their own part from `chunk` (ranks past them: it holds the sum by their turn).
            torch.add(chunk if self.rank == 0 else parts[0], chunk if self.rank == 1 else parts[1], out=chunk)
            for r in range(2, self.world_size):
                chunk.add_(parts[r])
        if timed:
            self.probes.record(streamed, time.perf_counter() - started - self.waited_s, nbytes)

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
