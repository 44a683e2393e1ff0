"""An A/B comparison in one sitting (--perf-compare-ref): side A is this code, side B another
commit's, each its own worker group on the same shards and cores. Every case gets the same
warm-up on both sides, then its rounds interleaved A B A B ..., so that the pairs see the
same machine; verdicts come from the paired ratios (paired.py). Injected delays act on side A.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from .gate import describe_thresholds
from .gitref import RefCheckout, WorkingTree
from .paired import MIN_PAIRED_ROUNDS, PairedVerdict, compare_paired
from .. import log as default_log
from .perf import Case, CaseResult, PerfOptions, PerfRunner
from .serve import RemoteGroup

SIDES = ("A", "B")


def interleave(rounds: int) -> list[str]:
    """The order of a case's 2 x rounds measurements: A B A B ..., so that every round follows
    one of the other side, its caches as cold for one side as for the other. In the A B B A
    order half of each side's rounds follow one of its own (warm) and half do not, which widened
    the scatter of the first-token ratios (benchmarks/RESULTS.md). The drift of the machine
    between the two rounds of a pair is one round's worth, where the gate must cancel drifts
    over seconds and minutes."""
    return [side for _ in range(rounds) for side in SIDES]


def check_rounds(rounds: int) -> None:
    if rounds < MIN_PAIRED_ROUNDS:
        raise ValueError(f"--perf-compare-ref needs --perf-rounds >= {MIN_PAIRED_ROUNDS} (got {rounds}): with fewer "
                         "pairs no difference can be significant; 10 or more are recommended")


@dataclasses.dataclass
class Comparison:
    """What is compared: side A's code (the working tree) against side B's (a commit)."""

    tree: WorkingTree
    ref: RefCheckout

    @property
    def same_code(self) -> bool:
        return self.tree.commit == self.ref.commit and not self.tree.changed

    def describe(self) -> str:
        a = f"A = working tree at {self.tree.label}" + (f" ({len(self.tree.changed)} uncommitted file(s) in "
                                                          "starcoder_tp/)" if self.tree.changed else "")
        note = "; the same code on both sides: an A/A run" if self.same_code else ""
        return f"{a}, B = {self.ref.describe()}{note}"


class PairedRounds:
    """The interleaved rounds of one case, driven one A round at a time, so that a timer of
    side A (pytest-benchmark's pedantic: `before_a` as its untimed setup, `run_a` as the timed
    target) sees side A's rounds alone."""

    def __init__(self, runner: "ABRunner", case: Case, rounds: int):
        self.runner, self.case = runner, case
        self.order = interleave(rounds)
        self.next = 0
        self.results = {side: CaseResult(case) for side in SIDES}

    def _run(self, side: str) -> None:
        assert self.order[self.next] == side, (self.order, self.next, side)
        self.runner.sides[side].run_round(self.case, self.results[side])
        self.next += 1

    def before_a(self) -> None:
        """The B rounds due before the next A round."""
        while self.next < len(self.order) and self.order[self.next] == "B":
            self._run("B")

    def run_a(self) -> None:
        self._run("A")

    def finish(self) -> tuple[CaseResult, CaseResult]:
        """Whatever the schedule still holds (a trailing B, or every round when nothing drove it)."""
        while self.next < len(self.order):
            self._run(self.order[self.next])
        return self.results["A"], self.results["B"]


class ABRunner:
    """PerfRunner's interface for two sides. Side B runs the ref's code through serve.py."""

    def __init__(self, options: PerfOptions, comparison: Comparison, log: Callable[[str], None] = default_log,
                 log_path: Path | None = None):
        check_rounds(options.rounds)
        self.options, self.comparison, self.log = options, comparison, log
        self.log_path = Path(log_path or Path(options.results_dir) / f"compare_ref_{comparison.ref.label}.log")
        ref = comparison.ref
        b_options = dataclasses.replace(options, inject_prefill_ms=0.0, inject_decode_ms=0.0, inject_prefill_fraction=0.0,
                                        inject_decode_fraction=0.0)
        self.sides = {
            "A": PerfRunner(options, log, name="side A"),
            "B": PerfRunner(b_options, log, name=f"side B ({ref.describe()})",
                            start_group=lambda spec: RemoteGroup(ref.path, spec, ref.describe(), self.log_path).start()),
        }
        self.setup_times: dict[str, float] = {}

    def start(self) -> "ABRunner":
        a, b = self.sides["A"], self.sides["B"]
        a.start()
        b.start(shard_dir=a.shard_dir)
        self.setup_times = {"shard_s": a.setup_times["shard_s"],
                            "spawn_and_load_s": a.setup_times["spawn_and_load_s"] + b.setup_times["spawn_and_load_s"],
                            "load_s": max(a.setup_times["load_s"], b.setup_times["load_s"])}
        return self

    def warm_up(self, case: Case) -> None:
        """The same warm-up on both sides: a side restarted after a failure forgot its batch
        warm-up, so the other side repeats it too."""
        if any(case.batch not in self.sides[side].warmed for side in SIDES):
            for side in SIDES:
                self.sides[side].warmed.discard(case.batch)
        for side in SIDES:
            self.sides[side].warm_up(case)

    def rounds(self, case: Case) -> PairedRounds:
        return PairedRounds(self, case, self.options.rounds)

    def measure(self, case: Case) -> tuple[CaseResult, CaseResult]:
        self.warm_up(case)
        return self.rounds(case).finish()

    def measure_and_gate(self, case: Case, thresholds: dict[str, float], alpha: float,
                         record: Callable[[CaseResult, CaseResult], None]) -> tuple[CaseResult, list[PairedVerdict]]:
        a, b = self.measure(case)
        return a, gate_case(self, case, a, b, thresholds, alpha, record)

    def close(self) -> None:
        for side in SIDES:
            self.sides[side].close()


def gate_case(runner: ABRunner, case: Case, a: CaseResult, b: CaseResult, thresholds: dict[str, float],
              alpha: float, record: Callable[[CaseResult, CaseResult], None] = lambda a, b: None) -> list[PairedVerdict]:
    """The case's verdicts. A case that regresses is measured again, as many pairs, and judged
    on all of them: a burst of noise that tipped the first pairs is diluted by the next ones,
    while a real slowdown holds in both (and the pooled test has more power). Each measurement
    is handed to `record` as soon as it is taken (a failure in the second keeps the first);
    `a` and `b` are then extended in place with the second's rounds."""
    record(a, b)
    found = verdicts(case, a, b, thresholds, alpha)
    if any(v.kind == "regression" for v in found):
        runner.log(f"[compare] {case.id}: {', '.join(v.metric for v in found if v.kind == 'regression')} regressed "
                   f"over {a.rounds} pairs; measuring {runner.options.rounds} more pairs to confirm")
        more_a, more_b = runner.rounds(case).finish()
        record(more_a, more_b)
        a.extend(more_a), b.extend(more_b)
        found = verdicts(case, a, b, thresholds, alpha)
    return found


def verdicts(case: Case, a: CaseResult, b: CaseResult, thresholds: dict[str, float], alpha: float) -> list[PairedVerdict]:
    """One verdict per gated metric: first_token (per round) and decode (each round's mean step)."""
    per_round = {"first_token": lambda r: r.first_token_ms_rounds,
                 "decode": lambda r: [sum(steps) / len(steps) for steps in r.decode_ms_rounds]}
    out = []
    for metric, threshold in thresholds.items():
        if metric == "decode" and case.seq_out < 2:
            continue  # a single output token has no decode step
        out.append(compare_paired(case, metric, per_round[metric](a), per_round[metric](b), threshold, alpha))
    return out


def summary_lines(all_verdicts: dict[Case, list[PairedVerdict]], comparison: Comparison, thresholds: dict[str, float],
                  alpha: float) -> list[str]:
    """The terminal report: every case's ratios with their intervals, then regressions and
    improvements, and the cases whose run could not detect a change of the threshold's size."""
    flat = [v for vs in all_verdicts.values() for v in vs]
    lines = [f"A/B comparison in one sitting: {comparison.describe()}",
             f"  thresholds {describe_thresholds(thresholds)}, alpha {alpha}, rounds interleaved A B A B; ratio = A/B per paired round "
             "(median, its 95% CI), detectable = the smallest slowdown this run would have flagged"]
    for v in sorted(flat, key=lambda v: (v.case, v.metric)):
        lines.append("  " + v.message())
    for kind in ("regression", "improvement"):
        found = [v for v in flat if v.kind == kind]
        lines.append(f"  {len(found)} {kind}(s)" + (": " + ", ".join(f"{v.case.id} {v.metric}" for v in found)
                                                     if found else ""))
    unsure = [v for v in flat if v.inconclusive]
    if unsure:
        lines.append("  beyond the threshold but not significant (more --perf-rounds decide them): "
                     + ", ".join(f"{v.case.id} {v.metric}" for v in unsure))
    blind = [v for v in flat if v.detectable is None or v.detectable > 1 + 2 * v.threshold]
    if blind:
        lines.append("  too noisy to gate at the threshold (detectable beyond twice it): "
                     + ", ".join(f"{v.case.id} {v.metric}" for v in blind))
    return lines
