"""One test per case of the grid, id bs{B}-in{I}-out{O}: `pytest tests_perf -k bs16`,
`-k "bs1-"` for batch 1 alone (or --batch-sizes 1)."""
from starcoder_tp.pytest_plugin import record_result
from starcoder_tp.perf import CaseResult


def test_latency(perf_case, perf_runner, perf_state, benchmark):
    rounds = perf_state.options.rounds
    perf_runner.warm_up(perf_case.batch)
    result = CaseResult(perf_case)
    # pytest-benchmark times each whole generation; our own clocks give first-token and decode.
    benchmark.pedantic(perf_runner.run_round, args=(perf_case, result), rounds=rounds, iterations=1, warmup_rounds=0)
    while result.rounds < rounds:  # --benchmark-disable runs the function once
        perf_runner.run_round(perf_case, result)
    row = record_result(perf_state, result)
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
    })
    assert result.rounds == rounds
    assert int(row["Batch"]) == perf_case.batch and int(row["Output_seq_len"]) == perf_case.seq_out
