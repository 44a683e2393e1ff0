"""The A/B comparison's statistics and schedule on synthetic numbers (no ranks)."""
import math
import random

import pytest

from starcoder_tp.suite import ab
from starcoder_tp.suite.paired import compare_paired, detectable_ratio, median_ci
from starcoder_tp.suite.perf import Case, CaseResult

CASE = Case(1, 8, 4)


def pairs(ratio: float, noise: float, n: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """n pairs whose A/B ratio is `ratio` times lognormal noise; B drifts by 30% over the run,
    as a machine does, which the pairing must cancel."""
    rng = random.Random(seed)
    b = [2.0 * (1 + 0.3 * i / n) for i in range(n)]
    a = [x * ratio * math.exp(rng.gauss(0, noise)) for x in b]
    return a, b


def test_a_clear_slowdown_is_a_regression_with_its_interval_and_a_speedup_an_improvement():
    a, b = pairs(1.25, 0.05, 20)
    v = compare_paired(CASE, "decode", a, b, threshold=0.10, alpha=0.05)
    assert v.kind == "regression" and v.pairs == 20 and v.p_value < 0.001
    assert v.ci[0] < v.ratio < v.ci[1] and v.ci[0] > 1.10 and abs(v.ratio - 1.25) < 0.05
    assert 1.10 <= v.detectable < 1.2
    assert "bs1-in8-out4 decode: A " in v.message() and "20 pairs" in v.message() and v.message().endswith("regression")
    a, b = pairs(0.7, 0.05, 20)
    assert compare_paired(CASE, "decode", a, b, 0.10, 0.05).kind == "improvement"


def test_a_drift_of_the_machine_alone_is_no_regression():
    a, b = pairs(1.0, 0.05, 40, seed=3)  # both sides drift by 30% within the run, in step
    v = compare_paired(CASE, "first_token", a, b, 0.10, 0.05)
    assert v.kind == "ok" and not v.inconclusive and abs(v.ratio - 1) < 0.05


def test_a_consistent_shift_within_the_threshold_passes_and_a_noisy_one_beyond_it_is_undecided():
    a, b = pairs(1.05, 0.01, 20)
    v = compare_paired(CASE, "decode", a, b, 0.10, 0.05)
    assert v.kind == "ok" and v.p_value < 0.001 and not v.inconclusive
    ratios = [0.7, 1.3, 0.75, 1.25, 1.15, 1.2]  # median 1.17, but as many pairs faster as slower
    v = compare_paired(CASE, "decode", [2.0 * r for r in ratios], [2.0] * 6, 0.10, 0.05)
    assert v.ratio > 1.10 and v.p_value >= 0.05 and v.kind == "ok" and v.inconclusive


def test_detectable_ratio_shrinks_with_more_pairs_and_is_none_with_too_few():
    assert detectable_ratio([0.01, -0.02, 0.0, 0.03], 0.10, 0.05) is None  # 4 pairs: p >= 1/16 whatever the shift
    noisy = [math.log(x / y) for x, y in zip(*pairs(1.0, 0.2, 10))]
    many = [math.log(x / y) for x, y in zip(*pairs(1.0, 0.2, 80))]
    assert detectable_ratio(many, 0.01, 0.05) < detectable_ratio(noisy, 0.01, 0.05)
    assert detectable_ratio([0.0001] * 20, 0.10, 0.05) == pytest.approx(1.10)  # never below the threshold
    # The definition: shifted by the detectable ratio, this run's scatter is a regression.
    d = detectable_ratio(noisy, 0.01, 0.05)
    centre = sorted(noisy)[len(noisy) // 2 - 1:len(noisy) // 2 + 1]
    shifted = [x - sum(centre) / 2 + math.log(d) * 1.001 for x in noisy]
    assert compare_paired(CASE, "decode", [math.exp(x) for x in shifted], [1.0] * 10, 0.01, 0.05).kind == "regression"


def test_median_interval_uses_the_sign_test_order_statistics():
    values = list(range(1, 11))  # n = 10: P(Binom <= 1) = 0.011 <= 0.025 < P(Binom <= 2) = 0.055
    assert median_ci(values) == (2, 9)
    assert median_ci([1, 2, 3, 4, 5]) == (-math.inf, math.inf)  # n = 5: no 95% interval exists
    rng = random.Random(5)
    covered = sum(lo <= 0 <= hi for lo, hi in (median_ci([rng.gauss(0, 1) for _ in range(12)]) for _ in range(2000)))
    assert covered / 2000 >= 0.95


def test_a_pair_count_that_cannot_be_significant_is_refused():
    with pytest.raises(ValueError, match="--perf-compare-ref needs --perf-rounds >= 6 \\(got 5\\)"):
        ab.check_rounds(5)
    with pytest.raises(ValueError, match="3 A rounds and 2 B rounds do not pair up"):
        compare_paired(CASE, "decode", [1, 2, 3], [1, 2], 0.1, 0.05)


class FakeSide:
    def __init__(self, name: str, calls: list, times):
        self.name, self.calls, self.times = name, calls, times

    def run_round(self, case, result: CaseResult) -> None:
        self.calls.append(self.name)
        first, step = self.times(len([c for c in self.calls if c == self.name]))
        result.add_round(first, [step] * (case.seq_out - 1), (case.batch, case.seq_out), [1])
        result.wall_ms_rounds.append(first + step * (case.seq_out - 1) + 1)


class FakeRunner:
    """ABRunner's surface for PairedRounds and gate_case, with sides that return given times."""

    def __init__(self, rounds: int, a_times, b_times=lambda i: (10.0, 2.0)):
        self.calls: list[str] = []
        self.sides = {"A": FakeSide("A", self.calls, a_times), "B": FakeSide("B", self.calls, b_times)}
        self.options = type("O", (), {"rounds": rounds})()
        self.log = lambda m: None

    def rounds(self, case):
        return ab.PairedRounds(self, case, self.options.rounds)


def test_rounds_alternate_and_a_timer_of_side_a_sees_side_a_alone():
    assert ab.interleave(3) == ["A", "B", "A", "B", "A", "B"]
    runner = FakeRunner(5, lambda i: (10.0, 2.0))
    paired = runner.rounds(CASE)
    timed = []
    for _ in range(5):  # as pytest-benchmark's pedantic drives them: setup untimed, then the target
        paired.before_a()
        before = len(runner.calls)
        paired.run_a()
        timed.append(runner.calls[before:])
    a, b = paired.finish()
    assert timed == [["A"]] * 5
    assert runner.calls == ab.interleave(5) and a.rounds == b.rounds == 5
    # --benchmark-disable: pedantic runs set-up and target once; finish() runs the rest in order.
    runner = FakeRunner(4, lambda i: (10.0, 2.0))
    paired = runner.rounds(CASE)
    paired.before_a(), paired.run_a()
    paired.finish()
    assert runner.calls == ab.interleave(4)


def test_a_regression_is_measured_again_and_judged_on_all_pairs():
    # 5 of the first 8 pairs are 30% slower on side A (a burst), none of the next 8: pooled, no regression.
    runner = FakeRunner(8, lambda i: (10.0, 2.6 if i in (1, 2, 4, 5, 7) else 2.0 * (1 + 0.01 * (i % 3 - 1))))
    paired = runner.rounds(CASE)
    a, b = paired.finish()
    assert ab.verdicts(CASE, a, b, {"decode": 0.1}, 0.05)[0].kind == "regression"
    verdict = ab.gate_case(runner, CASE, a, b, {"decode": 0.1}, 0.05)[0]
    assert a.rounds == b.rounds == 16 and verdict.pairs == 16 and verdict.kind == "ok"
    # A real slowdown holds over the second measurement too.
    runner = FakeRunner(8, lambda i: (10.0, 2.6 * (1 + 0.01 * (i % 3 - 1))))
    a, b = runner.rounds(CASE).finish()
    verdict = ab.gate_case(runner, CASE, a, b, {"decode": 0.1}, 0.05)[0]
    assert verdict.kind == "regression" and verdict.pairs == 16
    # Nothing regressed: nothing is measured again.
    runner = FakeRunner(8, lambda i: (10.0, 2.0 * (1 + 0.01 * (i % 3 - 1))))
    a, b = runner.rounds(CASE).finish()
    assert ab.gate_case(runner, CASE, a, b, {"decode": 0.1, "first_token": 0.1}, 0.05)[0].pairs == 8
