"""pass@k over problems (humaneval.pass_at_k) against the estimator worked by hand, and the
per-sample seeds that make a sampled run independent of batching and world size."""
from math import comb

import pytest

from starcoder_tp.suite.humaneval import pass_at_k, reported_ks, sequence_seed

# Three problems, ten samples each: 0, 3 and 10 of them pass.
TASKS = [t for t in ("A", "B", "C") for _ in range(10)]
PASSED = [False] * 10 + [True, False, False, True, False, False, False, True, False, False] + [True] * 10


def by_hand(n: int, c: int, k: int) -> float:
    return 1.0 if n - c < k else 1 - comb(n - c, k) / comb(n, k)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_pass_at_k_is_the_unbiased_estimator_averaged_over_problems(k):
    want = (by_hand(10, 0, k) + by_hand(10, 3, k) + by_hand(10, 10, k)) / 3
    estimate, low, high = pass_at_k(PASSED, TASKS, k)
    assert estimate == pytest.approx(want, abs=1e-12)
    assert 0 <= low <= estimate <= high <= 1


def test_worked_values_and_monotone_in_k():
    # Problem B: pass@1 = 3/10, pass@5 = 1 - C(7,5)/C(10,5) = 1 - 21/252.
    assert pass_at_k(PASSED[10:20], TASKS[10:20], 1)[0] == pytest.approx(0.3)
    assert pass_at_k(PASSED[10:20], TASKS[10:20], 5)[0] == pytest.approx(1 - 21 / 252)
    values = [pass_at_k(PASSED, TASKS, k)[0] for k in range(1, 11)]
    assert values == sorted(values) and values[0] == pytest.approx(13 / 30) and values[-1] == pytest.approx(2 / 3)


def test_k_above_the_samples_is_refused():
    with pytest.raises(ValueError, match="pass@11 needs at least 11 samples per problem; the fewest is 10"):
        pass_at_k(PASSED, TASKS, 11)


def test_reported_ks():
    assert reported_ks(1) == [1]
    assert reported_ks(10) == [1, 5, 10]
    assert reported_ks(50) == [1, 5, 10, 20, 50]
    assert reported_ks(7) == [1, 5, 7]


def test_sample_seeds_are_stable_and_distinct():
    seeds = {sequence_seed(0, f"HumanEval/{t}", j) for t in range(164) for j in range(50)}
    assert len(seeds) == 164 * 50 and all(0 <= s < 2**63 for s in seeds)
    assert sequence_seed(0, "HumanEval/0", 0) == sequence_seed(0, "HumanEval/0", 0) != sequence_seed(1, "HumanEval/0", 0)
    assert sequence_seed(0, "HumanEval/0", 0) == 3704058799852400816  # a change here re-draws every stored run
