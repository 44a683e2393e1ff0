"""Does the machine-speed calibration track this machine's own speed phases?

`--perf-normalize` scales latencies by the calibration (memory bandwidth for decode, matmul
throughput for the first token) so that a baseline from another machine of the same kind stays
meaningful. This script checks whether the same trick would also cancel the drift WITHIN one
machine (the false alarms of the gate on shared VMs): it alternates a calibration and one round
of a perf case, N times, and prints the rank correlation of each metric with 1/calibration and
the rounds' coefficient of variation before and after scaling. If scaling does not shrink the
spread, normalising cannot make the gate steadier here.

Run: python benchmarks/calibration_tracking.py [--pairs 80]
"""
from __future__ import annotations

import argparse
import statistics
import time

from scipy.stats import spearmanr

from starcoder_tp.files import EMBEDDED_MODEL_DIR
from starcoder_tp.suite.gate import measure_calibration
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, PerfRunner


def spread(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=80, help="(calibration, round) pairs. Default: %(default)r")
    args = parser.parse_args()
    if args.pairs < 10:
        raise SystemExit(f"--pairs must be >= 10 for a correlation, got {args.pairs}")
    case = Case(1, 128, 32)
    options = PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), batch_sizes=(1,), seq_in=(128,), seq_out=(32,))
    runner = PerfRunner(options, log=lambda m: None).start()
    bandwidth, matmul, first, decode = [], [], [], []
    started = time.perf_counter()
    try:
        runner.warm_up(case)
        for _ in range(args.pairs):
            calibration = measure_calibration(samples=1)
            result = CaseResult(case)
            runner.run_round(case, result)
            bandwidth.append(calibration["calib_bandwidth_gbs"])
            matmul.append(calibration["calib_matmul_gflops"])
            first.append(result.first_token_ms_rounds[0])
            decode.append(statistics.fmean(result.decode_ms_rounds[0]))
    finally:
        runner.close()
    print(f"{args.pairs} (calibration, {case.id} round) pairs in {time.perf_counter() - started:.0f} s, "
          f"embedded model, world size 2")
    for metric, times, calib, unit in (("decode", decode, bandwidth, "GB/s"), ("first token", first, matmul, "GFLOP/s")):
        rho, p = spearmanr(times, [1 / c for c in calib])
        scaled = [t * c for t, c in zip(times, calib)]
        print(f"{metric}: {min(times):.2f}-{max(times):.2f} ms, calibration {min(calib):.1f}-{max(calib):.1f} {unit}; "
              f"Spearman rho with 1/calibration {rho:+.2f} (p={p:.2g}); coefficient of variation "
              f"{spread(times):.3f} raw -> {spread(scaled):.3f} normalised")


if __name__ == "__main__":
    main()
