"""Does the --compile gain depend on where the model runs? Eager and compiled decode steps at
world size 1, both in rank processes (the perf suite's runner, pinned, one thread) and in this
process, measured round-robin in one run on the bench-size model, fp32.

Run: python benchmarks/compile_where.py [--batch 1] [--repetitions 3]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from starcoder_tp.testing.build_models import build_bench
from starcoder_tp.malloc import as_a_cpu_rank
from starcoder_tp.device import Device
from starcoder_tp.model import load_model
from starcoder_tp.timing import timed_generate
from starcoder_tp.comm import TPGroup
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, PerfRunner, make_prompts
from starcoder_tp.shard import ensure_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="Default: %(default)r")
    parser.add_argument("--repetitions", type=int, default=3, help="rounds of each variant. Default: %(default)r")
    args = parser.parse_args()
    if args.batch < 1 or args.repetitions < 1:
        raise SystemExit(f"--batch and --repetitions must be >= 1, got {args.batch}, {args.repetitions}")
    as_a_cpu_rank()  # allocator and 2 MiB pages as a rank's, before the first large block
    torch.set_num_threads(1)
    bench = str(build_bench())
    case = Case(args.batch, 128, 32)

    def options(compile: bool) -> PerfOptions:
        return PerfOptions(model_dir=bench, world_size=1, batch_sizes=(case.batch,), seq_in=(case.seq_in,),
                           seq_out=(case.seq_out,), threads_per_rank=1, kernels="plain" if compile else "auto", compile=compile)

    ranks = {"rank eager": PerfRunner(options(False), log=lambda m: None).start(),
             "rank compiled": PerfRunner(options(True), log=lambda m: None).start()}
    try:
        for runner in ranks.values():
            runner.warm_up(case)  # compiles the compiled one
        shard = ensure_shards(bench, 1, "float32")
        local = {"process eager": load_model(shard, TPGroup(0, 1), torch.device("cpu")),
                 "process compiled": load_model(shard, TPGroup(0, 1), torch.device("cpu"), compile=True)}
        prompts = make_prompts(case, local["process eager"].config.vocab_size)
        for model in local.values():
            timed_generate(model, Device("cpu"), prompts, 4)
        decode: dict[str, list[float]] = {name: [] for name in [*ranks, *local]}
        for _ in range(args.repetitions):  # round-robin: the machine's drift hits every variant alike
            for name, runner in ranks.items():
                result = CaseResult(case)
                runner.run_round(case, result)
                decode[name] += result.decode_ms_rounds[0]
            for name, model in local.items():
                decode[name] += timed_generate(model, Device("cpu"), prompts, case.seq_out).decode_ms
    finally:
        for runner in ranks.values():
            runner.close()
    median = {name: statistics.median(times) for name, times in decode.items()}
    print(f"{case.id}, median decode ms: " + ", ".join(f"{name} {ms:.2f}" for name, ms in median.items()))
    print(f"compiled/eager: in rank processes {median['rank compiled'] / median['rank eager']:.2f}, "
          f"in one process {median['process compiled'] / median['process eager']:.2f}")


if __name__ == "__main__":
    main()
