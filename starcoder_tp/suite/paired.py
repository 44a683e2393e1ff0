"""Verdicts of an A/B comparison (--perf-compare-ref) from paired rounds.

Both sides measure a case in one sitting, rounds interleaved (A B A B ...), so that each pair of
rounds shares the machine's state of the moment; a machine that drifts by 20% over a minute
moves both sides of a pair alike. Per metric and case, on the per-round ratios r_i = A_i / B_i:

- a **regression** needs BOTH the median ratio beyond 1 + threshold AND the log ratios
  significantly above 0 (one-sided Wilcoxon signed-rank, p < alpha): one odd pair cannot fail
  a build, and a tiny but consistent shift cannot either;
- an **improvement** mirrors it (median below 1 - threshold, significantly below 0);
- the **confidence interval** of the median ratio is distribution-free (order statistics);
- the **detectable** ratio is the smallest slowdown this run would have flagged: the observed
  scatter of the log ratios around their median, shifted until both rules hold. A run whose
  detectable ratio is far above the threshold was too noisy or too short to gate at it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .perf import Case

CONFIDENCE = 0.95
# The one-sided exact signed-rank p-value cannot go below 2**-n: with 5 pairs the smallest is
# 0.031, with 4 it is 0.0625 and no shift at all could reach alpha = 0.05.
MIN_PAIRED_ROUNDS = 6


def wilcoxon_p(log_ratios: list[float], alternative: str) -> float:
    """One-sided signed-rank p-value that the log ratios lie above ('greater') or below ('less') 0."""
    from scipy.stats import wilcoxon

    if not any(log_ratios):
        return 1.0
    return float(wilcoxon(log_ratios, alternative=alternative).pvalue)


def median_ci(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval for the median: order statistics k and n-k+1, with k the
    largest that still covers the median with at least `confidence` (sign-test inversion);
    (-inf, inf) when there are too few values for any."""
    from scipy.stats import binom

    n = len(values)
    ordered = sorted(values)
    tail = (1 - confidence) / 2
    k = 0
    while k + 1 <= n // 2 and binom.cdf(k, n, 0.5) <= tail:
        k += 1
    if k == 0:
        return -math.inf, math.inf
    return ordered[k - 1], ordered[n - k]


def detectable_ratio(log_ratios: list[float], threshold: float, alpha: float) -> float | None:
    """The smallest A/B ratio this run would have called a regression, given its own scatter;
    None when no shift could be significant with this few pairs."""
    n = len(log_ratios)
    if n == 0 or 2.0 ** -n >= alpha:
        return None
    centre = statistics.median(log_ratios)
    residuals = [x - centre for x in log_ratios]
    low, high = 0.0, max(abs(e) for e in residuals) + 1e-9  # at `high` every pair is positive: p = 2**-n
    if wilcoxon_p(residuals, "greater") < alpha:
        high = 0.0
    for _ in range(40):
        if high - low < 1e-6:
            break
        middle = (low + high) / 2
        if wilcoxon_p([e + middle for e in residuals], "greater") < alpha:
            high = middle
        else:
            low = middle
    return max(math.exp(high), 1 + threshold)


@dataclass(frozen=True)
class PairedVerdict:
    case: Case
    metric: str
    kind: str  # "regression", "improvement", "ok"
    ratio: float  # median of the per-round A/B ratios
    ci: tuple[float, float]
    p_value: float  # one-sided, in the direction of the median
    detectable: float | None
    pairs: int
    threshold: float
    a_ms: float  # each side's median, for the reader
    b_ms: float

    @property
    def inconclusive(self) -> bool:
        """Beyond the threshold by its median, but not significantly so."""
        return self.kind == "ok" and (self.ratio > 1 + self.threshold or self.ratio < 1 - self.threshold)

    def message(self) -> str:
        low, high = self.ci
        interval = f"{low:.3f}-{high:.3f}" if math.isfinite(high) else "n/a"
        detect = f"+{self.detectable - 1:.1%}" if self.detectable is not None else "none (too few pairs)"
        return (f"{self.case.id} {self.metric}: A {self.a_ms:.3f} ms, B {self.b_ms:.3f} ms, A/B {self.ratio:.3f} "
                f"({CONFIDENCE:.0%} CI {interval}, {self.pairs} pairs, Wilcoxon p={self.p_value:.3g}; threshold "
                f"{self.threshold:.0%}, detectable {detect}): {self.kind}")


def compare_paired(case: Case, metric: str, a: list[float], b: list[float], threshold: float,
                   alpha: float) -> PairedVerdict:
    """The verdict on one metric from rounds measured in pairs (a[i] next to b[i])."""
    if len(a) != len(b) or not a:
        raise ValueError(f"{case.id} {metric}: {len(a)} A rounds and {len(b)} B rounds do not pair up")
    bad = [t for t in a + b if not (math.isfinite(t) and t > 0)]
    if bad:
        raise ValueError(f"{case.id} {metric}: garbage time {bad[0]!r} ms among the rounds (non-finite or non-positive)")
    logs = [math.log(x / y) for x, y in zip(a, b)]
    ratio = math.exp(statistics.median(logs))
    direction = "greater" if ratio >= 1 else "less"
    p = wilcoxon_p(logs, direction)
    kind = "ok"
    if ratio > 1 + threshold and p < alpha:
        kind = "regression"
    elif ratio < 1 - threshold and p < alpha:
        kind = "improvement"
    low, high = median_ci(logs)
    return PairedVerdict(case, metric, kind, ratio, (math.exp(low), math.exp(high)), p,
                         detectable_ratio(logs, threshold, alpha), len(a), threshold, statistics.median(a),
                         statistics.median(b))
