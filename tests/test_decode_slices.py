"""What a measured plan's decode timings make copies of: a large weight's first rows
(kernel_timing.decode_rows), the times scaled to the whole."""
import math

import pytest
import torch

from starcoder_tp import kernel_timing, kernels
from starcoder_tp.kernel_timing import decode_rows


@pytest.fixture
def decode_set(monkeypatch):
    """The decode set and the slices' floor set small: (set bytes, floor rows)."""
    monkeypatch.setattr(kernel_timing, "decode_set_bytes", lambda: 64 * 16 * 4 * 3)  # 192 rows of 16 fp32
    monkeypatch.setattr(kernel_timing, "DECODE_SLICE_MIN_ROWS", 128)
    return 64 * 16 * 4 * 3, 128


def test_a_weight_that_fits_in_the_decode_set_is_timed_whole(decode_set):
    assert decode_rows(192, 16, 4) == 192 and decode_rows(100, 16, 4) == 100


def test_a_larger_weight_is_timed_on_whole_blocks_of_its_first_rows_that_fit(decode_set):
    assert decode_rows(4096, 16, 4) == 192, "as many rows as fit, in blocks of 64"
    assert decode_rows(4096, 16, 2) == 384, "bf16: twice the rows"
    assert decode_rows(4096, 20, 4) == 128, "153 rows fit: 128, the floor, which is whole blocks too"
    assert decode_rows(4096, 4096, 4) == 128, "none fit: the floor"
    assert decode_rows(160, 4096, 4) == 128 and decode_rows(100, 4096, 4) == 100, "never more rows than it has"


def test_the_floor_is_the_rows_at_which_the_bench_lm_heads_candidates_ran_as_on_the_whole():
    # (RESULTS.md: on 16384 of its 49152 rows they ran as on all; on 2688 of a weight's, MKL's did not)
    assert kernel_timing.DECODE_SLICE_MIN_ROWS == 16384 and kernel_timing.DECODE_SLICE_MIN_ROWS % 64 == 0


def test_a_large_weights_decode_times_come_from_its_first_rows_scaled_to_all(monkeypatch, decode_set):
    timed_rows, min_calls = [], []
    real_calls = kernel_timing.decode_calls

    def decode_calls(weight, rows, kinds, *args, **kw):
        timed_rows.append(weight.shape[0])
        return real_calls(weight, rows, kinds, *args, **kw)

    def time_ms(calls, on_progress=lambda: None, min_calls_=1):
        min_calls.append(min_calls_)
        for call in calls.values():
            call()
        return {name: {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "onednn_plain": 4.0}[name] for name in calls}

    monkeypatch.setattr(kernels, "decode_calls", decode_calls)
    monkeypatch.setattr(kernels, "time_ms", time_ms)
    monkeypatch.setattr(kernels, "decode_candidates", lambda w, rows=1: ("plain", "onednn"))
    large, small = torch.randn(1024, 16), torch.randn(64, 16)
    plan = kernels.measure({"1024x16:float32": large, "64x16:float32": small}, 1, lambda t: t,
                           prefill={"1024x16:float32"})
    assert timed_rows == [192, 64], "the large weight's first 192 rows, the small one whole"
    assert min_calls[0] == math.ceil(kernels.DECODE_MIN_CALLS * 1024 / 192), "a round streams the whole's bytes"
    assert min_calls[1:3] == [1, 1] and min_calls[3] == kernels.DECODE_MIN_CALLS, "prefill whole; the small one"
    scale = 1024 / 192
    assert plan["1024x16:float32"].decode_ms == pytest.approx({"plain": 1.0 * scale, "onednn": 2.0 * scale})
    assert plan["1024x16:float32"].prefill_ms == {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "onednn_plain": 4.0}
    assert plan["64x16:float32"].decode_ms == {"plain": 1.0, "onednn": 2.0}
