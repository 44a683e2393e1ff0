"""Batch-1 decode at world size 1 and 2 against the read bandwidth sampled right before each round.

speed.py's bound takes the best bandwidth sample of its whole run. On a VM whose two vCPUs read
at one stream's rate in some phases and twice that in others, ws2's efficiency against that best
sample swings by half with the phase, whatever the code does. Here each round of decode steps
follows its own one- and two-stream samples, so each step time is set against the bandwidth the
machine gave just then: the efficiency that is the code's, and the phases that are the machine's.

Run: python benchmarks/decode_bandwidth.py [--model bench|bench-starcoder2|DIR] [--dtype float32] [--rounds 12]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

from roofline import read_bandwidth_gbs
from speed import cpu_name, decode_bytes, write_table
from starcoder_tp.config import ModelConfig
from starcoder_tp.options import positive_int
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, PerfRunner
from starcoder_tp.testing.build_models import build_bench, build_bench_starcoder2

CASE = Case(1, 128, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench, bench-starcoder2 or a checkpoint directory. "
                        "Default: %(default)r")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="Default: %(default)r")
    parser.add_argument("--rounds", type=positive_int, default=12, help="Default: %(default)r")
    args = parser.parse_args()
    model_dir = {"bench": build_bench, "bench-starcoder2": build_bench_starcoder2}.get(args.model, lambda: args.model)()
    config = ModelConfig.from_dir(model_dir)
    started = time.perf_counter()
    runners = {ws: PerfRunner(PerfOptions(model_dir=str(model_dir), world_size=ws, dtype=args.dtype, batch_sizes=(1,),
                                          seq_in=(CASE.seq_in,), seq_out=(CASE.seq_out,), rounds=1, threads_per_rank=1),
                              log=lambda m: None).start()
               for ws in (1, 2)}
    lines, eff = [], {1: [], 2: []}
    try:
        for runner in runners.values():
            runner.warm_up(CASE)
        for i in range(args.rounds):
            gbs = {1: read_bandwidth_gbs(1, repeats=3), 2: read_bandwidth_gbs(2, repeats=3)}
            cells = [f"{i + 1}", time.strftime("%H:%M:%S", time.gmtime()), f"{gbs[1]:.1f}", f"{gbs[2]:.1f}"]
            for ws, runner in runners.items():
                result = CaseResult(CASE)
                runner.run_round(CASE, result)
                ms = result.decode_ms_percentile(50)
                bound_ms = decode_bytes(config, CASE, args.dtype, ws) / (gbs[ws] * 1e9) * 1e3
                eff[ws].append(bound_ms / ms)
                cells += [f"{ms:.2f}", f"{bound_ms / ms:.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    finally:
        for runner in runners.values():
            runner.close()
    about = (f"Model: `{model_dir}`, {args.dtype}, batch 1, {CASE.seq_in} prompt tokens, {CASE.seq_out} new; "
             "ws1 one rank, ws2 two, one thread each. Each round: read bandwidth with 1 and 2 streams (the best of "
             "3), then one round at ws1 and one at ws2; decode = the round's median step; eff = bytes a step reads "
             "(speed.decode_bytes) / that round's bandwidth (1 stream for ws1, 2 for ws2) / the step. Median eff: "
             f"ws1 {statistics.median(eff[1]):.0%}, ws2 {statistics.median(eff[2]):.0%}.")
    write_table(f"Batch-1 decode against the bandwidth sampled beside it, {args.model} {args.dtype}",
                "decode_bandwidth.py", started, about,
                ["round", "UTC", "GB/s 1 stream", "GB/s 2 streams", "ws1 ms", "ws1 eff", "ws2 ms", "ws2 eff"], lines)
    print(f"[decode_bandwidth] {cpu_name()}: median eff ws1 {statistics.median(eff[1]):.0%}, "
          f"ws2 {statistics.median(eff[2]):.0%}")


if __name__ == "__main__":
    main()
