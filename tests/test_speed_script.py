"""benchmarks/speed.py's rounds per case (at least --rounds, then more only while the case's
projected time stays within --case-seconds: cheap batch-1 cases get a median of many rounds,
dear ones are not lengthened), and its roofline's FLOP counts, against a count layer by layer
and head by head."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from speed import decode_flops, prefill_flops, rounds_to_run  # noqa: E402

from starcoder_tp.config import ModelConfig  # noqa: E402
from starcoder_tp.files import EMBEDDED_MODEL_DIR  # noqa: E402
from starcoder_tp.suite.perf import Case  # noqa: E402


def counted(c: ModelConfig, rows: int, attention_pairs: int, batch: int) -> int:
    """FLOPs counted one layer and one head at a time: each linear's multiply-adds over `rows`
    tokens, QK^T and PV over `attention_pairs` (query, key) pairs per head and sequence, and the
    lm_head over one row per sequence."""
    total = 0
    for _ in range(c.n_layer):
        for n_out, n_in in ((c.n_embd + 2 * c.n_kv_head * c.head_dim, c.n_embd), (c.n_embd, c.n_embd),
                            (c.n_inner, c.n_embd), (c.n_embd, c.n_inner)):
            total += 2 * rows * n_out * n_in
        for _ in range(c.n_head):
            total += batch * 2 * (2 * attention_pairs * c.head_dim)
    return total + 2 * batch * c.vocab_size * c.n_embd


def test_the_prefill_counts_every_layers_attention():
    c = ModelConfig.from_dir(EMBEDDED_MODEL_DIR)
    case = Case(3, 40, 8)
    assert c.n_layer > 1  # else a count of one layer's attention would pass
    assert prefill_flops(c, case) == counted(c, case.batch * case.seq_in, case.seq_in ** 2 // 2, case.batch)


def test_a_decode_step_counts_every_layers_attention_over_the_context_at_mid_output():
    c = ModelConfig.from_dir(EMBEDDED_MODEL_DIR)
    case = Case(3, 40, 8)
    context = case.seq_in + case.seq_out // 2
    assert decode_flops(c, case) == counted(c, case.batch, context, case.batch)


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


def test_no_rounds_at_all_is_refused_by_value():
    with pytest.raises(ValueError, match="got 0"):
        rounds_to_run(0, 40.0, 0, 0.0)


def test_no_budget_means_exactly_the_rounds_asked_for():
    assert rounds_run(2, 0.0, 0.5) == 2
    assert rounds_run(1, 0.0, 0.5) == 1


def test_no_rounds_and_a_negative_budget_are_refused_by_name_before_anything_is_measured():
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    for flag, value in (("--rounds", "0"), ("--case-seconds", "-1"), ("--case-seconds", "inf")):
        out = subprocess.run([sys.executable, str(repo / "benchmarks" / "speed.py"), flag, value], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHONPATH": path})
        assert out.returncode == 2 and f"argument {flag}: {value} must be" in out.stderr, out.stderr[-2000:]
