"""The small all-reduce in one call of shm_reduce.c against the same all-reduce in Python, side by side.

1. Lockstep: two processes, one a core, all-reduce a [1, 1, E] tensor (a batch-1 decode step's partial)
   thousands of times each way, fp32 and bf16; µs per all-reduce, the least of 3 runs of each way.
2. The step: two ws2 worker groups on the model, one with STARCODER_TP_SHM_SMALL=1 (the default), one
   with =0, their rounds interleaved (each way first in turn), a two-stream bandwidth sample before each
   pair to say the VM's phase; the ratio of the median decode steps, pair by pair.

Run: python benchmarks/small_all_reduce.py [--model bench-starcoder2] [--dtype bfloat16] [--case 1:128:32] [--pairs 40]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from roofline import read_bandwidth_gbs
from speed import DTYPES, write_table
from two_ranks import run_on_segment
from starcoder_tp import rowdot, shm_comm
from starcoder_tp.config import ModelConfig
from starcoder_tp.options import positive_int
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, PerfRunner
from starcoder_tp.testing.build_models import build_bench, build_bench_starcoder2

CALLS = 5000
FAST_PHASE_GBS = 45.0  # two streams at or above: the vCPUs on two cores (decode_bandwidth.py's split)


def lockstep(rank: int, path: str, hidden: int, replies) -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    torch.set_num_threads(1)
    comm = shm_comm.ShmComm(path, rank, 2, timeout_s=60)
    us = {}
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.zeros(1, 1, hidden, dtype=dtype)  # (its sum stays zero: nothing to reset between calls)
        for way in ("python", "C") * 3:
            comm.use_small_reduce(rowdot.small_all_reduce() if way == "C" else None)
            comm.all_reduce_(t)
            started = time.perf_counter()
            for _ in range(CALLS):
                comm.all_reduce_(t)
            key = f"{str(dtype)[6:]} {way}"
            us[key] = min(us.get(key, float("inf")), (time.perf_counter() - started) / CALLS * 1e6)
    replies.put((rank, us))


def lockstep_us(hidden: int) -> dict[str, float]:
    """µs per all-reduce, the slower rank's, per dtype and way."""
    got = dict(run_on_segment(lockstep, lambda rank, path, replies: (rank, path, hidden, replies), replies=2,
                              timeout_s=300))
    return {key: max(got[0][key], got[1][key]) for key in got[0]}


def runner(model_dir: str, dtype: str, case: Case, small: str) -> PerfRunner:
    os.environ[shm_comm.SMALL_ENV] = small  # (read by the ranks as they start)
    try:
        started = PerfRunner(PerfOptions(model_dir=model_dir, world_size=2, dtype=dtype, batch_sizes=(case.batch,),
                                         seq_in=(case.seq_in,), seq_out=(case.seq_out,), rounds=1,
                                         threads_per_rank=1), log=lambda m: None).start()
    finally:
        del os.environ[shm_comm.SMALL_ENV]
    started.warm_up(case)
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-starcoder2",
                        help="bench, bench-starcoder2 or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="Default: %(default)r")
    parser.add_argument("--case", default="1:128:32", help="batch:seq_in:seq_out. Default: %(default)r")
    parser.add_argument("--pairs", type=positive_int, default=40, help="Default: %(default)r")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise RuntimeError(f"this needs 2 usable cores, one a rank; this process has {len(os.sched_getaffinity(0))}")
    if rowdot.small_all_reduce() is None:
        raise RuntimeError(f"shm_reduce.c is not built here: {rowdot.library()[1]}")
    try:
        case = Case(*(int(v) for v in args.case.split(":")))
    except (TypeError, ValueError):
        raise ValueError(f"--case {args.case!r}: expected batch:seq_in:seq_out, e.g. 1:128:32") from None
    model_dir = str({"bench": build_bench, "bench-starcoder2": build_bench_starcoder2}.get(args.model,
                                                                                           lambda: args.model)())
    hidden = ModelConfig.from_dir(model_dir).n_embd
    started = time.perf_counter()
    us = lockstep_us(hidden)
    runners: dict[str, PerfRunner] = {}
    lines, pairs = [], []
    try:
        for way, small in (("C", "1"), ("python", "0")):
            runners[way] = runner(model_dir, args.dtype, case, small)
        for i in range(args.pairs):
            gbs = read_bandwidth_gbs(2, repeats=2)
            ms = {}
            for way in (("C", "python") if i % 2 == 0 else ("python", "C")):
                result = CaseResult(case)
                runners[way].run_round(case, result)
                ms[way] = result.decode_ms_percentile(50)
            pairs.append((gbs, ms["C"] / ms["python"], ms["python"] - ms["C"]))
            lines.append(f"| {i + 1} | {time.strftime('%H:%M:%S', time.gmtime())} | {gbs:.1f} | {ms['C']:.2f} | "
                         f"{ms['python']:.2f} | {ms['C'] / ms['python']:.3f} |")
            print(lines[-1], flush=True)
    finally:
        for r in runners.values():
            r.close()

    def summary(rows: list[tuple[float, float, float]]) -> str:
        if not rows:
            return "no pair"
        return (f"{len(rows)} pair(s), C/python median {statistics.median(r for _, r, _ in rows):.3f} "
                f"({min(r for _, r, _ in rows):.3f}-{max(r for _, r, _ in rows):.3f}), "
                f"{statistics.median(d for _, _, d in rows):.2f} ms a step less")
    fast = [p for p in pairs if p[0] >= FAST_PHASE_GBS]
    slow = [p for p in pairs if p[0] < FAST_PHASE_GBS]
    about = (f"Lockstep, two processes, [1, 1, {hidden}], µs per all-reduce (least of 3 runs of {CALLS}, the slower "
             "rank's): " + ", ".join(f"{key} {value:.1f}" for key, value in us.items()) + ". "
             f"The step: `{model_dir}`, {args.dtype}, {case.batch} x {case.seq_in} + {case.seq_out}, world size 2, one "
             "thread a rank; two worker groups (shm_reduce.c, and STARCODER_TP_SHM_SMALL=0), rounds interleaved, each "
             "way first in turn; decode = a round's median step. All pairs: "
             f"{summary(pairs)}. Two-stream sample >= {FAST_PHASE_GBS:.0f} GB/s (the vCPUs on two cores): "
             f"{summary(fast)}; below: {summary(slow)}.")
    write_table(f"The small all-reduce in one call, {args.model} {args.dtype} {args.case}", "small_all_reduce.py",
                started, about, ["pair", "UTC", "GB/s 2 streams", "C ms", "python ms", "C/python"], lines)


if __name__ == "__main__":
    main()
