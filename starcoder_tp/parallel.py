"""The local worker group: ranks that the runtime spawns itself on one host (torchrun's ranks:
torchrun.py), seen from the parent. What runs in each rank: rank.py.

The group is persistent: ranks start once, load their parts, then serve requests over
pipes until closed, so a test suite pays the start-up once. Every wait has a timeout, and a
failure names the rank, its exit code or signal, and its traceback when it sent one; the
group is then torn down so that no rank is left running.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import re
import shutil
import signal
import tempfile
import time
import weakref
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch.distributed as dist

from . import shm_comm, stacks
from .config import ModelConfig
from .generate import StepHooks, check_request
from .group_spec import COMPILE_ALLOWANCE_S, DEFAULT_START_TIMEOUT_S, GroupSpec
from .rank import rank_main
from .sampling import Sampling, SequenceStreams
from .timing import GenerationResult


class RankFailure(RuntimeError):
    """A rank died, hung or raised; the message says which and why."""



def _describe_exit(proc: mp.Process) -> str:
    code = proc.exitcode
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _error_message(rank: int, what: str, payload: str) -> str:
    """A rank's exception as the parent reports it; a collective timeout leads with the rank(s)
    that hung, since the one reporting it is the healthy one."""
    last = payload.strip().splitlines()[-1] if payload.strip() else ""
    hung = re.search(r"rank\(s\) \[[\d, ]+\] did not reach collective .*", last)
    if hung:
        return f"{hung.group(0)} during '{what}' (hung or stopped?); rank {rank}'s traceback:\n{payload}"
    return f"rank {rank} failed during '{what}':\n{payload}"


class WorkerGroup:
    """A persistent local group of `world_size` ranks serving generation requests."""

    def __init__(self, spec: GroupSpec, start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        self.spec = spec
        self.start_timeout_s = start_timeout_s
        self.procs: list[mp.Process] = []
        self.conns: list[Connection] = []
        self.ready_info: list[dict] = []
        self.start_s = 0.0
        self._store = None
        self._shm_path: str | None = None
        self._progress = None
        self._stack_dir: str | None = None  # the ranks' stack dumps (stacks.py)

    def start(self) -> "WorkerGroup":
        if not Path(self.spec.shard_dir, "manifest.json").is_file():
            raise FileNotFoundError(f"{self.spec.shard_dir} has no manifest.json: not a complete shard set")
        self.spec.device.check_available(self.spec.world_size)
        self.config = ModelConfig.from_dir(Path(self.spec.shard_dir) / "part_model" / "0")
        started = time.perf_counter()
        port = 0
        if self.spec.world_size > 1:
            # The parent owns the rendezvous store on a port the OS picked: no port races
            # between two suites running at once on one machine.
            self._store = dist.TCPStore("127.0.0.1", 0, self.spec.world_size + 1, is_master=True,
                                        wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=self.spec.timeout_s))
            port = self._store.port
        try:  # (a rank that cannot be spawned, Ctrl-C while they load: the ranks and the segment go again)
            if self.spec.use_shm:
                self._shm_path = shm_comm.create_segment(self.spec.world_size)
            self._stack_dir = tempfile.mkdtemp(prefix="starcoder_tp-stacks-")
            weakref.finalize(self, shutil.rmtree, self._stack_dir, True)  # (a group never closed)
            ctx = mp.get_context("spawn")
            self._progress = ctx.Array("q", self.spec.world_size, lock=False)  # shared memory, one writer each
            for rank in range(self.spec.world_size):
                parent_end, child_end = ctx.Pipe()
                self.conns.append(parent_end)  # (closed by close(), as the process may never start)
                proc = ctx.Process(target=rank_main, args=(rank, self.spec, port, self._shm_path, child_end,
                                                              self._progress, self._stack_dir),
                                   name=f"starcoder_tp-rank{rank}", daemon=True)
                try:
                    proc.start()
                finally:
                    child_end.close()
                self.procs.append(proc)
            self.ready_info = self._collect("start", self.start_timeout_s)
        except BaseException:
            self.close(graceful=False)
            raise
        self._unlink_shm()  # every rank has it mapped: nothing is left in /dev/shm, whatever happens
        self.start_s = time.perf_counter() - started
        return self

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, ignore_eos: bool = True,
                 max_seq_len: int | None = None, topk: int = 0, hooks: tuple[StepHooks, ...] = (),
                 sampling: Sampling | None = None,
                 seeds: list[int] | None = None) -> tuple[GenerationResult, list[int]]:
        """Run one request on every rank; returns rank 0's result and each rank's peak memory.
        `hooks` (picklable) observe every step on every rank."""
        if not self.procs:
            raise RuntimeError("the worker group is not running (start() it first)")
        prompts = [list(map(int, p)) for p in prompts]
        # A bad request is refused here, naming the bad value, and the ranks keep running.
        check_request(self.config, prompts, max_new_tokens, max_seq_len)
        if sampling is not None:
            if seeds is None or len(seeds) != len(prompts):
                raise ValueError(f"sampling needs one seed per prompt: {len(prompts)} prompts, seeds {seeds!r}")
            SequenceStreams(list(seeds))  # checks every seed here, not in every rank
        request = {"prompts": prompts, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos,
                   "max_seq_len": max_seq_len, "topk": topk, "hooks": tuple(hooks),
                   "sampling": sampling, "seeds": None if seeds is None else list(seeds)}
        replies = self._request("generate", request)
        return replies[0]["result"], [r["peak_memory_bytes"] for r in replies]

    def progress(self) -> list[int]:
        """Each rank's heartbeat count (it ticks at every layer's forward, and every compiled
        decode step): a count that moves means the rank is computing a request now."""
        return list(self._progress) if self._progress is not None else []

    def _request(self, command: str, payload: dict) -> list[dict]:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((command, payload))
            except (BrokenPipeError, OSError):
                self.procs[rank].join(5)  # a rank killed a moment ago may not be reaped yet: its exit code says how
                self._fail(f"rank {rank} {_describe_exit(self.procs[rank])} before it could take the request")
        return self._collect(command, self.spec.request_timeout_s, watch_progress=True)

    def stall_timeout_s(self) -> float:
        """How long a rank may go without a layer forward during a request. With peers, longer
        than their collective timeout, so that a peer names the hung rank precisely first."""
        stall = self.spec.timeout_s * (1.5 if self.spec.world_size > 1 else 1.0)
        return stall + (COMPILE_ALLOWANCE_S if self.spec.compile else 0.0)

    def _collect(self, what: str, timeout_s: float, watch_progress: bool = False) -> list[dict]:
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        seen = list(self._progress) if self._progress is not None else []
        moved_at = [time.monotonic()] * len(seen)
        while len(replies) < len(self.procs):
            pending = {r: c for r, c in enumerate(self.conns) if r not in replies}
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                late = ", ".join(str(r) for r in pending)
                self._fail(f"rank(s) {late} did not answer '{what}' within {timeout_s:.0f}s (hung?)")
            if watch_progress and seen:
                for r in pending:
                    if self._progress[r] != seen[r]:
                        seen[r], moved_at[r] = self._progress[r], now
                stalled = [r for r in pending if now - moved_at[r] > self.stall_timeout_s()]
                if stalled:
                    self._fail(f"rank(s) {stalled} made no progress for {self.stall_timeout_s():.0f}s during "
                               f"'{what}' (hung or stopped?)")
            sentinels = {self.procs[r].sentinel: r for r in pending}
            ready = wait(list(pending.values()) + list(sentinels), timeout=min(remaining, 1.0))
            for obj in ready:
                rank = sentinels.get(obj)
                if rank is None:
                    rank = next(r for r, c in pending.items() if c is obj)
                    try:
                        status, payload = self.conns[rank].recv()
                    except (EOFError, OSError):
                        self.procs[rank].join(5)
                        self._fail(f"rank {rank} {_describe_exit(self.procs[rank])} during '{what}'")
                    if status == "error":
                        self._fail(_error_message(rank, what, payload))
                    replies[rank] = payload
                elif rank not in replies and not self.conns[rank].poll():
                    self.procs[rank].join(5)
                    self._fail(f"rank {rank} {_describe_exit(self.procs[rank])} during '{what}'")
        return [replies[r] for r in range(len(self.procs))]

    def _fail(self, message: str) -> None:
        if self._stack_dir is not None:  # where each rank still alive was: the hung one's stack names the hang
            try:
                message += stacks.ask(self._stack_dir, {r: p.pid for r, p in enumerate(self.procs) if p.is_alive()})
            except OSError as error:  # (the failure is reported, and the ranks stopped, whatever)
                message += f"\n(the ranks' stacks could not be read: {error})"
        self.close(graceful=False)
        raise RankFailure(message)

    def close(self, graceful: bool = True, timeout_s: float = 10.0) -> None:
        """Stop every rank; those that do not stop in time are killed. Safe to call twice."""
        if graceful:
            for conn in self.conns:
                try:
                    conn.send(("stop", {}))
                except (BrokenPipeError, OSError):
                    pass
            deadline = time.monotonic() + timeout_s
            for proc in self.procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        self._store = None
        self._unlink_shm()
        if self._stack_dir is not None:
            shutil.rmtree(self._stack_dir, ignore_errors=True)
            self._stack_dir = None

    def _unlink_shm(self) -> None:
        if self._shm_path is not None:
            shm_comm.remove_segment(self._shm_path)
            self._shm_path = None

    def __enter__(self) -> "WorkerGroup":
        return self.start() if not self.procs else self

    def __exit__(self, *exc) -> None:
        self.close(graceful=exc[0] is None)

