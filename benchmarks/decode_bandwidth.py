"""Batch-1 decode at world size 1 and 2 against the read bandwidth sampled right before each round.

speed.py's bound takes the best bandwidth sample of its whole run. On a VM whose two vCPUs read
at one stream's rate in some phases and twice that in others, ws2's efficiency against that best
sample swings by half with the phase, whatever the code does. Here each round of decode steps
follows its own bandwidth sample (one stream before ws1's, two before ws2's), so each step time
is set against the bandwidth the machine gave just then: the efficiency that is the code's, and
the phases that are the machine's.

Run: python benchmarks/decode_bandwidth.py [--model bench|bench-starcoder2|embedded|DIR] [--dtype float32] [--rounds 16]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

from roofline import read_bandwidth_gbs
from speed import cpu_name, decode_bytes, write_table
from starcoder_tp.config import ModelConfig
from starcoder_tp.files import EMBEDDED_MODEL_DIR
from starcoder_tp.options import positive_int
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, PerfRunner
from starcoder_tp.testing.build_models import build_bench, build_bench_starcoder2

CASE = Case(1, 128, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench, bench-starcoder2, embedded or a checkpoint directory. "
                        "Default: %(default)r")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="Default: %(default)r")
    parser.add_argument("--rounds", type=positive_int, default=16, help="Default: %(default)r")
    args = parser.parse_args()
    model_dir = {"bench": build_bench, "bench-starcoder2": build_bench_starcoder2,
                 "embedded": lambda: EMBEDDED_MODEL_DIR}.get(args.model, lambda: args.model)()
    config = ModelConfig.from_dir(model_dir)
    started = time.perf_counter()
    runners: dict[int, PerfRunner] = {}
    lines, eff = [], {1: [], 2: []}
    try:
        for ws in (1, 2):  # (inside the try: a rank group that started is closed if the next one fails)
            runners[ws] = PerfRunner(PerfOptions(model_dir=str(model_dir), world_size=ws, dtype=args.dtype,
                                                 batch_sizes=(1,), seq_in=(CASE.seq_in,), seq_out=(CASE.seq_out,),
                                                 rounds=1, threads_per_rank=1), log=lambda m: None).start()
        for runner in runners.values():
            runner.warm_up(CASE)
        for i in range(args.rounds):
            cells = [f"{i + 1}", time.strftime("%H:%M:%S", time.gmtime())]
            for ws, runner in runners.items():
                # Sampled right before this world size's round: the VM changes phase within seconds.
                gbs = read_bandwidth_gbs(ws, repeats=3)
                result = CaseResult(CASE)
                runner.run_round(CASE, result)
                ms = result.decode_ms_percentile(50)
                bound_ms = decode_bytes(config, CASE, args.dtype, ws) / (gbs * 1e9) * 1e3
                eff[ws].append(bound_ms / ms)
                cells += [f"{gbs:.1f}", f"{ms:.2f}", f"{bound_ms / ms:.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    finally:
        for runner in runners.values():
            runner.close()
    about = (f"Model: `{model_dir}`, {args.dtype}, batch 1, {CASE.seq_in} prompt tokens, {CASE.seq_out} new; "
             "ws1 one rank, ws2 two, one thread each. Each round: the read bandwidth with 1 stream (the best of 3) "
             "and a round at ws1, then with 2 streams and a round at ws2; decode = the round's median step; eff = "
             "bytes a step reads, all ranks (speed.decode_bytes) / the bandwidth sampled before it / the step. "
             "Median eff: "
             f"ws1 {statistics.median(eff[1]):.0%}, ws2 {statistics.median(eff[2]):.0%}.")
    write_table(f"Batch-1 decode against the bandwidth sampled beside it, {args.model} {args.dtype}",
                "decode_bandwidth.py", started, about,
                ["round", "UTC", "GB/s 1 stream", "ws1 ms", "ws1 eff", "GB/s 2 streams", "ws2 ms", "ws2 eff"], lines)
    print(f"[decode_bandwidth] {cpu_name()}: median eff ws1 {statistics.median(eff[1]):.0%}, "
          f"ws2 {statistics.median(eff[2]):.0%}")


if __name__ == "__main__":
    main()
