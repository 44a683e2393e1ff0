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


def test_the_bench_lm_head_is_timed_on_what_fits_in_64_mib_and_a_15b_mlp_weight_on_the_floor(monkeypatch):
    monkeypatch.setattr(kernel_timing, "decode_set_bytes", lambda: 64 << 20)  # (two 32 MiB L3s, as on Zen 4)
    assert decode_rows(49152, 1024, 4) == 16384 and decode_rows(49152, 1024, 2) == 32768
    # (RESULTS.md: on 16384 of the lm_head's rows the candidates ran as on all; on 2688 of this one's
    # MKL's packed layout ran 11-56% slower per row)
    assert decode_rows(24576, 6144, 4) == 16384, "not the 2688 rows that fit"
    assert decode_rows(49155, 1024, 1) == 49155, "a weight that fits whole, whatever its rows"


def test_a_large_weights_decode_times_come_from_its_first_rows_scaled_to_all(monkeypatch, decode_set):
    timed_rows, min_calls, starts = [], [], []
    real_calls = kernel_timing.decode_calls

    def decode_calls(weight, rows, kinds, *args, **kw):
        timed_rows.append(weight.shape[0])
        starts.append(weight.data_ptr())
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
    assert starts == [large.data_ptr(), small.data_ptr()], "its first rows"
    assert min_calls[0] == math.ceil(kernels.DECODE_MIN_CALLS * 1024 / 192), "a round streams the whole's bytes"
    assert min_calls[1:3] == [1, 1] and min_calls[3] == kernels.DECODE_MIN_CALLS, "prefill whole; the small one"
    scale = 1024 / 192
    assert plan["1024x16:float32"].decode_ms == pytest.approx({"plain": 1.0 * scale, "onednn": 2.0 * scale})
    assert plan["1024x16:float32"].prefill_ms == {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "onednn_plain": 4.0}
    assert plan["64x16:float32"].decode_ms == {"plain": 1.0, "onednn": 2.0}


def test_the_mlps_first_linear_is_timed_whole(monkeypatch, decode_set):
    """Its GELU's form (split or fused) depends on the output's size: a slice could time the other."""
    timed_rows = []
    real_calls = kernel_timing.decode_calls
    monkeypatch.setattr(kernels, "decode_calls", lambda weight, *a, **k: timed_rows.append(weight.shape[0])
                        or real_calls(weight, *a, **k))
    monkeypatch.setattr(kernels, "time_ms", lambda calls, on_progress=lambda: None, min_calls=1:
                        {name: 1.0 for name in calls})
    monkeypatch.setattr(kernels, "decode_candidates", lambda w, rows=1: ("plain",))
    weights = {"1024x16:float32": torch.randn(1024, 16)}
    kernels.measure(weights, 1, lambda t: t, prefill=set(), activated={"1024x16:float32": "gelu_pytorch_tanh"})
    kernels.measure(weights, 1, lambda t: t, prefill=set())
    assert timed_rows == [1024, 192], "activated: whole; the same weight not activated: its first rows"
