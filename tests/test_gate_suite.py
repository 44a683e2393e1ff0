"""The regression gate end to end on the embedded model: a baseline taken just before each
test, then an unchanged run (passes), an injected +25% decode slowdown (fails on decode alone)
and a first-token slowdown (fails on the first-token metric alone).

Thresholds are set by what this kind of runner does between two runs seconds apart, measured by
benchmarks/gate_reliability.py (10 rounds, a fresh baseline before every repetition): its speed
moves in phases of a few seconds by up to +-20% (per-round decode 3.0-4.7 ms within 80 rounds of
one process). At 10% thresholds an unchanged run false-alarmed 0-4 times in 20 and a +25% decode
injection was confirmed 16-17 times in 20, depending on the hour. So that these tests fail only
when the gate is wrong, not when the runner hiccups: the unchanged run is gated at 25% (the
README's advice for shared VMs), the +25% decode injection at 5%, and the metric that must NOT
fire in each slowdown test at 50%; and each of these three tests passes when one of three fresh
(baseline, run) attempts gives the expected verdict (see verdict_in_one_of): one attempt alone
failed about one time in four or five on this VM in both directions, though the gate worked. The injections busy-wait, so
they do not leak into the other metric through an idle core. 10 rounds: with 5, one outlier among the baseline's rounds makes a
shift undetectable (p >= 0.075)."""
import csv
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GRID = ["--batch-sizes", "1", "--seq-in", "128", "--seq-out", "32", "--perf-rounds", "10"]


def run_perf(tmp, *args):
    return subprocess.run([sys.executable, "-m", "pytest", "tests_perf", "-p", "no:cacheprovider", *GRID,
                           "--results-dir", str(tmp / "results"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def regressed(stdout: str) -> set[str]:
    """The metrics of the summary's regression lines (not its 'not significant' ones)."""
    return set(re.findall(r"bs1-in128-out32 (\w+): baseline .*: regression$", stdout, re.MULTILINE))


def take_baseline(tmp: Path) -> tuple[float, float]:
    """A baseline CSV in `tmp`, taken now; returns its median first-token and decode ms."""
    proc = run_perf(tmp, "--perf-save-baseline", tmp / "baseline.csv")
    assert proc.returncode == 0, proc.stdout[-2000:]
    row = list(csv.DictReader(open(tmp / "baseline.csv")))[0]
    first = statistics.median(float(x) for x in row["first_token_ms_rounds"].split(";"))
    decode = statistics.median(float(x) for x in row["decode_ms_rounds"].split(";"))
    return first, decode


def verdict_in_one_of(attempts: int, tmp_path: Path, inject, thresholds: str, expected: set[str]) -> str:
    """Fresh baseline, then a run with `inject(first_ms, decode_ms)`'s options, up to `attempts`
    times; returns the output of the first run whose gate regressed exactly the `expected`
    metrics (none: the run passes), or fails showing every attempt and the last output.
    Why retries: on this kind of VM one attempt catches a +25% decode slowdown 16-17 times in 20,
    and an unchanged run once came out 26% slower on decode than its baseline seconds before
    (and again when re-measured): the machine's speed moves by up to 20% between the baseline
    and the run, so a single attempt would fail CI about one time in five though the gate works.
    A gate that cannot see the slowdown, flags the wrong metric or cries wolf every time still
    fails all attempts."""
    outputs = []
    for attempt in range(attempts):
        tmp = tmp_path / f"attempt{attempt}"
        tmp.mkdir()
        first, decode = take_baseline(tmp)
        proc = run_perf(tmp, "--perf-baseline", tmp / "baseline.csv", "--perf-max-regression", thresholds,
                        *inject(first, decode))
        if proc.returncode == (1 if expected else 0) and regressed(proc.stdout) == expected:
            if expected:
                assert "latency regression (confirmed by a second measurement)" in proc.stdout
            else:
                assert "0 regression(s)" in proc.stdout
            return proc.stdout
        outputs.append(f"attempt {attempt}: exit {proc.returncode}, regressed {sorted(regressed(proc.stdout))}")
    pytest.fail(f"the gate did not regress exactly {sorted(expected)} in {attempts} fresh attempts: "
                + "; ".join(outputs) + "\nlast output:\n" + proc.stdout[-3000:])


def test_unchanged_run_passes_the_gate(tmp_path):
    verdict_in_one_of(3, tmp_path, lambda first, decode: [], "first_token=25%,decode=25%", set())


def test_injected_decode_slowdown_of_25_percent_fails_the_gate_on_decode(tmp_path):
    verdict_in_one_of(3, tmp_path, lambda first, decode: ["--perf-inject-decode-delay-ms", f"{0.25 * decode:.3f}"],
                     "decode=5%,first_token=50%", {"decode"})
    assert any(tmp_path.glob("attempt*/results/perf_comparison_starcoder_0.png"))


def test_first_token_slowdown_is_caught_on_the_first_token_metric_alone(tmp_path):
    verdict_in_one_of(3, tmp_path, lambda first, decode: ["--perf-inject-prefill-delay-ms", f"{0.5 * first:.3f}"],
                     "first_token=10%,decode=50%", {"first_token"})


def test_a_baseline_of_another_world_size_is_refused_at_start_up(tmp_path):
    tmp = tmp_path
    proc = run_perf(tmp, "--perf-save-baseline", tmp / "baseline.csv", "--perf-rounds", "4")
    assert proc.returncode == 0, proc.stdout[-2000:]
    proc = run_perf(tmp, "--perf-baseline", tmp / "baseline.csv", "--world-size", "1")
    assert proc.returncode == 4
    assert "was measured at world size 2, float32, cpu, runtime mode 'eager'; this run is world size 1" in proc.stderr
    proc = run_perf(tmp, "--perf-baseline", tmp / "baseline.csv", "--no-prepack")
    assert proc.returncode == 4 and "this run is world size 2, float32, cpu, runtime mode 'eager-no-prepack'" in proc.stderr
    proc = run_perf(tmp, "--perf-baseline", tmp / "baseline.csv", "--perf-rounds", "2")
    assert proc.returncode == 4 and "--perf-baseline needs --perf-rounds >= 4 (got 2)" in proc.stderr
