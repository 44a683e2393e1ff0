"""False-alarm and detection rates of the latency gate, both modes side by side, on this machine.

Each repetition is one CI run of a case, with fresh processes, in each mode:
- compare (--perf-compare-ref): a new pair of worker groups (side A: this code; side B: GITREF's
  code through serve.py); N interleaved pairs unchanged, then with decode delays injected on
  side A; verdicts as the suite gives them (paired.py, re-measured once when they regress);
- stored (--perf-baseline): one baseline taken at the start (N rounds) serves every repetition, as
  a committed baseline does; each repetition starts a new worker group and gates N rounds
  against it, re-measured once when they regress.
The injected delay is a fraction of the decode step measured in the same repetition. A gated
measurement is taken to its second stage when its first regresses at the lowest threshold (so
at any of them), so that every threshold is judged on the same rounds exactly as the gate would;
a first stage that regresses at none decides alone, as it does in the gate.
Run: python benchmarks/gate_reliability.py --repetitions 40 --rounds 40 [--ref HEAD]
A run cut off goes on with --resume (each case keeps the baseline it recorded, so the stored mode
is then judged against a baseline from before the interruption, as a committed one would be);
--retally ROUNDS_JSONL prints the tables of what was recorded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from starcoder_tp.suite import ab
from starcoder_tp.files import EMBEDDED_MODEL_DIR
from starcoder_tp.suite.gate import compare_metric
from starcoder_tp.suite.gitref import checkout_ref, working_tree
from starcoder_tp.suite.machine import describe, machine_fingerprint
from starcoder_tp.device import Device
from starcoder_tp.group_spec import default_threads
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, PerfRunner

CONDITIONS = {"A/A": 0.0, "+25%": 0.25, "+10%": 0.10}
METRICS = ("first_token", "decode")


def decode_means(result: CaseResult) -> list[float]:
    return [statistics.fmean(steps) for steps in result.decode_ms_rounds]


def per_metric(result: CaseResult) -> dict[str, list[float]]:
    return {"first_token": result.first_token_ms_rounds, "decode": decode_means(result)}


def paired_alarm(stages: list[tuple[CaseResult, CaseResult]], case: Case, metric: str, threshold: float) -> bool:
    """The compare mode's decision: stage 1 regresses, and so do the pooled pairs of both stages."""
    a1, b1 = stages[0]
    if ab.verdicts(case, a1, b1, {metric: threshold}, 0.05)[0].kind != "regression":
        return False
    assert len(stages) == 2, "a first stage that regresses is always measured again"
    pooled_a, pooled_b = CaseResult(case), CaseResult(case)
    for pooled, parts in ((pooled_a, (a1, stages[1][0])), (pooled_b, (b1, stages[1][1]))):
        for part in parts:
            pooled.extend(part)
    return ab.verdicts(case, pooled_a, pooled_b, {metric: threshold}, 0.05)[0].kind == "regression"


def stored_alarm(stages: list[CaseResult], baseline: CaseResult, metric: str, threshold: float, case: Case) -> bool:
    """The stored mode's decision: both measurements regress against the baseline (Mann-Whitney)."""
    assert len(stages) == 2 or not regresses(stages[0], baseline, metric, threshold, case), \
        "a first stage that regresses is always measured again"
    return all(regresses(s, baseline, metric, threshold, case) for s in stages)


def regresses(result: CaseResult, baseline: CaseResult, metric: str, threshold: float, case: Case) -> bool:
    return compare_metric(case, metric, per_metric(result)[metric], per_metric(baseline)[metric], threshold,
                          0.05).kind == "regression"


def run_compare(options: PerfOptions, comparison: ab.Comparison, case: Case, lowest: float) -> tuple[dict, float]:
    """One repetition: fresh groups, then every condition measured (twice when it regresses at
    the `lowest` threshold)."""
    set_up = time.perf_counter()
    runner = ab.ABRunner(options, comparison, log=lambda m: None, log_path=Path(options.results_dir) / "side_b.log")
    runner.start()
    measured, walls = {}, []
    try:
        runner.warm_up(case)
        set_up = time.perf_counter() - set_up
        delay = 0.0
        for name, fraction in CONDITIONS.items():
            a_side = runner.sides["A"]
            if fraction:
                a_side.options = dataclasses.replace(options, inject_decode_ms=fraction * delay)
            started = time.perf_counter()
            stages = [runner.rounds(case).finish()]
            walls.append(time.perf_counter() - started)  # one stage: what a passing CI run costs
            if any(v.kind == "regression" for v in ab.verdicts(case, *stages[0], dict.fromkeys(METRICS, lowest), 0.05)):
                stages.append(runner.rounds(case).finish())
            a_side.options = options
            measured[name] = stages
            if name == "A/A":
                delay = statistics.median(decode_means(stages[0][1]))
    finally:
        runner.close()
    return measured, set_up + statistics.fmean(walls)


def run_stored(options: PerfOptions, baseline: CaseResult, case: Case, lowest: float) -> tuple[dict, float]:
    set_up = time.perf_counter()
    runner = PerfRunner(options, log=lambda m: None).start()
    measured, walls = {}, []
    delay = statistics.median(decode_means(baseline))

    def measure() -> CaseResult:
        result = CaseResult(case)
        for _ in range(options.rounds):
            runner.run_round(case, result)
        return result

    try:
        runner.warm_up(case)
        set_up = time.perf_counter() - set_up
        for name, fraction in CONDITIONS.items():
            runner.options = dataclasses.replace(options, inject_decode_ms=fraction * delay)
            started = time.perf_counter()
            stages = [measure()]
            walls.append(time.perf_counter() - started)
            if any(regresses(stages[0], baseline, m, lowest, case) for m in METRICS):
                stages.append(measure())
            measured[name] = stages
        runner.options = options
    finally:
        runner.close()
    return measured, set_up + statistics.fmean(walls)


def raw(measured: dict) -> dict:
    """Each condition's stages as plain per-round figures (side -> metric -> rounds in compare mode)."""
    def one(stage):
        if isinstance(stage, tuple):
            return {side: per_metric(result) for side, result in zip("AB", stage)}
        return per_metric(stage)
    return {name: [one(stage) for stage in stages] for name, stages in measured.items()}


def tally(records: list[dict], alarm, thresholds: list[float]) -> dict[float, dict[str, int]]:
    """Per threshold: A/A runs with any metric alarmed, injected runs with decode alarmed."""
    out = {}
    for t in thresholds:
        out[t] = {"A/A": sum(any(alarm(r["A/A"], m, t) for m in METRICS) for r in records),
                  "+25%": sum(alarm(r["+25%"], "decode", t) for r in records),
                  "+10%": sum(alarm(r["+10%"], "decode", t) for r in records)}
    return out


def table(case: Case, records: dict[str, list[dict]], walls: dict[str, list[float]], baseline: CaseResult | None,
          thresholds: list[float]) -> str:
    """One case's markdown table: per mode and threshold, the alarms out of the repetitions run."""
    lines = [f"\n{case.id}:", ""]
    lines.append("| mode | threshold | A/A false alarms | +25% decode caught | +10% decode caught | wall s per CI run (start, warm-up, one stage) |")
    lines.append("|---|---|---|---|---|---|")
    for mode, mode_records in records.items():
        if mode == "compare":
            alarm = lambda stages, m, t: paired_alarm(stages, case, m, t)  # noqa: E731
        else:
            alarm = lambda stages, m, t: stored_alarm(stages, baseline, m, t, case)  # noqa: E731
        counts = tally(mode_records, alarm, thresholds)
        n = len(mode_records)
        for t in thresholds:
            c = counts[t]
            lines.append(f"| {mode} | {t:.0%} | {c['A/A']}/{n} | {c['+25%']}/{n} | {c['+10%']}/{n} | "
                         f"{statistics.fmean(walls[mode]):.1f} |")
        ok = [t for t in thresholds if counts[t]["A/A"] <= n // 40]
        if ok:
            low = min(ok)
            lines.append(f"| {mode}: lowest threshold with A/A <= {n // 40}/{n} | {low:.0%} | "
                         f"{counts[low]['A/A']}/{n} | {counts[low]['+25%']}/{n} | {counts[low]['+10%']}/{n} | |")
    return "\n".join(lines)


def from_raw(case: Case, figures: dict[str, list[float]]) -> CaseResult:
    """A CaseResult holding what raw() kept: each round's first token and mean decode step."""
    return CaseResult(case, first_token_ms_rounds=list(figures["first_token"]),
                      decode_ms_rounds=[[d] for d in figures["decode"]])


def parse_case(text: str) -> Case:
    b, i, o = text.removeprefix("bs").replace("-in", " ").replace("-out", " ").split()
    return Case(int(b), int(i), int(o))


def load_rounds(path: Path) -> dict[str, dict]:
    """A rounds.jsonl read back, per case: the last baseline recorded and the repetitions after
    it, as records and walls per mode."""
    cases: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        case = parse_case(entry["case"])
        if "baseline" in entry:
            cases[entry["case"]] = {"case": case, "baseline": from_raw(case, entry["baseline"]),
                                    "records": {}, "walls": {}}
            continue
        state = cases.setdefault(entry["case"], {"case": case, "baseline": None, "records": {}, "walls": {}})
        stages = {name: [tuple(from_raw(case, stage[side]) for side in "AB") if "A" in stage else from_raw(case, stage)
                         for stage in condition] for name, condition in entry["conditions"].items()}
        state["records"].setdefault(entry["mode"], []).append(stages)
        state["walls"].setdefault(entry["mode"], []).append(entry["wall_s"])
    return cases


def retally(path: Path, thresholds: list[float]) -> None:
    """The tables again from a rounds.jsonl (a run cut off keeps every repetition it ended)."""
    for state in load_rounds(path).values():
        print(table(state["case"], state["records"], state["walls"], state["baseline"], thresholds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=40, help="rounds per case (pairs in compare mode). Default: %(default)r")
    parser.add_argument("--cases", default="bs1-in128-out32,bs4-in64-out64")
    parser.add_argument("--thresholds", default="0.10,0.07,0.05,0.04,0.03")
    parser.add_argument("--modes", default="compare,stored")
    parser.add_argument("--ref", default="HEAD", help="side B of the compare mode. Default: %(default)r")
    parser.add_argument("--results-dir", default="results/gate_reliability",
                        help="side B's log, and rounds.jsonl: every repetition's rounds, appended as it ends. "
                             "Default: %(default)r")
    parser.add_argument("--retally", type=Path, metavar="ROUNDS_JSONL",
                        help="print the tables from a rounds.jsonl instead of measuring. Default: %(default)r")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the results dir's rounds.jsonl: each case keeps its recorded baseline and "
                             "repetitions and runs the ones missing up to --repetitions. Default: %(default)r")
    args = parser.parse_args()
    if args.retally:
        retally(args.retally, [float(t) for t in args.thresholds.split(",")])
        return
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    rounds_log = open(Path(args.results_dir) / "rounds.jsonl", "a")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    modes = args.modes.split(",")
    cases = [parse_case(text) for text in args.cases.split(",")]
    recorded = load_rounds(Path(args.results_dir) / "rounds.jsonl") if args.resume else {}
    comparison = ab.Comparison(working_tree(), checkout_ref(args.ref)) if "compare" in modes else None
    fingerprint = machine_fingerprint(Device("cpu"), default_threads(2))
    started = time.perf_counter()
    print(f"Machine: {describe(fingerprint)}; CPU flags: {fingerprint['cpu_isa']}\n"
          f"{args.repetitions} repetitions, {args.rounds} rounds (pairs), alpha 0.05, re-measured once on a regression"
          + (f"; compare: {comparison.describe()}" if comparison else ""), flush=True)
    for case in cases:
        options = PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), batch_sizes=(case.batch,), seq_in=(case.seq_in,),
                              seq_out=(case.seq_out,), rounds=args.rounds, results_dir=args.results_dir)
        state = recorded.get(case.id)
        baseline = state["baseline"] if state else None
        if "stored" in modes and baseline is None:
            runner = PerfRunner(options, log=lambda m: None).start()
            try:
                runner.warm_up(case)
                baseline = CaseResult(case)
                for _ in range(args.rounds):
                    runner.run_round(case, baseline)
            finally:
                runner.close()
            print(json.dumps({"case": case.id, "baseline": per_metric(baseline)}), file=rounds_log, flush=True)
        records = {mode: list(state["records"].get(mode, [])) if state else [] for mode in modes}
        walls = {mode: list(state["walls"].get(mode, [])) if state else [] for mode in modes}
        done = min(len(r) for r in records.values())
        if any(len(r) != done for r in records.values()):
            raise SystemExit(f"--resume: {case.id} has {[len(r) for r in records.values()]} repetitions recorded "
                             f"per mode {modes}; they must be equal")
        if done:
            print(f"[gate_reliability] {case.id}: {done} repetition(s) recorded, resuming", file=sys.stderr, flush=True)
        for rep in range(done, args.repetitions):
            for mode in modes:
                if mode == "compare":
                    measured, wall = run_compare(options, comparison, case, min(thresholds))
                else:
                    measured, wall = run_stored(options, baseline, case, min(thresholds))
                records[mode].append(measured)
                walls[mode].append(wall)
                print(json.dumps({"case": case.id, "mode": mode, "repetition": rep, "wall_s": wall,
                                  "conditions": raw(measured)}), file=rounds_log, flush=True)
            print(f"[gate_reliability] {case.id}: repetition {rep + 1}/{args.repetitions} "
                  f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
        # Each case's table is printed when the case is done: a run cut off later keeps it.
        print(table(case, records, walls, baseline, thresholds), flush=True)
    print(f"\nwall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
