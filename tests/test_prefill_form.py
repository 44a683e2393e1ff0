"""The causal prefill's second form (attention.causal_blocks), for one K/V head a rank and for grouped
ones: SDPA's values, taken only where the calibration measured that it pays, for the K/V head count it
measured, by every rank alike, and named in the plan."""
import json
import types

import pytest
import torch

from starcoder_tp import attention, forms, kernels, softmax
from starcoder_tp.attention import PREFILL_FORM, attend, blocks_at, calibrate_attention, causal_blocks, fastest
from starcoder_tp.comm import TPGroup
from starcoder_tp.device import Device
from starcoder_tp.files import EMBEDDED_MODEL_DIR, STARCODER2_MODEL_DIR
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.timing import timed_generate


@pytest.fixture
def form_state(monkeypatch):
    """PREFILL_FORM as a fresh process has it; restored afterwards."""
    monkeypatch.setattr(PREFILL_FORM, "blocks_at", frozenset())
    monkeypatch.setattr(PREFILL_FORM, "rows", attention.BLOCK_ROWS)
    monkeypatch.setattr(PREFILL_FORM, "batched_rows", attention.BLOCK_ROWS)
    monkeypatch.setattr(PREFILL_FORM, "calibrated", "")
    monkeypatch.setattr(PREFILL_FORM, "dtype", torch.float32)
    monkeypatch.setattr(PREFILL_FORM, "softmax", "torch")
    monkeypatch.setattr(PREFILL_FORM, "kv_heads", 1)
    return PREFILL_FORM


SOFTMAXES = ["torch", pytest.param("ours", marks=pytest.mark.skipif(
    not softmax.available(torch.float32), reason="softmax.c needs AVX-512 and a C compiler: not run here"))]


def _qkv(batch: int, tokens: int, heads: int, dim: int = 64, dtype=torch.float32, kv: int = 1):
    """q [B, T, H, D] (strided, as the model's view of its q/k/v rows), keys and values [B, KV, T, D]."""
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(batch, tokens, heads + 2 * kv, dim, generator=gen).to(dtype)[:, :, :heads]
    keys = torch.randn(batch, kv, tokens, dim, generator=gen).to(dtype)
    values = torch.randn(batch, kv, tokens, dim, generator=gen).to(dtype)
    return q, keys, values


@pytest.mark.parametrize("batch, tokens, heads, block, kv", [
    (1, 7, 4, 32, 1), (2, 33, 16, 32, 1), (1, 100, 8, 8, 1), (3, 64, 2, 16, 1),  # multi-query
    (2, 33, 8, 32, 2), (1, 70, 12, 16, 3), (2, 40, 4, 8, 4),  # grouped (StarCoder2's), and no K/V head shared
    (2, 150, 4, 64, 1), (1, 300, 8, 128, 2)])  # the calibrated sizes, over a last block cut short
@pytest.mark.parametrize("softmax_form", SOFTMAXES)
def test_causal_blocks_give_sdpa_values(batch, tokens, heads, block, kv, softmax_form, form_state):
    q, keys, values = _qkv(batch, tokens, heads, kv=kv)
    sdpa = attend(q, keys, values, None, 0.125)  # uncalibrated: SDPA
    form_state.softmax = softmax_form
    blocks = causal_blocks(q, keys, values, 0.125, block)
    assert blocks.shape == sdpa.shape == (batch, tokens, heads * 64)
    torch.testing.assert_close(blocks, sdpa, rtol=2e-6, atol=2e-6)
    exact = attend(q.double(), keys.double(), values.double(), None, 0.125)
    torch.testing.assert_close(blocks.double(), exact, rtol=2e-6, atol=2e-6)


def test_causal_blocks_in_bf16_are_as_close_to_the_exact_values_as_sdpas(form_state):
    """bf16 rounds the scores and the weights of each block: the error stays of bf16's size,
    (measured 3.1-3.6e-3 of the norm, SDPA's 1.9-2.0e-3, at 128-1024 tokens)."""
    for kv in (1, 2):
        q, keys, values = _qkv(2, 200, 16, dtype=torch.bfloat16, kv=kv)
        exact = attend(q.double(), keys.double(), values.double(), None, 0.125)
        for out in (causal_blocks(q, keys, values, 0.125), attend(q, keys, values, None, 0.125)):
            assert out.dtype == torch.bfloat16
            assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-2


def test_attend_takes_the_blocks_only_where_calibrated(form_state, monkeypatch):
    taken = []
    real = attention.causal_blocks
    monkeypatch.setattr(attention, "causal_blocks", lambda *a, **k: taken.append(a[0].shape[1]) or real(*a, **k))
    q, keys, values = _qkv(1, 40, 4)
    attend(q, keys, values, None, 0.125)
    assert not taken, "uncalibrated: SDPA"
    form_state.blocks_at, form_state.rows = frozenset({64, 512}), 8  # (a block size of the test's own)
    sizes = []
    monkeypatch.setattr(attention, "causal_blocks", lambda *a, **k: sizes.append(a[4]) or real(*a, **k))
    out = attend(q, keys, values, None, 0.125)  # 40 tokens: nearest to 64 of the lengths timed
    attend(*_qkv(1, 400, 2), None, 0.125)  # nearest 512
    assert sizes == [8, 8], "the block size calibrated for one sequence, at 64 and 512 tokens"
    form_state.batched_rows = 16
    attend(*_qkv(2, 40, 4), None, 0.125)
    assert sizes == [8, 8, 16], "a batch: the block size calibrated for batches"
    attend(*_qkv(2, 200, 4), None, 0.125)  # nearest 256: SDPA there, for a batch too
    attend(*_qkv(1, 200, 4), None, 0.125)
    assert sizes == [8, 8, 16]
    monkeypatch.setattr(attention, "causal_blocks", lambda *a, **k: taken.append(a[0].shape[1]) or real(*a, **k))
    taken.clear()
    out = attend(q, keys, values, None, 0.125)
    assert taken == [40]
    torch.testing.assert_close(out, real(q, keys, values, 0.125, 8))
    for tokens in (90, 91, 181, 362, 363, 724, 2000):  # nearest 64, 128, 128, 256, 512, 512, 1024
        attend(*_qkv(1, tokens, 2), None, 0.125)
    assert taken == [40, 90, 363, 724], "the nearest length's form, by ratio"
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    attend(q, keys, values, mask, 0.125)  # padded batches keep SDPA with their mask
    grouped_keys, grouped_values = keys.expand(1, 2, 40, 64), values.expand(1, 2, 40, 64)
    attend(q, grouped_keys.contiguous(), grouped_values.contiguous(), None, 0.125)  # calibrated for one K/V head
    attend(*_qkv(1, 40, 4, dtype=torch.bfloat16), None, 0.125)  # calibrated in fp32: bf16 keeps SDPA
    assert taken == [40, 90, 363, 724], "with a mask, with several K/V heads, in another dtype: SDPA"
    form_state.kv_heads = 2  # a grouped model's calibration: its two K/V heads take the blocks, one does not
    grouped = _qkv(1, 40, 4, kv=2)
    out = attend(*grouped, None, 0.125)
    attend(*_qkv(1, 90, 4), None, 0.125)  # (90 tokens: nearest 64 too)
    assert taken == [40, 90, 363, 724, 40], "the grouped call, not the multi-query one"
    torch.testing.assert_close(out, real(*grouped, 0.125))
    form_state.kv_heads = 4
    attend(*_qkv(1, 40, 4, kv=4), None, 0.125)  # a K/V head per query head: nothing to share, SDPA
    assert taken == [40, 90, 363, 724, 40]
    form_state.kv_heads = 1
    form_state.dtype = torch.bfloat16  # a bf16 model's calibration
    dtypes = []
    monkeypatch.setattr(attention, "causal_blocks", lambda *a, **k: dtypes.append(a[0].dtype) or real(*a, **k))
    attend(*_qkv(1, 40, 4, dtype=torch.bfloat16), None, 0.125)
    attend(q, keys, values, None, 0.125)
    assert dtypes == [torch.bfloat16], "the calibrated dtype only"


@pytest.mark.parametrize("sdpa, blocks, expected", [
    ([1.0, 4.0, 20.0], [0.9, 3.0, 15.0], {64, 256, 1024}),
    ([1.0, 4.0, 20.0], [1.0, 3.0, 21.0], {256}),  # a tie is not a gain
    ([1.0, 4.0, 20.0], [1.1, 4.5, 25.0], set()),
])
def test_blocks_at_timings(sdpa, blocks, expected):
    assert blocks_at(sdpa, blocks, (64, 256, 1024)) == frozenset(expected)


@pytest.mark.parametrize("per_shape, expected", [
    ([{"a": 1.0, "b": 2.0}, {"a": 10.0, "b": 8.5}], "a"),  # b: less time in all, but 2x at the first shape
    ([{"a": 2.0, "b": 1.0}, {"a": 8.5, "b": 10.0}], "b"),
    ([{"a": 1.0, "b": 1.0}], "a"),  # a tie: the first
    ([{"a": 0.0, "b": 0.0}, {"a": 2.0, "b": 1.0}], "b"),  # (a shape timed at nothing does not divide by 0)
])
def test_fastest_weighs_each_shape_alike(per_shape, expected):
    assert fastest(per_shape) == expected


def test_blocks_at_refuses_mismatched_timings():
    with pytest.raises(ValueError, match=r"2 and 3 timings"):
        blocks_at([1.0, 2.0], [1.0, 2.0, 3.0], (64, 256, 1024))


@pytest.mark.parametrize("ours_runs", [False, pytest.param(True, marks=SOFTMAXES[1].marks)])
def test_calibrate_attention_takes_the_slowest_ranks_timings_once(form_state, monkeypatch, ours_runs):
    monkeypatch.setattr(attention.causal_softmax, "available", lambda dtype: ours_runs)  # (True: it runs here)
    assert attention.BLOCK_CHOICES == (32, 64, 128) and attention.SWEEP_TOKENS == (128, 512)
    # Another rank's timings. The sweep, at 128 and 512 tokens, per softmax and block size: 64 a
    # block the least time relative to each length's fastest (128 less time in all), ours 0.8x torch's.
    sizes = {32: [0.8, 12.0], 64: [0.5, 10.0], 128: [1.0, 9.0]}
    sweep = [[1.25 * sizes[rows][i] for rows in (32, 64, 128)] + ([sizes[rows][i] for rows in (32, 64, 128)]
                                                                   if ours_runs else []) for i in range(2)]
    # Then SDPA against those blocks at 64..1024 tokens: the blocks win at 128, 256 and 512.
    lengths = [[0.2, 0.3], [0.6, 0.5], [2.0, 1.5], [8.0, 6.0], [20.0, 21.0]]
    # Then each block size for batches, at 16 x 128 and 4 x 256 tokens: 32 and 128 the least time in
    # all, 128 the least relative to each shape's fastest (2.03 against 32's 3 and 64's 2.6).
    batches = [2.0, 1.5, 1.0, 40.0, 44.0, 41.0]
    answers = [sum(sweep, []), sum(lengths, []), batches]
    seen = []

    def slowest(local: torch.Tensor) -> torch.Tensor:
        if local.numel() == 1:  # whether any rank lacks softmax.c: none does
            return local
        seen.append(local.clone())
        return torch.tensor(answers[(len(seen) - 1) % 3], dtype=torch.float64)

    ticks, calls = [], set()
    real = attention.causal_blocks
    monkeypatch.setattr(attention, "causal_blocks",
                        lambda *a, **k: calls.add((*a[0].shape[:2], a[4], k["softmax"])) or real(*a, **k))
    expected = "128,256,512"
    assert calibrate_attention(4, 64, slowest, on_progress=lambda: ticks.append(1), kv_heads=1).startswith(
        f"causal blocks at {expected} tokens, 64 a block, batches 128 a block")
    chosen = "ours" if ours_runs else "torch"
    assert {(rows, softmax) for b, t, rows, softmax in calls if b == 1 and t in (64, 256, 1024)} == {(64, chosen)}, \
        "the lengths are timed with the size and softmax the sweep chose"
    assert {softmax for b, t, _, softmax in calls if b > 1} == {chosen}, "the batches with that softmax"
    assert {(b, t) for b, t, _, _ in calls} == {(1, t) for t in attention.CALIBRATION_TOKENS} | {(16, 128), (4, 256)}
    sweep_slots = 6 if ours_runs else 3
    assert [t.shape for t in seen] == [(2 * sweep_slots,), (10,), (6,)], "the sweep, the lengths, the batches"
    assert all(bool((t > 0).all()) for t in seen), "this rank's own timings"
    assert len(ticks) >= 2 * sweep_slots + 10 + 6, "a rank's heartbeat ticks through the calibration (each timed call)"
    assert form_state.batched_rows == 128, "the batches' own size, not the sweep's"
    assert form_state.softmax == chosen
    assert form_state.blocks_at == frozenset({128, 256, 512}) and form_state.rows == 64
    assert calibrate_attention(4, 64, slowest, kv_heads=1) == form_state.calibrated and len(seen) == 3, \
        "once per process"
    assert kernels.describe({}).endswith(f"attention:mqa blocks@{expected} rows:64 batch:128" +
                                         (" softmax:ours" if ours_runs else ""))
    assert form_state.dtype == torch.float32
    form_state.calibrated = ""
    calibrate_attention(4, 64, slowest, torch.bfloat16, kv_heads=1)
    assert form_state.dtype == torch.bfloat16 and len(seen) == 6
    form_state.calibrated = ""
    calibrate_attention(4, 64, slowest, torch.float32, kv_heads=2)  # grouped: two K/V heads of two query heads
    assert form_state.kv_heads == 2 and len(seen) == 9
    assert kernels.describe({}).endswith(f"attention:gqa blocks@{expected} rows:64 batch:128" +
                                         (" softmax:ours" if ours_runs else ""))


def test_calibrate_forms_measures_attention_where_query_heads_share_k_v_heads_in_the_models_dtype(form_state,
                                                                                                monkeypatch):
    calls = []
    tick = lambda: None  # noqa: E731 - the rank's heartbeat, handed on to the calibration
    monkeypatch.setattr(attention, "calibrate_attention", lambda h, d, slowest, dtype, on_progress, kv_heads:
                        calls.append((h, kv_heads, d, dtype, on_progress)))
    tp = types.SimpleNamespace(max_=lambda t: t, world_size=1)
    fp32, bf16 = {"8x8:float32": torch.ones(8, 8)}, {"8x8:bfloat16": torch.ones(8, 8, dtype=torch.bfloat16)}
    mqa = types.SimpleNamespace(local_heads=8, local_kv_heads=1, head_dim=32)
    gqa = types.SimpleNamespace(local_heads=8, local_kv_heads=2, head_dim=32)
    mha = types.SimpleNamespace(local_heads=8, local_kv_heads=8, head_dim=32)  # no K/V head shared: SDPA
    forms.calibrate_forms(fp32, {}, tp, mha)
    forms.calibrate_forms(fp32, {}, tp, None)
    assert calls == []
    forms.calibrate_forms(fp32, {}, tp, mqa, tick)
    forms.calibrate_forms(bf16, {}, tp, mqa, tick)  # the fake measured nothing: calibrated again
    forms.calibrate_forms(fp32, {}, tp, gqa, tick)
    assert calls == [(8, 1, 32, torch.float32, tick), (8, 1, 32, torch.bfloat16, tick), (8, 2, 32, torch.float32, tick)]


@pytest.mark.parametrize("softmax_form", SOFTMAXES)
@pytest.mark.parametrize("fixture", [EMBEDDED_MODEL_DIR, STARCODER2_MODEL_DIR], ids=["multi-query", "starcoder2"])
def test_a_model_generates_the_same_tokens_with_either_form(tmp_path, fixture, prompts, form_state, monkeypatch,
                                                            softmax_form):
    shard_checkpoint(fixture, tmp_path / "s", 1)
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    kv_heads = model.transformer.h[0].attn.local_kv_heads
    assert kv_heads == (1 if fixture == EMBEDDED_MODEL_DIR else 2), "one K/V head; StarCoder2's grouped two"
    monkeypatch.setattr(PREFILL_FORM, "calibrated", "set by the test")  # use_kernels measures nothing
    same_length = [(p * 20)[:45] for p in prompts[:2]]  # no padding: the plain causal prefill
    sdpa = timed_generate(model, Device("cpu"), same_length, 8, topk=5)
    form_state.blocks_at, form_state.softmax = frozenset(attention.CALIBRATION_TOKENS), softmax_form
    form_state.kv_heads = kv_heads
    taken = []
    real = attention.causal_blocks
    monkeypatch.setattr(attention, "causal_blocks", lambda *a, **k: taken.append(1) or real(*a, **k))
    blocks = timed_generate(model, Device("cpu"), same_length, 8, topk=5)
    assert len(taken) == model.config.n_layer, "every layer's prefill"
    assert torch.equal(sdpa.output_ids, blocks.output_ids)
    torch.testing.assert_close(sdpa.topk_logprobs, blocks.topk_logprobs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("softmax_form", SOFTMAXES)
def test_a_bf16_model_keeps_the_top_5_rule_with_the_blocks(tmp_path, embedded_dir, prompts, form_state, monkeypatch,
                                                           softmax_form):
    from starcoder_tp.testing.compare import check_topk_close
    from starcoder_tp.testing.runners import GreedyOutput

    shard_checkpoint(embedded_dir, tmp_path / "s", 1, "bfloat16")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    monkeypatch.setattr(PREFILL_FORM, "calibrated", "set by the test")
    same_length = [(p * 20)[:45] for p in prompts[:2]]  # no padding: the plain causal prefill
    taken = []
    real = attention.causal_blocks
    monkeypatch.setattr(attention, "causal_blocks", lambda *a, **k: taken.append(a[0].dtype) or real(*a, **k))
    runs = {}
    for name, blocks in (("sdpa", frozenset()), ("blocks", frozenset(attention.CALIBRATION_TOKENS))):
        form_state.blocks_at, form_state.dtype, form_state.softmax = blocks, torch.bfloat16, softmax_form
        r = timed_generate(model, Device("cpu"), same_length, 16, topk=5)
        runs[name] = GreedyOutput(output_ids=r.output_ids.tolist(), topk_ids=r.topk_ids.tolist(),
                                  topk_logprobs=r.topk_logprobs.tolist())
    assert taken == [torch.bfloat16] * model.config.n_layer, "every layer's prefill, in bf16, in the second run"
    check_topk_close(outputs_0=runs["sdpa"], outputs_1=runs["blocks"], name_0="sdpa-bf16", name_1="blocks-bf16")


def test_the_forms_are_measured_once_per_machine_then_read_from_the_cache(form_state, monkeypatch, tmp_path):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))
    calls = []

    def measured(heads, dim, slowest, dtype, on_progress, *, kv_heads):
        calls.append((heads, dim))
        form_state.blocks_at, form_state.calibrated = frozenset({512}), "causal blocks at 512 tokens, 64 a block (...)"
        form_state.rows, form_state.batched_rows = 64, 128
        form_state.dtype, form_state.softmax, form_state.kv_heads = dtype, "ours", kv_heads
        return form_state.calibrated

    monkeypatch.setattr(attention, "calibrate_attention", measured)
    tp = types.SimpleNamespace(max_=lambda t: t, world_size=1)
    mqa = types.SimpleNamespace(local_heads=8, local_kv_heads=1, head_dim=32)
    forms.calibrate_forms({"8x8:float32": torch.ones(8, 8)}, {}, tp, mqa)
    assert calls == [(8, 32)] and len(list((tmp_path / "cache" / "forms").glob("*.json"))) == 1
    form_state.blocks_at, form_state.calibrated, form_state.softmax = frozenset(), "", "torch"  # another process
    form_state.rows = form_state.batched_rows = 32
    forms.calibrate_forms({"8x8:float32": torch.ones(8, 8)}, {}, tp, mqa)
    assert calls == [(8, 32)], "read from the cache, not measured again"
    assert form_state.blocks_at == frozenset({512})
    assert form_state.calibrated.startswith("cached: causal blocks at 512 tokens, 64 a block")
    assert (form_state.rows, form_state.batched_rows) == (64, 128)
    assert form_state.softmax == "ours"
    form_state.blocks_at, form_state.calibrated = frozenset(), ""
    missing = types.SimpleNamespace(max_=lambda t: torch.ones_like(t), world_size=1)  # another rank lacks them
    forms.calibrate_forms({"8x8:float32": torch.ones(8, 8)}, {}, missing, mqa)
    assert len(calls) == 2, "measured again with the rank that lacks them"
    form_state.blocks_at, form_state.calibrated = frozenset(), ""
    forms.calibrate_forms({"8x8:bfloat16": torch.ones(8, 8, dtype=torch.bfloat16)}, {}, tp, mqa)
    assert len(calls) == 3 and form_state.dtype == torch.bfloat16, "a bf16 model's form is its own"
    form_state.blocks_at, form_state.calibrated, form_state.dtype = frozenset(), "", torch.float32
    forms.calibrate_forms({"8x8:bfloat16": torch.ones(8, 8, dtype=torch.bfloat16)}, {}, tp, mqa)
    assert len(calls) == 3 and form_state.dtype == torch.bfloat16, "and cached as such"
    gqa = types.SimpleNamespace(local_heads=8, local_kv_heads=2, head_dim=32)
    form_state.blocks_at, form_state.calibrated, form_state.dtype = frozenset(), "", torch.float32
    forms.calibrate_forms({"8x8:float32": torch.ones(8, 8)}, {}, tp, gqa)
    assert len(calls) == 4 and form_state.kv_heads == 2, "grouped heads: a form of their own"
    form_state.blocks_at, form_state.calibrated, form_state.kv_heads = frozenset(), "", 1
    forms.calibrate_forms({"8x8:float32": torch.ones(8, 8)}, {}, tp, gqa)
    assert len(calls) == 4 and form_state.kv_heads == 2, "and read back for two K/V heads"
    assert kernels.describe({}).endswith("attention:gqa blocks@512 rows:64 batch:128 softmax:ours")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_call", [None, 1, 2], ids=["all", "one", "two"])
@pytest.mark.parametrize("kv", [1, 2])
def test_causal_blocks_of_a_batch_are_each_sequences_own(dtype, per_call, kv, monkeypatch):
    """The sequences run in batched calls (all at once, or in groups within SCORES_BYTES, the last
    group shorter): each one's rows are what it gives alone, keys and values read from a cache
    longer than the prompt (as the model's are)."""
    if per_call is not None:  # the scores of `per_call` sequences at the largest block fit, no more
        monkeypatch.setattr(attention, "SCORES_BYTES",
                            per_call * 32 * (8 // kv) * 70 * (4 if dtype == torch.float32 else 2))
    torch.manual_seed(0)
    q = torch.randn(3, 70, 8, 64).to(dtype)
    cache = torch.randn(2, 3, kv, 90, 64).to(dtype)
    keys, values = cache[0, :, :, :70], cache[1, :, :, :70]
    together = causal_blocks(q, keys, values, 0.125)
    for i in range(3):
        alone = causal_blocks(q[i:i + 1], keys[i:i + 1], values[i:i + 1], 0.125)
        torch.testing.assert_close(together[i:i + 1], alone, msg=lambda m, i=i: f"sequence {i}: {m}")


@pytest.mark.parametrize("stored", [
    {"blocks_at": [512], "rows": 64, "batched_rows": 32, "softmax": "fast"},
    {"blocks_at": [500], "rows": 64, "batched_rows": 32, "softmax": "ours"},
    {"blocks_at": [512.0], "rows": 64, "batched_rows": 32, "softmax": "ours"},
    {"blocks_at": [512, 512], "rows": 64, "batched_rows": 32, "softmax": "ours"},
    {"blocks_at": [[512, 64]], "rows": 64, "batched_rows": 32, "softmax": "ours"},
    {"blocks_at": [512], "rows": 48, "batched_rows": 32, "softmax": "ours"},
    {"blocks_at": [512], "rows": 64.0, "batched_rows": 32, "softmax": "ours"},
    {"blocks_at": [512], "rows": 64, "batched_rows": 48, "softmax": "ours"},
    {"blocks_at": [512], "rows": 64, "batched_rows": 64.0, "softmax": "ours"},
    {"blocks_at": 512, "rows": 64, "batched_rows": 32, "softmax": "ours"},
    {"blocks_at": [[512, 64]], "batched_rows": 32, "softmax": "ours"},  # (a size per length, as 8c0c3e7 wrote)
    {"blocks_at": [512], "batched_rows": 32, "softmax": "ours"},  # (no block size for one sequence)
    {"blocks_at": [512], "rows": 64, "softmax": "ours"},  # (no block size for batches)
    {"blocks_at": [512], "softmax": "ours"},  # (the lengths alone, as before the block sizes were timed)
    {"softmax": "ours"}, None, "no 'mqa' line"])
def test_a_cached_prefill_form_that_is_not_one_is_measured_again(form_state, monkeypatch, tmp_path, stored):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))
    calls = []

    def measured(heads, dim, slowest, dtype, on_progress, *, kv_heads):
        calls.append(heads)
        form_state.blocks_at, form_state.calibrated, form_state.softmax = frozenset({512}), "measured", "ours"
        return form_state.calibrated

    monkeypatch.setattr(attention, "calibrate_attention", measured)
    tp = types.SimpleNamespace(max_=lambda t: t, world_size=1)
    mqa = types.SimpleNamespace(local_heads=8, local_kv_heads=1, head_dim=32)
    forms.calibrate_forms({"8x8:float32": torch.ones(8, 8)}, {}, tp, mqa)
    path = next((tmp_path / "cache" / "forms").glob("*.json"))
    cached = json.loads(path.read_text())
    if stored == "no 'mqa' line":  # (the plan's line, read after the ranks agreed the cache is whole)
        del cached["forms"]["mqa"]
    else:
        cached["forms"]["prefill_form"] = stored
    path.write_text(json.dumps(cached))
    form_state.blocks_at, form_state.calibrated, form_state.softmax = frozenset(), "", "torch"
    forms.calibrate_forms({"8x8:float32": torch.ones(8, 8)}, {}, tp, mqa)
    assert calls == [8, 8], f"a cached {stored!r} was taken"
    assert form_state.calibrated == "measured" and form_state.softmax == "ours"


@pytest.mark.parametrize("lacking", [0.0, 1.0])
def test_softmax_c_is_timed_only_where_no_rank_lacks_it(form_state, monkeypatch, lacking):
    monkeypatch.setattr(attention.causal_softmax, "available", lambda dtype: True)
    monkeypatch.setattr(attention, "causal_blocks", lambda *a, **k: None)  # (no time: the blocks win at every length)
    timed = []

    def slowest(local: torch.Tensor) -> torch.Tensor:
        if local.numel() == 1:
            return torch.tensor([lacking], dtype=torch.float64)  # another rank's answer
        timed.append(local.numel())
        return local

    calibrate_attention(4, 64, slowest, kv_heads=1)
    assert timed == [12 if not lacking else 6, 10, 6], \
        "each softmax's blocks of each size at two lengths; sdpa and the blocks at five; each size at two batches"
    assert form_state.softmax == "torch" or not lacking


def test_a_calibration_without_blocks_keeps_no_batch_size_of_an_earlier_one(form_state, monkeypatch):
    """SDPA at every length: the form is SDPA's, and what it caches reads back as the same."""
    monkeypatch.setattr(attention.causal_softmax, "available", lambda dtype: False)
    form_state.rows = form_state.batched_rows = 128  # an earlier calibration's

    def slowest(local: torch.Tensor) -> torch.Tensor:
        if local.numel() == 10:  # per length: sdpa, then the blocks
            return torch.tensor([0.1, 1.0] * 5, dtype=torch.float64)
        return local  # (the sweep)

    assert calibrate_attention(4, 64, slowest, kv_heads=1).startswith("sdpa")
    assert form_state.blocks_at == frozenset() and form_state.rows == form_state.batched_rows == attention.BLOCK_ROWS
    assert PREFILL_FORM.parse(form_state.state()) == (frozenset(), attention.BLOCK_ROWS, attention.BLOCK_ROWS, "torch")
