"""One test per case of the grid, id bs{B}-in{I}-out{O}: `pytest tests_perf -k bs16`,
`-k "bs1-"` for batch 1 alone (or --batch-sizes 1). With --perf-compare-ref or --perf-baseline a
case also fails when it regressed (see starcoder_tp/paired.py and starcoder_tp/gate.py)."""
import pytest

from starcoder_tp.perf_session import measure_and_gate


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
    # The ranks' clocks must fit inside the driver's: each round's first token plus its decode
    # steps, timed on the ranks, cannot exceed the wall time of the whole request around them
    # (a unit slip, or a clock read before the synchronisation of an earlier step, breaks this;
    # the slack covers the ranks leaving each collective microseconds apart).
    for first, steps, wall in zip(result.first_token_ms_rounds, result.decode_ms_rounds, result.wall_ms_rounds,
                                  strict=True):
        assert first + sum(steps) <= wall * 1.01 + 1.0, (perf_case.id, first, sum(steps), wall)
    regressions = [v for v in verdicts if v.kind == "regression"]
    if regressions:
        pytest.fail("latency regression" + ("" if perf_state.comparison else " (confirmed by a second measurement)")
                    + ":\n" + "\n".join(v.message() for v in regressions), pytrace=False)
