"""One pytest session of the perf suite: its state, each case measured, recorded and gated
(against GITREF's code in the same session, or a stored baseline), and the summary at the end.
The plugin (pytest_plugin.py) builds the state from the options and calls these."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import ab, gate
from .gate import Baseline, Verdict, write_baseline, write_comparison_png
from .paired import PairedVerdict
from .perf import Case, CaseResult, PerfOptions
from .report import ResultsCSV, result_row, summary_lines as table_lines, write_heatmaps


@dataclass
class PerfState:
    """What one pytest session measured, and the gate it is held to."""

    options: PerfOptions
    fingerprint: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    comparison: ab.Comparison | None = None
    paired: dict[Case, list[PairedVerdict]] = field(default_factory=dict)
    csv: ResultsCSV | None = None
    rows: list[dict] = field(default_factory=list)
    setup_times: dict[str, float] = field(default_factory=dict)
    commit: str = ""
    started: float = field(default_factory=time.perf_counter)
    calibration: dict[str, float] = field(default_factory=dict)
    baseline: Baseline | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.05
    normalize: bool = False
    verdicts: dict[Case, list[Verdict]] = field(default_factory=dict)
    new_cases: list[Case] = field(default_factory=list)


def record_result(state: PerfState, result: CaseResult, side: str = "") -> dict:
    o = state.options
    commit = state.commit
    if state.comparison is not None:
        commit = state.comparison.tree.label if side == "A" else state.comparison.ref.label
    row = result_row(result, world_size=o.world_size, dtype=o.dtype, device=o.device, model=o.model_name,
                     model_shape=o.config.shape_id, runtime_mode=o.runtime_mode, commit=commit,
                     calibration=state.calibration, fingerprint=state.fingerprint, side=side, run_id=state.run_id)
    state.csv.append(row)
    state.rows.append(row)
    return row


def gate_case(state: PerfState, case: Case, row: dict) -> list[Verdict]:
    """The case's verdicts against the baseline ([] without one); kept for the summary."""
    if state.baseline is None:
        return []
    verdicts = state.baseline.compare(case, row, state.thresholds, state.alpha, state.normalize)
    if verdicts is None:
        state.new_cases.append(case)
        return []
    state.verdicts[case] = verdicts
    return verdicts


def measure_and_gate(runner, state: PerfState, case: Case, benchmark) -> tuple[CaseResult, list]:
    """Measure the case's rounds (timed by pytest-benchmark too), record the row(s) and gate.

    With --perf-compare-ref both sides run interleaved (pytest-benchmark times side A's rounds;
    side B's run in its untimed set-up) and the verdicts come from the paired ratios. Against a
    stored baseline, a case that regresses is measured once more, and only a second regression
    counts; in an A/B comparison it is measured again and judged on all its pairs (ab.gate_case)."""
    rounds = state.options.rounds
    runner.warm_up(case)
    if state.comparison is not None:
        paired = runner.rounds(case)
        benchmark.pedantic(paired.run_a, setup=paired.before_a, rounds=rounds, iterations=1, warmup_rounds=0)
        result, other = paired.finish()

        def record(a: CaseResult, b: CaseResult) -> None:
            record_result(state, a, side="A"), record_result(state, b, side="B")

        state.paired[case] = ab.gate_case(runner, case, result, other, state.thresholds, state.alpha, record)
        return result, state.paired[case]
    result = CaseResult(case)
    benchmark.pedantic(runner.run_round, args=(case, result), rounds=rounds, iterations=1, warmup_rounds=0)
    while result.rounds < rounds:  # --benchmark-disable runs the function once
        runner.run_round(case, result)
    verdicts = gate_case(state, case, record_result(state, result))
    if any(v.kind == "regression" for v in verdicts):
        result = CaseResult(case)
        for _ in range(rounds):
            runner.run_round(case, result)
        verdicts = gate_case(state, case, record_result(state, result))
    return result, verdicts


def summary_lines(state: PerfState, save_baseline: str | None, json_path: Path | None) -> list[str]:
    """The terminal summary: set-up, tables, the gate's report, where every output went."""
    o = state.options
    lines = []
    t = state.setup_times
    if t:
        lines.append(f"set-up: shard {t['shard_s']:.1f}s, spawn + load {t['spawn_and_load_s']:.1f}s; world size "
                     f"{o.world_size}, {o.dtype}, {o.device}, model {o.model_dir}"
                     + ("; decode steps compiled (torch.compile)" if o.compile else ""))
    own_rows = [r for r in state.rows if r["side"] != "B"]  # tables and heatmaps: this code's figures
    lines += table_lines(own_rows)
    heatmaps = write_heatmaps(own_rows, o.results_dir, o.model_name, o.device_id)
    if state.comparison is not None:
        lines += ab.summary_lines(state.paired, state.comparison, state.thresholds, state.alpha)
    if state.baseline is not None:
        verdicts = [v for vs in state.verdicts.values() for v in vs]
        lines += gate.summary_lines(state.baseline, verdicts, state.new_cases, state.thresholds, state.alpha,
                                    state.normalize)
    compared = [v for vs in (*state.verdicts.values(), *state.paired.values()) for v in vs]
    if compared:
        png = write_comparison_png(compared, Path(o.results_dir) / f"perf_comparison_{o.model_name}_{o.device_id}.png")
        lines.append(f"  comparison plot: {png}")
    if save_baseline:
        lines.append(f"baseline saved: {write_baseline(own_rows, save_baseline)}")
    lines.append(f"CSV: {state.csv.path} ({len(state.rows)} rows this session)")
    if json_path:
        lines.append(f"pytest-benchmark JSON: {json_path}")
    lines.append("heatmaps: " + ", ".join(str(p) for p in heatmaps))
    lines.append(f"wall time of the session: {time.perf_counter() - state.started:.1f}s")
    return lines
