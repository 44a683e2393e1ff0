"""Decode attention by attend.c (decode_attention.py): SDPA's values for every head layout the
models have, masked keys' values never read, taken only where the calibration measured it faster, by
every rank alike, and a model's tokens unchanged by it."""
import math
import types

import pytest
import torch
import torch.nn.functional as F

from starcoder_tp import attention, decode_attention, forms, kernel_timing, kernels
from starcoder_tp.comm import TPGroup
from starcoder_tp.decode_attention import DECODE_FORM, attend, calibrate_decode, supports
from starcoder_tp.device import Device
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.timing import timed_generate

needs_kernel = pytest.mark.skipif(not decode_attention.available(),
                                  reason="attend.c not built or no AVX-512 on this CPU (SDPA runs instead)")


@pytest.fixture
def decode_form(monkeypatch):
    """DECODE_FORM as a fresh process has it; restored afterwards."""
    monkeypatch.setattr(DECODE_FORM, "ours", False)
    monkeypatch.setattr(DECODE_FORM, "calibrated", "")
    return DECODE_FORM


def _step(batch, heads, kv_heads, dim, keys_len, dtype, masked=False, seed=0):
    """q as a view of the fused q/k/v row, keys and values as a slice of a longer cache whose
    unwritten slots (and, with `masked`, the masked ones) hold NaN: attend.c must never read those values
    nor use those keys' scores."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q = fused[..., :heads * dim].view(batch, 1, heads, dim)
    cache = torch.randn(2, batch, kv_heads, keys_len + 5, dim, generator=gen).to(dtype)
    cache[:, :, :, keys_len:] = float("nan")
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, keys_len, generator=gen) > 0.4
        mask[..., -1] = True  # (the new token always sees itself)
        hidden = ~mask[:, 0, 0].unsqueeze(1).expand(batch, kv_heads, keys_len)
        cache[0, :, :, :keys_len][hidden] = float("nan")
        cache[1, :, :, :keys_len][hidden] = float("nan")
    return q, cache[0, :, :, :keys_len], cache[1, :, :, :keys_len], mask


def _sdpa(q, keys, values, mask, scale):
    b, _, h, d = q.shape
    kv = keys.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, kv, h // kv, d).double(), keys.nan_to_num().double(),
                                         values.nan_to_num().double(), attn_mask=mask, scale=scale)
    return out.reshape(b, 1, h * d)


# (batch, heads, kv heads, head dim, keys): StarCoder's multi-query (heads in one vector, and more
# than 16: two), StarCoder2's grouped (G = 12, 9), multi-head (G = 1), a key count off the 4-key step.
SHAPES = [(16, 16, 1, 64, 144), (2, 24, 1, 64, 300), (3, 24, 2, 128, 37), (1, 36, 4, 128, 9), (4, 5, 5, 16, 1),
          (2, 48, 1, 128, 70), (2, 20, 1, 48, 11), (3, 4, 2, 16, 13)]  # (the last two: a head_dim of 16 and 48,
# not a whole number of 32-element blocks, over an odd number of keys)
# attend_few.c's head counts (G <= 8): the StarCoder2 bench model's 4 of 128 (and one rank's of it), each other
# G with head dims of 16 to 128, key counts on and off its 16 / G keys a block, odd and even.
FEW_SHAPES = [(16, 8, 2, 128, 152), (2, 4, 1, 128, 33), (3, 24, 8, 48, 21), (2, 14, 2, 64, 40), (2, 40, 5, 16, 7),
              (5, 12, 2, 32, 17), (2, 5, 1, 64, 6), (1, 16, 2, 16, 2), (2, 4, 4, 64, 37)]


@pytest.fixture(params=[0, 8], ids=["vertical", "few"])
def few(request):
    """attend.c's vertical form for every head count, or attend_few.c's up to 8 heads (the default)."""
    if not decode_attention.available():
        pytest.skip("attend.c not built or no AVX-512 on this CPU (SDPA runs instead)")
    previous = decode_attention.few_heads(request.param)
    yield request.param
    decode_attention.few_heads(previous)


@needs_kernel
@pytest.mark.parametrize("form", ["float32", "bfloat16 widened", "bfloat16 dot"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES + FEW_SHAPES)
def test_attend_gives_sdpas_values_and_never_reads_a_masked_key(shape, masked, form, few):
    if form == "bfloat16 dot" and not decode_attention.bf16_dot():
        pytest.skip("no AVX512_BF16 on this CPU: bf16 runs widened to fp32")
    dtype = torch.float32 if form == "float32" else torch.bfloat16
    batch, heads, kv_heads, dim, keys_len = shape
    q, keys, values, mask = _step(batch, heads, kv_heads, dim, keys_len, dtype, masked)
    assert supports(q, keys, values, mask)
    got = attend(q, keys, values, mask, 1 / math.sqrt(dim), dot=None if form == "float32" else form.endswith("dot"))
    assert got.shape == (batch, 1, heads * dim) and got.dtype == dtype and torch.isfinite(got).all()
    want = _sdpa(q, keys, values, mask, 1 / math.sqrt(dim))
    err = (got.double() - want).abs()
    if form == "float32":
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    elif form == "bfloat16 widened":  # fp32 sums, rounded to bf16 once: within one bf16 rounding of the exact values
        assert (err <= want.abs() * 2 ** -8 + 1e-6).all(), err.max()
    else:  # the probabilities rounded to bf16 too (as SDPA's bf16 kernel takes them): each term p v within one
        # rounding, so the error is bounded by sum(p |v|), which cancellation in the sum does not shrink
        spread = _sdpa(q, keys, values.abs(), mask, 1 / math.sqrt(dim))
        assert (err <= (want.abs() + spread) * 2 ** -8 + 1e-6).all(), (err / (want.abs() + spread)).max() * 2 ** 8


@needs_kernel
def test_the_bf16_dot_path_is_taken_where_asked_and_refused_where_the_cpu_lacks_it(monkeypatch):
    q, keys, values, _ = _step(2, 16, 1, 64, 300, torch.bfloat16)
    if decode_attention.bf16_dot():  # (the rounded probabilities: other bits than the widened path's)
        assert not torch.equal(attend(q, keys, values, None, 0.125, dot=True),
                               attend(q, keys, values, None, 0.125, dot=False)), "dot=True ran the widened path"
    monkeypatch.setattr(decode_attention, "bf16_dot", lambda: False)
    with pytest.raises(ValueError, match="dot=True, but this CPU"):
        attend(q, keys, values, None, 0.125, dot=True)
    fp32 = [t.float() for t in (q, keys, values)]
    assert attend(*fp32, None, 0.125, dot=True).dtype == torch.float32, "fp32 has no dot path to refuse"
    for scale in (0.0, -0.125, float("nan")):
        with pytest.raises(ValueError, match="expected a finite scale > 0"):
            attend(q, keys, values, None, scale)


@needs_kernel
def test_few_heads_run_attend_few_c_up_to_the_set_count_and_the_vertical_form_above():
    """The two forms add in other orders: other bits for the same heads in fp32, which shows which one ran
    (in bf16 the output's rounding hides it: the next test counts attend_few.c's calls)."""
    def both(heads, kv_heads):
        q, keys, values, mask = _step(4, heads, kv_heads, 64, 50, torch.float32, masked=True)
        previous = decode_attention.few_heads(0)
        try:
            vertical = attend(q, keys, values, mask, 0.125)
            decode_attention.few_heads(heads // kv_heads)
            at_most = attend(q, keys, values, mask, 0.125)
            decode_attention.few_heads(heads // kv_heads - 1)
            below = attend(q, keys, values, mask, 0.125)
        finally:
            decode_attention.few_heads(previous)
        return vertical, at_most, below
    for heads, kv_heads in ((8, 2), (8, 1), (6, 3)):
        vertical, few, below = both(heads, kv_heads)
        g = heads // kv_heads
        assert not torch.equal(vertical, few), f"G={g}: few_heads({g}) ran the vertical form"
        assert torch.equal(vertical, below), f"G={g}: a count below G ran attend_few.c"
    assert decode_attention.few_heads(decode_attention.FEW_HEADS) == decode_attention.FEW_HEADS, "the default"
    for bad in (-1, decode_attention.FEW_HEADS + 1, 2.0, True):
        with pytest.raises(ValueError, match=f"most={bad!r}, expected an int from 0 to"):
            decode_attention.few_heads(bad)
    lib, _ = decode_attention.rowdot.library()
    lib.attend_few_heads(99)
    assert lib.attend_few_heads(decode_attention.FEW_HEADS) == decode_attention.FEW_HEADS, \
        "attend_few.h's ATTEND_FEW_MAX and decode_attention.FEW_HEADS differ"


@needs_kernel
@pytest.mark.parametrize("form", ["float32", "bfloat16 widened", "bfloat16 dot"])
def test_every_form_runs_attend_few_c_for_a_few_heads_and_not_for_more(form):
    """In bf16 the output's rounding hides which form ran; attend_few.c counts its calls."""
    if form == "bfloat16 dot" and not decode_attention.bf16_dot():
        pytest.skip("no AVX512_BF16 on this CPU: bf16 runs widened to fp32")
    dtype = torch.float32 if form == "float32" else torch.bfloat16
    dot = None if form == "float32" else form.endswith("dot")
    for (batch, heads, kv_heads), runs in (((3, 8, 2), 6), ((2, 8, 1), 2), ((2, 16, 1), 0), ((2, 24, 2), 0)):
        q, keys, values, mask = _step(batch, heads, kv_heads, 64, 20, dtype, masked=True)
        before = decode_attention.few_runs()
        attend(q, keys, values, mask, 0.125, dot=dot)
        assert decode_attention.few_runs() - before == runs, f"{heads} heads over {kv_heads} K/V heads"


@needs_kernel
def test_a_mask_of_one_row_broadcasts_over_the_batch():
    q, keys, values, _ = _step(3, 16, 1, 64, 20, torch.float32)
    mask = torch.ones(1, 1, 1, 20, dtype=torch.bool)
    mask[..., :7] = False
    got = attend(q, keys, values, mask, 0.125)
    torch.testing.assert_close(got.double(), _sdpa(q, keys, values, mask.expand(3, 1, 1, 20), 0.125), rtol=2e-6,
                               atol=2e-6)


def test_what_attend_c_does_not_take_is_left_to_sdpa_and_named_when_forced():
    q, keys, values, _ = _step(2, 8, 1, 64, 10, torch.float32)
    assert not supports(q.half(), keys.half(), values.half(), None), "fp16"
    q24, k24, v24, _ = _step(2, 8, 1, 24, 10, torch.float32)
    assert not supports(q24, k24, v24, None), "a head dim off the vector width"
    assert not supports(q, keys.transpose(2, 3).contiguous().transpose(2, 3), values, None), "key rows not contiguous"
    assert not supports(q, keys, values, torch.ones(2, 1, 1, 9, dtype=torch.bool)), "a mask of another length"
    assert not supports(q, keys, values, torch.ones(2, 1, 1, 10)), "a float mask"
    with pytest.raises(ValueError, match=r"q \[2, 1, 8, 64\] torch.float16 .* not what attend.c takes"):
        attend(q.half(), keys.half(), values.half(), None, 0.125)


def _fake_timings(monkeypatch, ours_ms, sdpa_ms, ours_by_repeat=None):
    """time_across_ranks faked: ours_ms and sdpa_ms a shape at every repeat, or ours_by_repeat[i] at the i-th."""
    seen = []

    def time_across_ranks(calls_by_size, slowest, on_progress):
        ours = ours_ms if ours_by_repeat is None else ours_by_repeat[len(seen)]
        seen.append([sorted(c) for c in calls_by_size])
        for calls in calls_by_size:
            for call in calls.values():
                call()  # the real callables run once: they must work
        return [{"ours": o, "sdpa": s} for o, s in zip(ours, sdpa_ms)]
    monkeypatch.setattr(kernel_timing, "time_across_ranks", time_across_ranks)
    return seen


@needs_kernel
@pytest.mark.parametrize("ours_ms, taken", [((1.0, 2.0), True), ((1.0, 5.0), False), ((3.0, 2.0), False)])
def test_calibrate_takes_attend_c_only_where_it_was_faster_at_every_shape(decode_form, monkeypatch, ours_ms, taken):
    seen = _fake_timings(monkeypatch, ours_ms, (2.0, 4.0))
    result = calibrate_decode(16, 1, 64, lambda t: t)
    assert decode_form.ours is taken and result.startswith("ours" if taken else "sdpa")
    assert seen == [[["ours", "sdpa"]] * len(decode_attention.CALIBRATION_SHAPES)] * decode_attention.REPEATS
    assert calibrate_decode(16, 1, 64, lambda t: t) == result and len(seen) == decode_attention.REPEATS, \
        "once per process"


@needs_kernel
@pytest.mark.parametrize("slower_repeats, taken", [(1, True), (2, True), (3, False)])
def test_calibrate_goes_by_each_shapes_median_over_the_repeats(decode_form, monkeypatch, slower_repeats, taken):
    """ours 4.5% faster at the short shape but for `slower_repeats` disturbed repeats, 2% slower in those:
    a verdict of the median repeat, not of one (once, a tie at the short shape ran the step's attention
    between two fused calls)."""
    assert decode_attention.REPEATS == 5
    disturbed, calm = (0.0112, 0.4), (0.0105, 0.4)
    by_repeat = [disturbed] * slower_repeats + [calm] * (decode_attention.REPEATS - slower_repeats)
    _fake_timings(monkeypatch, None, (0.011, 0.7), by_repeat)
    result = calibrate_decode(8, 1, 64, lambda t: t)
    assert decode_form.ours is taken, result
    shown_ratio = "0.95" if taken else "1.02"
    assert result.startswith(f"{'ours' if taken else 'sdpa'} (attend.c vs sdpa: 1x128: ") and \
        f"ours/sdpa {shown_ratio}, 16x1024: 0.400 vs 0.700 ms, ours/sdpa 0.57)" in result, result


def test_a_rank_that_cannot_run_it_makes_every_rank_run_sdpa(decode_form, monkeypatch):
    seen = _fake_timings(monkeypatch, (1.0, 1.0), (2.0, 2.0))
    another_rank_lacks_it = lambda t: torch.ones_like(t)  # noqa: E731 (the max over ranks of "cannot")
    assert calibrate_decode(16, 1, 64, another_rank_lacks_it).startswith("sdpa")
    assert decode_form.ours is False and seen == [], "nothing timed: the ranks agree first"


def test_attention_runs_attend_c_only_once_calibrated_so(decode_form, monkeypatch):
    taken = []
    monkeypatch.setattr(decode_attention, "run", lambda *a: taken.append(1) or torch.zeros(2, 1, 8 * 64))
    monkeypatch.setattr(decode_attention, "supports", lambda *a: True)
    q, keys, values, _ = _step(2, 8, 1, 64, 10, torch.float32)
    attention.attend(q, keys, values, None, 0.125)
    assert taken == []
    decode_form.ours = True
    attention.attend(q, keys, values, None, 0.125)
    assert taken == [1]
    qs, ks, vs = torch.randn(2, 3, 8, 64), torch.randn(2, 1, 3, 64), torch.randn(2, 1, 3, 64)
    attention.attend(qs, ks, vs, None, 0.125)
    assert taken == [1], "a prefill (several tokens): SDPA or the blocks"


def test_calibrate_forms_measures_the_decode_form_in_the_models_dtype_and_caches_it(decode_form, monkeypatch,
                                                                                    tmp_path):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path))
    calls = []

    def measured(heads, kv_heads, dim, slowest, dtype, on_progress):
        calls.append((heads, kv_heads, dim, dtype))
        decode_form.ours, decode_form.calibrated = True, "ours (...)"
        return decode_form.calibrated
    monkeypatch.setattr(forms, "calibrate_decode", measured)
    monkeypatch.setattr(attention.PREFILL_FORM, "calibrated", "set by the test")
    tp = types.SimpleNamespace(max_=lambda t: t, world_size=1)
    gqa = types.SimpleNamespace(local_heads=12, local_kv_heads=2, head_dim=128)
    forms.calibrate_forms({"8x8:bfloat16": torch.ones(8, 8, dtype=torch.bfloat16)}, {}, tp, gqa)
    assert calls == [(12, 2, 128, torch.bfloat16)]
    decode_form.ours, decode_form.calibrated = False, ""  # another process on this machine
    forms.calibrate_forms({"8x8:bfloat16": torch.ones(8, 8, dtype=torch.bfloat16)}, {}, tp, gqa)
    assert len(calls) == 1 and decode_form.ours and decode_form.calibrated == "cached: ours (...)"
    assert "attention:decode ours" in kernels.describe({}).split("; ")


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_keeps_its_tokens_with_attend_c(tmp_path, embedded_dir, prompts, decode_form, dtype):
    """Left-padded prompts (a mask at every step): fp32 keeps SDPA's tokens and top logprobs;
    bf16's top logprobs stay within bf16's resolution of SDPA's."""
    from starcoder_tp.testing.compare import check_topk_close
    from starcoder_tp.testing.runners import GreedyOutput

    shard_checkpoint(embedded_dir, tmp_path / "s", 1, dtype)
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    decode_form.calibrated = "set by the test"  # use_kernels measures nothing
    taken = []
    real = decode_attention.run
    runs = {}
    for ours in (False, True):
        decode_form.ours = ours
        attention.decode_attention.run = lambda *a: taken.append(1) or real(*a)
        try:
            r = timed_generate(model, Device("cpu"), prompts, 12, topk=5)
        finally:
            attention.decode_attention.run = real
        runs[ours] = r
    assert len(taken) == 11 * model.config.n_layer, "every layer of every decode step, in the second run"
    if dtype == "float32":
        assert torch.equal(runs[False].output_ids, runs[True].output_ids)
        torch.testing.assert_close(runs[False].topk_logprobs, runs[True].topk_logprobs, rtol=1e-4, atol=1e-4)
    else:
        outs = {k: GreedyOutput(output_ids=r.output_ids.tolist(), topk_ids=r.topk_ids.tolist(),
                                topk_logprobs=r.topk_logprobs.tolist()) for k, r in runs.items()}
        check_topk_close(outputs_0=outs[False], outputs_1=outs[True], name_0="sdpa-bf16", name_1="attend.c-bf16")
