"""benchmarks/speed.py's rounds per case: at least --rounds, then more only while the case's
projected time stays within --case-seconds (cheap batch-1 cases get a median of many rounds,
dear ones are not lengthened)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from speed import rounds_to_run  # noqa: E402


def rounds_run(rounds: int, case_seconds: float, round_s: float) -> int:
    done, spent = 0, 0.0
    while rounds_to_run(rounds, case_seconds, done, spent):
        done, spent = done + 1, spent + round_s
    return done


def test_cheap_cases_run_as_many_rounds_as_fit_in_the_budget():
    assert rounds_run(2, 40.0, 3.5) == 11  # 11 x 3.5 s = 38.5 s; a 12th would end at 42 s
    assert rounds_run(2, 40.0, 4.0) == 10  # exactly the budget


def test_dear_cases_run_the_fewest_rounds_asked_for_and_no_more():
    assert rounds_run(2, 40.0, 30.0) == 2  # already beyond the budget: still --rounds
    assert rounds_run(3, 40.0, 15.0) == 3


def test_no_budget_means_exactly_the_rounds_asked_for():
    assert rounds_run(2, 0.0, 0.5) == 2
    assert rounds_run(1, 0.0, 0.5) == 1
