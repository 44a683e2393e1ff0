"""False-alarm and detection rates of the regression gate, measured on this machine.

Takes a baseline (R rounds per case), then repeats the gated measurement N times unchanged
(every regression is a false alarm) and N times with a decode slowdown injected (every missed
regression is a miss), with the suite's own procedure: a case that fails is measured once more
and only a second failure counts. Run: python benchmarks/gate_reliability.py [--repetitions 20]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from starcoder_tp.build_models import EMBEDDED_MODEL_DIR
from starcoder_tp.gate import Baseline, measure_calibration, write_baseline
from starcoder_tp.perf import Case, CaseResult, PerfOptions, PerfRunner
from starcoder_tp.report import result_row


def measure(runner: PerfRunner, case: Case, rounds: int, calibration: dict) -> dict:
    result = CaseResult(case)
    for _ in range(rounds):
        runner.run_round(case, result)
    return result_row(result, world_size=runner.options.world_size, dtype=runner.options.dtype, device="cpu",
                      model="gate-reliability", commit="", calibration=calibration)


def gated(runner: PerfRunner, baseline: Baseline, case: Case, rounds: int, calibration: dict, thresholds) -> bool:
    """True when the suite would report a regression (two failing measurements in a row)."""
    for _ in range(2):
        verdicts = baseline.compare(case, measure(runner, case, rounds, calibration), thresholds, 0.05)
        if not any(v.kind == "regression" for v in verdicts):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slowdown", type=float, default=0.25, help="injected decode slowdown. Default: %(default)r")
    parser.add_argument("--out", default="results/gate_baseline.csv")
    args = parser.parse_args()
    case = Case(1, 128, 32)
    thresholds = {"first_token": 0.10, "decode": 0.10}
    options = PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), batch_sizes=(1,), seq_in=(128,), seq_out=(32,),
                          rounds=args.rounds)
    calibration = measure_calibration()
    runner = PerfRunner(options, log=lambda m: None).start()
    started = time.perf_counter()
    try:
        runner.warm_up(case.batch)
        path = write_baseline([measure(runner, case, args.rounds, calibration)], args.out)
        baseline = Baseline.load(path, world_size=2, dtype="float32", device="cpu")
        decode = statistics.median(float(x) for x in baseline.rows[case]["decode_ms_rounds"].split(";"))
        false_alarms = sum(gated(runner, baseline, case, args.rounds, calibration, thresholds)
                           for _ in range(args.repetitions))
        delay = args.slowdown * decode
        runner.options = dataclasses.replace(options, inject_decode_ms=delay)
        detections = sum(gated(runner, baseline, case, args.rounds, calibration, thresholds)
                         for _ in range(args.repetitions))
    finally:
        runner.close()
    n = args.repetitions
    print(f"case {case.id}, {args.rounds} rounds, thresholds {thresholds}, alpha 0.05, re-measure once")
    print(f"baseline decode {decode:.3f} ms/token; injected {delay:.3f} ms per step (+{args.slowdown:.0%})")
    print(f"false alarms (unchanged runs): {false_alarms}/{n} = {false_alarms / n:.0%}")
    print(f"detections (+{args.slowdown:.0%} decode):    {detections}/{n} = {detections / n:.0%}")
    print(f"wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
