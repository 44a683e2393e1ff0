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
    return result_row(result, world_size=runner.options.world_size, dtype=runner.options.dtype, device=runner.options.device,
                      model_shape=runner.options.config.shape_id, runtime_mode=runner.options.runtime_mode,
                      model="gate-reliability", commit="", calibration=calibration)


def gated(runner: PerfRunner, baseline: Baseline, case: Case, rounds: int, calibration: dict, thresholds) -> set[str]:
    """The metrics the suite would report as regressed (two failing measurements in a row)."""
    failing = set(thresholds)
    for _ in range(2):
        verdicts = baseline.compare(case, measure(runner, case, rounds, calibration), thresholds, 0.05)
        failing &= {v.metric for v in verdicts if v.kind == "regression"}
        if not failing:
            break
    return failing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slowdown", type=float, default=0.25,
                        help="injected slowdown of the metric, as a fraction of its baseline. Default: %(default)r")
    parser.add_argument("--metric", choices=["decode", "first_token", "both"], default="both",
                        help="which metric to slow down. Default: %(default)r")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="the gate's threshold for both metrics. Default: %(default)r")
    parser.add_argument("--fresh-baseline", action="store_true",
                        help="re-take the baseline just before every repetition, as the CI tests do (otherwise one "
                             "baseline serves all repetitions, and the machine's drift over minutes adds up). "
                             "Default: %(default)r")
    parser.add_argument("--out", default="results/gate_baseline.csv")
    args = parser.parse_args()
    case = Case(1, 128, 32)
    thresholds = {"first_token": args.threshold, "decode": args.threshold}
    options = PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), batch_sizes=(1,), seq_in=(128,), seq_out=(32,),
                          rounds=args.rounds)
    metrics = ["decode", "first_token"] if args.metric == "both" else [args.metric]
    calibration = measure_calibration()
    runner = PerfRunner(options, log=lambda m: None).start()
    started = time.perf_counter()
    n = args.repetitions
    lines = []
    try:
        runner.warm_up(case)

        def take_baseline() -> Baseline:
            saved = runner.options
            runner.options = options  # never with an injection
            path = write_baseline([measure(runner, case, args.rounds, calibration)], args.out)
            runner.options = saved
            return Baseline.load(path, world_size=options.world_size, dtype=options.dtype, device=options.device,
                                 runtime_mode=options.runtime_mode, model_shape=options.config.shape_id)

        baseline = take_baseline()
        medians = {m: statistics.median(float(x) for x in baseline.rows[case][f"{m}_ms_rounds"].split(";"))
                   for m in ("first_token", "decode")}

        def current() -> Baseline:
            return take_baseline() if args.fresh_baseline else baseline

        alarms = [gated(runner, current(), case, args.rounds, calibration, thresholds) for _ in range(n)]
        false_alarms = sum(bool(a) for a in alarms)
        by_metric = ", ".join(f"{m} {sum(m in a for a in alarms)}" for m in thresholds)
        lines.append(f"false alarms (unchanged runs): {false_alarms}/{n} = {false_alarms / n:.0%} ({by_metric})")
        for metric in metrics:
            delay = args.slowdown * medians[metric]
            inject = {"inject_decode_ms" if metric == "decode" else "inject_prefill_ms": delay}
            runner.options = dataclasses.replace(options, **inject)
            detections = sum(bool(gated(runner, current(), case, args.rounds, calibration, {metric: thresholds[metric]}))
                             for _ in range(n))
            lines.append(f"detections, {metric} +{args.slowdown:.0%} (+{delay:.3f} ms): {detections}/{n} = "
                         f"{detections / n:.0%}")
    finally:
        runner.close()
    print(f"case {case.id}, {args.rounds} rounds, thresholds {thresholds}, alpha 0.05, re-measure once, "
          f"{'a fresh baseline before every repetition' if args.fresh_baseline else 'one baseline for all'}")
    print(f"baseline medians: first token {medians['first_token']:.3f} ms, decode {medians['decode']:.3f} ms/token")
    for line in lines:
        print(line)
    print(f"wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
