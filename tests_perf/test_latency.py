"""One test per case of the grid, id bs{B}-in{I}-out{O}: `pytest tests_perf -k bs16`,
`-k "bs1-"` for batch 1 alone (or --batch-sizes 1). With --perf-compare-ref or --perf-baseline a
case also fails when it regressed (see starcoder_tp/paired.py and starcoder_tp/gate.py)."""
import pytest

from starcoder_tp.suite.perf_session import measure_and_gate


def test_latency(perf_case, perf_runner, perf_state, benchmark):
    result, verdicts = measure_and_gate(perf_runner, perf_state, perf_case, benchmark)
    benchmark.extra_info.update({
        "case": perf_case.id,
        "first_token_ms": result.first_token_ms,
        "first_token_ms_rounds": result.first_token_ms_rounds,
        "decode_ms_per_token": result.decode_ms_mean,
        "decode_p50_ms": result.decode_ms_percentile(50),
        "decode_p90_ms": result.decode_ms_percentile(90),
        "decode_p99_ms": result.decode_ms_percentile(99),
        "tokens_per_s": result.tokens_per_s,
        "peak_memory_bytes_per_rank": result.peak_memory_bytes,
        "world_size": perf_state.options.world_size,
        "dtype": perf_state.options.dtype,
        "verdicts": {v.metric: v.kind for v in verdicts},
        **({"compare_ratio": {v.metric: v.ratio for v in verdicts}} if perf_state.comparison else {}),
    })
    # The ranks' clocks must fit inside the driver's: every rank's timed steps lie within the
    # request, so the slowest rank's sum of them cannot exceed the wall time around the request,
    # however loaded the machine (a unit slip, or a step timed twice, breaks this).
    assert len(result.wall_ms_rounds) == len(result.timed_ms_rounds) == result.rounds == len(result.decode_ms_rounds)
    for timed, wall in zip(result.timed_ms_rounds, result.wall_ms_rounds, strict=True):
        assert 0 < timed <= wall, (perf_case.id, timed, wall)
    regressions = [v for v in verdicts if v.kind == "regression"]
    if regressions:
        pytest.fail("latency regression" + ("" if perf_state.comparison else " (confirmed by a second measurement)")
                    + ":\n" + "\n".join(v.message() for v in regressions), pytrace=False)
