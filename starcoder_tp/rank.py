"""What runs inside a rank of the local worker group: start, load its part, then serve the
parent's requests over a pipe until told to stop (the parent's side: parallel.py)."""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from . import lifeline, rowdot, shm_comm, stacks
from .comm import TPGroup
from .generate import StepHooks
from .group_spec import GroupSpec, configure_threads
from .malloc import as_a_cpu_rank
from .model import load_model
from .timing import timed_generate


class Heartbeat(StepHooks):
    """A rank's tick count in memory the parent reads: one tick per layer forward (a long
    prefill still ticks) and one per step (a compiled or fused step runs no layer hooks), so that a rank
    that stops computing is caught even where no peer waits on it (world size 1)."""

    def __init__(self, progress, rank: int):
        self.progress, self.rank = progress, rank

    def tick(self, *_) -> None:
        if not torch.compiler.is_compiling():  # traced into a compiled step: nothing to record
            self.progress[self.rank] += 1

    def step_end(self, step: int) -> None:
        self.tick()


def release_shared_objects() -> None:
    """Run multiprocessing's own finalizers, as an interpreter's normal exit would: a rank exits by
    os._exit, and a semaphore made in it (tqdm's lock, in a rank that compiles) stayed registered
    with the parent's resource tracker, which reported it leaked when the parent exited."""
    import multiprocessing.util

    multiprocessing.util._run_finalizers(0)  # (exit priority >= 0: the semaphores' unlink and unregister)


def rank_main(rank: int, spec: GroupSpec, store_port: int, shm_path: str | None, conn: Connection,
              progress, stack_dir: str) -> None:
    """A rank of a local worker group: start, load, then serve requests until told to stop."""
    exit_code = 0
    try:
        started = time.perf_counter()
        # A parent killed mid-request leaves no rank computing, nor a semaphore for its tracker to call leaked.
        lifeline.exit_with_parent(f"starcoder_tp rank {rank}", on_exit=release_shared_objects)
        stacks.arm(stack_dir, rank)  # where it was, if the parent asks (the group failed)
        # Before the model loads: torch's first large block.
        allocator, pages = as_a_cpu_rank() if spec.device.kind == "cpu" else ("system", "")
        configure_threads(rank, spec)
        torch_device = spec.device.bind(rank)
        if spec.world_size > 1:
            store = dist.TCPStore("127.0.0.1", store_port, spec.world_size + 1, is_master=False,
                                  timeout=datetime.timedelta(seconds=spec.timeout_s))
            dist.init_process_group(spec.device.backend, store=store, rank=rank, world_size=spec.world_size,
                                    timeout=datetime.timedelta(seconds=spec.timeout_s))
        shm = shm_comm.ShmComm(shm_path, rank, spec.world_size, spec.timeout_s) if shm_path else None
        if shm is not None:  # (our kernels' library built first: its stream_copy and small all-reduce)
            shm.use_stream_copy(rowdot.stream_copy())
            shm.use_small_reduce(rowdot.small_all_reduce())
        tp = TPGroup(rank, spec.world_size, shm)
        model = load_model(spec.shard_dir, tp, torch_device, kernels=spec.kernels, compile=spec.compile)
        if spec.device.kind == "cpu":
            # Our kernels' library is built (seconds, once per machine) here, not in the first request,
            # where the build held the heartbeat still long enough to be taken for a hang.
            rowdot.library()
        heartbeat = Heartbeat(progress, rank)
        model.progress_hooks.append(heartbeat.tick)  # measuring and laying out the kernels of a new request
        for block in model.transformer.h:
            block.register_forward_pre_hook(heartbeat.tick)
        conn.send(("ready", {"load_s": time.perf_counter() - started, "pid": os.getpid(),
                             "packed_weights": sum(1 for _ in model.packed_weights()),
                             "kernels": model.kernels_summary(), "allocator": allocator, "pages": pages,
                             "compiled": model.compiled_decode is not None}))
        while True:
            command, kwargs = conn.recv()
            if command == "stop":
                break
            if command != "generate":
                raise ValueError(f"unknown command {command!r}")
            spec.device.reset_peak_memory()
            kwargs["hooks"] = (*kwargs.get("hooks", ()), heartbeat)
            result = timed_generate(model, spec.device, **kwargs)
            reply = {"peak_memory_bytes": spec.device.peak_memory_bytes()}
            if rank == 0:
                reply["result"] = result
            conn.send(("ok", reply))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # the parent went away or asked us to stop: nothing to report to
    except BaseException:
        exit_code = 1
        try:
            conn.send(("error", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            traceback.print_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        release_shared_objects()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(exit_code)  # skip the interpreter's slow teardown of torch; nothing is left to flush
