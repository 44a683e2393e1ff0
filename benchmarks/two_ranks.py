"""Stand-in ranks for the benchmarks that time the collectives themselves: processes spawned on a fresh
shared-memory segment, their replies collected with a deadline, then joined (killed at once where the run
failed, or where they linger) and the segment removed, whatever happened."""
from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable

from starcoder_tp import shm_comm

JOIN_S = 60.0  # a rank that replied and lingers past this is killed


def run_on_segment(target: Callable[..., None], args: Callable[[int, str, Any], tuple], replies: int,
                   timeout_s: float, world_size: int = 2) -> list:
    """Spawn `world_size` processes `target(*args(rank, segment_path, queue))`; return the first `replies`
    items they put on the queue, waiting at most `timeout_s` for each."""
    path = shm_comm.create_segment(world_size)
    procs: list[mp.Process] = []
    failed = True
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        for rank in range(world_size):
            procs.append(ctx.Process(target=target, args=args(rank, path, queue), daemon=True))
            procs[-1].start()
        got = [queue.get(timeout=timeout_s) for _ in range(replies)]
        failed = False
        return got
    finally:
        try:
            for proc in procs:
                if proc.pid is None:  # (never started)
                    continue
                if not failed:
                    proc.join(JOIN_S)
                if proc.is_alive():
                    proc.kill()
                proc.join(5)
        finally:
            shm_comm.remove_segment(path)
