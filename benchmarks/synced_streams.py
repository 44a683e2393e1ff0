"""What the ranks' meeting points cost a batch-1 decode step at world size 2, apart from our kernels.

decode_bandwidth.py found ws2's batch-1 step at 70-88% of the two-stream read bandwidth in the
VM's fast phase (its two vCPUs reading ~60 GB/s together) and 80-98% in its slow one (~32 GB/s,
one stream's rate). A step is not one stream per rank: each rank reads its share of a layer's
weights, then meets the other at the all-reduce, twice a layer, and the greedy pick's gather
ends the step. Here two processes, one a core as the ranks, read buffers of exactly the bytes each
rank reads at each of those points (torch.sum on one thread, as the bandwidth sample reads),
either back to back ("free": one meeting a step, the pick's) or meeting after each piece through
the runtime's own shared-memory all-reduce, as the ranks do ("synced"; shm_reduce.c where built).
Beside them, in the same round, the real ws2 step and a two-stream bandwidth sample to say the phase.

  synced / free: what the meetings cost on this machine with no kernel of ours involved;
  real / synced: what our kernels, attention and Python add on top of reading and meeting.

Run: python benchmarks/synced_streams.py [--model bench|bench-starcoder2|DIR] [--dtype float32] [--rounds 16]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from decode_bandwidth import CASE
from roofline import _stream_buffer, read_bandwidth_gbs
from speed import DTYPES, cpu_name, decode_bytes, write_table
from starcoder_tp import rowdot, shm_comm
from starcoder_tp.config import ModelConfig
from starcoder_tp.options import positive_int
from starcoder_tp.suite.perf import CaseResult, PerfOptions, PerfRunner
from starcoder_tp.testing.build_models import build_bench, build_bench_starcoder2

WORLD_SIZE = 2
STEPS = 31  # as a round of the case decodes (seq_out - 1)
MEET_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 120.0


def pieces(c: ModelConfig, dtype: str, world_size: int = WORLD_SIZE) -> list[int]:
    """The bytes one rank reads between two meetings of a batch-1 step, in order: per layer the
    attention's share (fused q/k/v, its K/V cache at the case's mid-output context, the output
    projection) then the MLP's; last the lm_head's rows, which the pick's gather follows."""
    size = torch.finfo(DTYPES[dtype]).bits // 8
    kv_heads, replicas = c.kv_layout(world_size)
    context = CASE.seq_in + CASE.seq_out // 2
    if c.sliding_window:
        context = min(context, c.sliding_window)
    q_rows = c.n_embd // world_size
    kv_rows = 2 * kv_heads * c.head_dim
    attention = (q_rows + kv_rows) * c.n_embd + c.n_embd * q_rows + 2 * kv_heads * context * c.head_dim
    mlp = 2 * c.n_embd * c.n_inner // world_size
    head = c.vocab_size * c.n_embd // world_size
    counts = [attention, mlp] * c.n_layer + [head]
    # (every piece a whole number of float32s, which the reading sums)
    return [-(-n * size // 4) * 4 for n in counts]


def reader(rank: int, shm_path: str, nbytes: list[int], hidden: int, dtype: str, conn) -> None:
    """One 'rank': its pieces in memory of their own; on ("free"|"synced", steps) it reads them that many
    steps, timing each, and replies with the times."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)
    comm = shm_comm.ShmComm(shm_path, rank, WORLD_SIZE, MEET_TIMEOUT_S)
    comm.use_small_reduce(rowdot.small_all_reduce())  # (as the ranks meet: shm_reduce.c where it is built)
    buffers = [_stream_buffer(n) for n in nbytes]
    partial = torch.zeros(hidden, dtype=DTYPES[dtype])  # what a row-parallel linear's all-reduce carries at batch 1
    conn.send("ready")
    while (command := conn.recv()) is not None:
        mode, steps = command
        comm.all_reduce_(partial)  # both start together
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            for buffer in buffers:
                buffer.sum()
                if mode == "synced":
                    comm.all_reduce_(partial)
            if mode == "free":
                comm.all_reduce_(partial)  # the pick's meeting, which ends every step
            times.append(time.perf_counter() - started)
        conn.send(times)


class Readers:
    def __init__(self, nbytes: list[int], hidden: int, dtype: str):
        ctx = mp.get_context("spawn")
        self.path = shm_comm.create_segment(WORLD_SIZE)
        self.conns, self.procs = [], []
        try:
            for rank in range(WORLD_SIZE):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=reader, args=(rank, self.path, nbytes, hidden, dtype, theirs), daemon=True)
                proc.start()
                theirs.close()
                self.conns.append(ours), self.procs.append(proc)
            self._replies("start")
        except BaseException:
            self.close()
            raise

    def _replies(self, what: str) -> list:
        replies = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(REPLY_TIMEOUT_S):
                raise RuntimeError(f"reader rank {rank} did not answer '{what}' within {REPLY_TIMEOUT_S:.0f}s")
            replies.append(conn.recv())
        return replies

    def step_ms(self, mode: str) -> float:
        """The median step, each step the slower reader's."""
        for conn in self.conns:
            conn.send((mode, STEPS))
        per_rank = self._replies(mode)
        return statistics.median(max(times) for times in zip(*per_rank)) * 1e3

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        shm_comm.remove_segment(self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-starcoder2",
                        help="bench, bench-starcoder2 or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="Default: %(default)r")
    parser.add_argument("--rounds", type=positive_int, default=16, help="Default: %(default)r")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < WORLD_SIZE:
        raise RuntimeError(f"this needs {WORLD_SIZE} usable cores, one a rank; this process has "
                           f"{len(os.sched_getaffinity(0))}")
    model_dir = {"bench": build_bench, "bench-starcoder2": build_bench_starcoder2}.get(args.model, lambda: args.model)()
    config = ModelConfig.from_dir(model_dir)
    nbytes = pieces(config, args.dtype)
    step_bytes = decode_bytes(config, CASE, args.dtype, WORLD_SIZE)
    # The pieces are what speed.decode_bytes counts, split by meeting (it counts a replicated K/V head's
    # weights once; both ranks read them): within 2% of it, or the split is wrong.
    assert abs(WORLD_SIZE * sum(nbytes) - step_bytes) <= 0.02 * step_bytes, (WORLD_SIZE * sum(nbytes), step_bytes)
    started = time.perf_counter()
    runner = readers = None
    lines, rows = [], []
    try:
        runner = PerfRunner(PerfOptions(model_dir=str(model_dir), world_size=WORLD_SIZE, dtype=args.dtype,
                                        batch_sizes=(1,), seq_in=(CASE.seq_in,), seq_out=(CASE.seq_out,),
                                        rounds=1, threads_per_rank=1), log=lambda m: None).start()
        runner.warm_up(CASE)
        readers = Readers(nbytes, config.n_embd, args.dtype)
        readers.step_ms("free"), readers.step_ms("synced")  # (warm-up: pages, caches)
        for i in range(args.rounds):
            gbs = read_bandwidth_gbs(WORLD_SIZE, repeats=3)  # the phase, right before the round
            measured = {}
            order = ["real", "free", "synced"]
            for what in order[i % 3:] + order[:i % 3]:  # each first in turn: the phase may move within a round
                if what == "real":
                    result = CaseResult(CASE)
                    runner.run_round(CASE, result)
                    measured[what] = result.decode_ms_percentile(50)
                else:
                    measured[what] = readers.step_ms(what)
            bound = WORLD_SIZE * sum(nbytes) / (gbs * 1e9) * 1e3
            rows.append((gbs, measured))
            lines.append(f"| {i + 1} | {time.strftime('%H:%M:%S', time.gmtime())} | {gbs:.1f} | {bound:.2f} | "
                         f"{measured['free']:.2f} | {measured['synced']:.2f} | {measured['real']:.2f} | "
                         f"{measured['synced'] / measured['free']:.2f} | {measured['real'] / measured['synced']:.2f} |")
            print(lines[-1], flush=True)
    finally:
        if readers is not None:
            readers.close()
        if runner is not None:
            runner.close()
    fast = [m for g, m in rows if g >= 45.0]
    slow = [m for g, m in rows if g < 45.0]

    def medians(ms: list[dict]) -> str:
        if not ms:
            return "no round"
        return (f"{len(ms)} round(s), synced/free {statistics.median(m['synced'] / m['free'] for m in ms):.2f}, "
                f"real/synced {statistics.median(m['real'] / m['synced'] for m in ms):.2f}")

    about = (f"Model: `{model_dir}`, {args.dtype}, batch 1, {CASE.seq_in} prompt tokens, {CASE.seq_out} new, world size "
             f"{WORLD_SIZE}, one thread a rank. Each round: the two-stream read bandwidth (best of 3; bound = a step's "
             f"bytes, {WORLD_SIZE * sum(nbytes) / 1e6:.0f} MB all ranks, / it), then in turn (each first once in three) "
             f"the real step (median of a round), `free` (two processes, one a core, each reading its rank's "
             f"{len(nbytes)} pieces back to back, one meeting a step) and `synced` (the same, meeting through "
             f"ShmComm.all_reduce_ after each piece, as a step does); each a median of {STEPS} steps, a step the "
             f"slower reader's. Fast phase (two-stream sample >= 45 GB/s): {medians(fast)}. Slow phase: "
             f"{medians(slow)}.")
    write_table(f"The ranks' meetings apart from our kernels, {args.model} {args.dtype}", "synced_streams.py",
                started, about, ["round", "UTC", "GB/s 2 streams", "bound ms", "free ms", "synced ms", "real ms",
                                 "synced/free", "real/synced"], lines)
    print(f"[synced_streams] {cpu_name()}: fast phase {medians(fast)}; slow phase {medians(slow)}")


if __name__ == "__main__":
    main()
