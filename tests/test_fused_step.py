"""fused_step.py: a decode step's layers in one call of fused_step.c, where every linear runs in
panels and the attention by attend.c (where it does not run, SDPA between two calls). The logits of
the layers run op by op, step after step, at
world size 1 and across two (stand-in) ranks; when a model fuses and when it runs op by op, and
that a new layout or cache makes it decide again."""
import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from starcoder_tp import decode_attention, fused_step
from starcoder_tp.comm import TPGroup
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint

from test_panels import each

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


class Doubling(TPGroup):
    """Rank 0 of two whose partner's partial sums equal its own: each all-reduce doubles. Enough for
    both paths to run the same collectives on the same partials in the same order."""

    def __init__(self):
        super().__init__(0, 2)

    def _sum_across_ranks(self, t: torch.Tensor) -> None:
        t.mul_(2)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return t


@pytest.fixture(autouse=True)
def attend_c(monkeypatch):
    """Decode attention by attend.c where it runs, whatever this machine measured faster. A CPU without it
    (AVX2 only) fuses its steps with the attention between two calls (SDPA): every test here but those
    marked `needs_attend_c` runs there too."""
    monkeypatch.setattr(decode_attention.DECODE_FORM, "calibrated", "ours (test)")
    monkeypatch.setattr(decode_attention.DECODE_FORM, "ours", decode_attention.available())
    monkeypatch.delenv(fused_step.ENV, raising=False)


needs_attend_c = pytest.mark.skipif(not decode_attention.available(),
                                    reason="attend.c needs AVX-512 and a C compiler: this CPU or build does not run it")


def tiny(tmp_path, dtype: torch.dtype, world_size: int = 1, kernels: str = "panels", name: str = "tiny-starcoder"):
    out = tmp_path / f"{name}-{world_size}-{dtype}"
    if not out.exists():
        shard_checkpoint(FIXTURES / name, out, world_size, dtype=str(dtype).removeprefix("torch."))
    tp = TPGroup(0, 1) if world_size == 1 else Doubling()
    return load_model(out, tp, torch.device("cpu"), kernels=kernels)


def decode_logits(model, batch: int, fused: bool, steps: int = 6, prompt: int = 9) -> torch.Tensor:
    """[steps, B, V] logits of `steps` decode steps after a prompt, the tokens fed the same (seeded)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6000, (batch, prompt + steps), generator=generator)
    positions = torch.arange(prompt + steps).expand(batch, -1)
    out = []
    with torch.inference_mode():
        model.setup_cache(batch, prompt + steps)
        model(ids[:, :prompt], positions[:, :prompt], 0)
        for slot in range(prompt, prompt + steps):
            model.fused = False if fused else None  # None: decided, op by op
            out.append(model(ids[:, slot:slot + 1], positions[:, slot:slot + 1], slot).float())
            assert isinstance(model.fused, fused_step.FusedStep) == fused, fused_step.why_not(model)
    return torch.stack(out)


@each()
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("attention", [pytest.param("attend.c", marks=needs_attend_c), "sdpa"])
@pytest.mark.parametrize("name", ["tiny-starcoder", "tiny-starcoder2"])  # multi-query; grouped, rotary
def test_the_layers_in_one_call_give_the_logits_of_the_layers_op_by_op(tmp_path, dtype, world_size, batch, attention,
                                                                        name, monkeypatch, panels_kernel):
    """The same kernels and roundings; only the LayerNorm's moments are summed in another order, which
    moves a normalised element by an ulp now and then, and that moves the logits: by up to 1e-5 in fp32,
    and in bf16 by up to 0.035 here (a couple of ulps at the logits' ~4-7), within the 2^-6 of the largest
    allowed. Exact checks of the attention and of the summed partials' rounding are below. With the widest
    panels kernels and AVX2's (panels_kernel: what a CPU without AVX-512 fuses its steps with)."""
    monkeypatch.setattr(decode_attention.DECODE_FORM, "ours", attention == "attend.c")  # sdpa: between two calls
    model = tiny(tmp_path, dtype, world_size, name=name)
    calls = []
    run = fused_step.FusedStep.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_step.FusedStep, "run",
                      lambda self, x, start, *rest: calls.append(start) or run(self, x, start, *rest))
        fused = decode_logits(model, batch, fused=True)
    op_by_op = decode_logits(model, batch, fused=False)
    assert calls == list(range(9, 15)), "every decode step ran fused"
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(fused, op_by_op, rtol=tolerance, atol=tolerance * op_by_op.abs().max().item())
    if dtype == torch.float32:  # (bf16: an ulp can break a near tie)
        assert torch.equal(fused.argmax(-1), op_by_op.argmax(-1))


@needs_attend_c
@each([torch.float32])
def test_a_new_attention_form_makes_the_step_again(tmp_path, dtype, monkeypatch):
    model = tiny(tmp_path, dtype)
    with torch.inference_mode():
        model.setup_cache(2, 16)
    assert model.kernels_summary().endswith("; layers fused")
    monkeypatch.setattr(decode_attention.DECODE_FORM, "ours", False)
    assert model.kernels_summary().endswith("; layers fused,attention-between")


@each([torch.float32])
def test_what_the_fused_step_does_not_take_runs_op_by_op(tmp_path, dtype, monkeypatch):
    model = tiny(tmp_path, dtype)
    with torch.inference_mode():
        model.setup_cache(2, 16)
    assert fused_step.why_not(model) is None
    monkeypatch.setenv(fused_step.ENV, "0")
    assert fused_step.why_not(model) == f"{fused_step.ENV}=0" and fused_step.describe(None) == ""
    monkeypatch.setenv(fused_step.ENV, "off")
    with pytest.raises(ValueError, match=f"{fused_step.ENV}='off': expected 0"):
        fused_step.why_not(model)
    monkeypatch.delenv(fused_step.ENV)
    for name, value, reason in [("window", 8, "a sliding window (8) shorter than the cache (16 slots)"),
                                ("compiled_decode", object(), "the decode step is compiled")]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(model, name, value)
            assert fused_step.why_not(model).startswith(reason), name
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.transformer.h[0].attn, "interleaved", True)  # multi-head GPTBigCode's q/k/v rows
        assert fused_step.why_not(model) == "per-head interleaved q/k/v rows (multi-head GPTBigCode)"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.transformer.h[1].mlp.c_proj, "decode_numel", 1024)  # laid out for one row, not two
        assert fused_step.why_not(model) == "no cache, or one whose batch the linears are not laid out for"
        patch.setattr(model.transformer.h[1].mlp.c_proj, "decode_numel", 2048)
        patch.setattr(model.transformer.h[0].ln_2, "weight", torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16)))
        assert fused_step.why_not(model) == "a layer's tensor is not contiguous torch.float32 (a LayerNorm kept in fp32?)"
    plain = tiny(tmp_path, dtype, kernels="plain")
    with torch.inference_mode():
        plain.setup_cache(2, 16)
    assert fused_step.why_not(plain) == "a linear's decode kernel is plain, not panels"
    rotary = tiny(tmp_path, dtype, name="tiny-starcoder2")  # its window, 512 slots, holds the cache
    with torch.inference_mode():
        rotary.setup_cache(2, 512)
        assert fused_step.why_not(rotary) is None
        rotary.setup_cache(2, 513)
        assert fused_step.why_not(rotary) == "a sliding window (512) shorter than the cache (513 slots)"
        assert rotary.fused is None, "decided in setup_cache"
        rotary.setup_cache(2, 16)
        for head_dim in (30, 1024):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(rotary.transformer.h[0].attn, "head_dim", head_dim + 1)  # the C refuses to rotate it
                assert fused_step.why_not(rotary) == (f"rotary positions on a head_dim of {head_dim + 1} (fused_step.c "
                                                      f"rotates even ones)")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rotary.transformer.h[0].attn, "head_dim", 2048)  # (rotary.c has no bound on the head)
            assert not (fused_step.why_not(rotary) or "").startswith("rotary positions")


@each([torch.float32])
def test_a_step_with_a_mask_or_more_tokens_runs_op_by_op(tmp_path, dtype, monkeypatch):
    model = tiny(tmp_path, dtype)
    calls = []
    monkeypatch.setattr(fused_step.FusedStep, "run", lambda self, x, start, *rest: calls.append(start) or x)
    ids, positions = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.arange(3).expand(2, 3)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[0, 0] = False  # left padding: a mask
    with torch.inference_mode():
        model.setup_cache(2, 16)
        model(ids, positions, 0, valid)
        model(ids[:, :1], positions[:, :1] + 3, 3, valid)
        model(ids[:, 1:], positions[:, 1:] + 3, 3)  # two new tokens (with a mask: not slot 0)
        model(ids[:, 1:], positions[:, 1:], 0)  # two new tokens at slot 0, no mask
        assert calls == []
        model(ids[:, :1], positions[:, :1] + 3, 3)
    assert calls == [3], "a plain step fuses"


@each([torch.float32])
def test_a_new_cache_or_layout_decides_again_before_the_steps(tmp_path, dtype):
    model = tiny(tmp_path, dtype)
    one = torch.tensor([[5]])
    with torch.inference_mode():
        model.setup_cache(1, 16)
        first = model.fused
        assert isinstance(first, fused_step.FusedStep) and first.batch == 1, "decided in setup_cache"
        model.setup_cache(1, 32)  # a longer cache
        assert model.fused is not first and model.fused.cache_len == 32
        assert model.transformer.h[0].attn.k_cache.data_ptr() in list(model.fused.layers), "it points into it"
        model.setup_cache(2, 32)  # a new batch: new caches, weights laid out again
        second = model.fused
        assert second.batch == 2 and not second.stale()
        tiny(tmp_path, dtype).setup_cache(1, 16)  # another model's layout
        assert second.stale()
        model(one.expand(2, 1), one.expand(2, 1), 0)
        assert model.fused is not second and not model.fused.stale(), "made again at the next step"


@each()
def test_the_summed_partial_and_its_bias_are_rounded_as_the_ops_round_them(tmp_path, dtype, panels_kernel):
    """Between ranks a call begins with x + (sum + bias): the bias rounded into the sum first, as
    Linear.row_parallel's `out + bias` and then Block's `x + out` (bf16: two roundings, not one)."""
    model = tiny(tmp_path, dtype, world_size=2)
    with torch.inference_mode():
        model.setup_cache(3, 16)
        model(torch.tensor([[5]] * 3), torch.tensor([[0]] * 3), 0)
    step = model.fused
    generator = torch.Generator().manual_seed(2)
    x, incoming = (torch.randn(3, 1, 256, generator=generator).to(dtype) * 50 for _ in range(2))
    bias = (torch.randn(256, generator=generator) * 0.01).to(dtype)
    expected = x + (incoming + bias)
    end = 4 * len(model.transformer.h)  # an empty range: the sum folded in, no layer run
    code = step.lib.fused_step(step.layers, end, end, x.data_ptr(), incoming.data_ptr(), bias.data_ptr(), None,
                               step.scratch.data_ptr(), step.dims, 0, step.eps, step.scale, None, None)
    assert code == 0 and torch.equal(x, expected), (x - expected).abs().max()


def sixteen_lanes(values: torch.Tensor) -> float:
    """fused_step.c's vector forms' sum of a row: 16 double lanes, each adding every 16th element in turn,
    then lanes 0-7 and 8-15, then those halves, their halves, and the two."""
    lanes = torch.zeros(16, dtype=torch.float64)
    for chunk in values.double().view(-1, 16):
        lanes = lanes + chunk
    both = lanes[:8] + lanes[8:]
    quarters = both[4:] + both[:4]
    pair = quarters[2:] + quarters[:2]
    return (pair[0] + pair[1]).item()


def layer_norm_in_sixteen_lanes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row as fused_step.c's vector forms normalise it: the moments in double (sixteen_lanes), rstd and
    the shift in fp32, then (x * rstd + shift) * w + b in fp32, rounded once to the dtype."""
    out = []
    for row in x.float():
        n = row.numel()
        mean = sixteen_lanes(row) / n
        squares = sixteen_lanes((row.double() - mean) ** 2)
        f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        rstd = f32(1.0) / torch.sqrt(f32(squares / n) + f32(eps))
        shift = -f32(mean) * rstd
        out.append(((row * rstd + shift) * weight.float() + bias.float()).to(x.dtype))
    return torch.stack(out)


@each()
@pytest.mark.parametrize("batch", [1, 3])
def test_the_layer_norms_rows_are_the_sixteen_lanes_bits(tmp_path, dtype, batch, panels_kernel):
    """Phase 0's normalised rows (the scratch's first B x E) from AVX-512's form and AVX2's (panels_kernel: the
    path, which the forms follow): the bits of layer_norm_in_sixteen_lanes' arithmetic. What it pins is the
    fp32 steps. The moments' order does not reach the output: a double sum of fp32 values is exact unless
    their exponents spread ~29 bits, and then the large values swamp the rest of the row (in random rows and
    in rows with +-2^60, summing in turn gave these bits too)."""
    model = tiny(tmp_path, dtype)
    ln, embd = model.transformer.h[0].ln_1, model.config.n_embd
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        model.setup_cache(batch, 16)
        step = model.fused
        x = (torch.randn(batch, 1, embd, generator=generator) * 3 + 1.5).to(dtype)
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=generator))
        assert step.lib.fused_step(step.layers, 0, 1, x.data_ptr(), None, None, None, step.scratch.data_ptr(),
                                   step.dims, 0, step.eps, step.scale, None, None) == 0
        normalised = step.scratch[:batch * embd].view(batch, -1)
        expected = layer_norm_in_sixteen_lanes(x.view(batch, -1), ln.weight, ln.bias, step.eps)
        torch.testing.assert_close(expected, F.layer_norm(x.view(batch, -1), (embd,), ln.weight, ln.bias, step.eps),
                                   rtol=2 ** -7, atol=1e-5)
    assert torch.equal(normalised, expected), (normalised - expected).abs().max()


def test_the_calls_stop_for_the_attention_outside_and_for_each_sum_between_ranks():
    """Two layers, phases 0-7 (fused_step.c: 0 QKV, 1 attention, 2 its c_proj, 3 the MLP)."""
    biases = [10, 11, 12, 13]  # attention's and MLP's c_proj, per layer
    assert fused_step._calls(2, True, False, biases) == [(0, 8, None, None)]
    assert fused_step._calls(2, False, False, biases) == [(0, 1, "attend", None), (2, 5, "attend", None),
                                                          (6, 8, None, None)]
    assert fused_step._calls(2, True, True, biases) == [(0, 3, "sum", 10), (3, 4, "sum", 11), (4, 7, "sum", 12),
                                                        (7, 8, "sum", 13), (8, 8, None, None)]
    assert fused_step._calls(2, False, True, biases) == [
        (0, 1, "attend", None), (2, 3, "sum", 10), (3, 4, "sum", 11), (4, 5, "attend", None), (6, 7, "sum", 12),
        (7, 8, "sum", 13), (8, 8, None, None)]


@needs_attend_c
@each()
@pytest.mark.parametrize("batch", [1, 3])
def test_the_attention_phase_gives_decode_attentions_bits(tmp_path, dtype, batch):
    """Phases 0-1 of a layer: the queries and the cache as written, then attend.c as the layers call it
    (decode_attention.run: bf16 by AVX512_BF16's dot products where the CPU has them, over slot + 1 keys)."""
    model = tiny(tmp_path, dtype)
    ids = torch.randint(0, 6000, (batch, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model.setup_cache(batch, 16)
        model(ids[:, :5], torch.arange(5).expand(batch, 5), 0)
        step, attn = model.fused, model.transformer.h[0].attn
        x = model.embed(ids[:, 5:], torch.full((batch, 1), 5)).contiguous()
        assert step.lib.fused_step(step.layers, 0, 2, x.data_ptr(), None, None, None, step.scratch.data_ptr(),
                                   step.dims, 5, step.eps, step.scale, None, None) == 0
        expected = decode_attention.run(step.q, attn.k_cache[:, :, :6], attn.v_cache[:, :, :6], None, attn.scale)
    assert torch.equal(step.attended, expected.view(batch, 1, -1))


@needs_attend_c
@each([torch.float32])
def test_heads_attend_c_does_not_take_are_given_calls_that_stop_for_their_attention(tmp_path, dtype, monkeypatch):
    model = tiny(tmp_path, dtype)
    monkeypatch.setattr(model.transformer.h[0].attn, "head_dim", 24)  # attend.c takes multiples of 16
    with torch.inference_mode():
        model.setup_cache(1, 16)
        assert fused_step.why_not(model) is None
        assert [then for _, _, then, _ in fused_step.FusedStep(model).calls].count("attend") == 4


def test_a_range_between_ranks_must_end_at_its_one_c_proj():
    lib = fused_step._library()
    if lib is None:
        pytest.skip("the kernels' library is not built here (no C compiler)")
    dims = (ctypes.c_long * len(fused_step.DIMS))(*[1] * len(fused_step.DIMS))
    partial = torch.zeros(4)
    assert lib.fused_step(None, 0, 5, None, None, None, None, None, dims, 0, 1e-5, 1.0, None, None) == -2, \
        "past the one layer"
    for first, end in [(0, 2), (0, 4), (2, 4), (0, 0), (-1, 0), (3, 2)]:  # no c_proj last, two, none, backwards
        assert lib.fused_step(None, first, end, None, None, None, partial.data_ptr(), None, dims, 0, 1e-5, 1.0,
                              None, None) == -2, (first, end)
    table, x = torch.zeros(2), torch.zeros(1)
    dims[fused_step.DIMS.index("head_dim")] = 2
    assert lib.fused_step(None, 0, 0, x.data_ptr(), None, None, None, None, dims, 0, 1e-5, 1.0, table.data_ptr(),
                          table.data_ptr()) == 0, "an empty range, rotary tables given: nothing to refuse"
    assert lib.fused_step(None, 0, 0, x.data_ptr(), None, None, None, None, dims, 0, 1e-5, 1.0, table.data_ptr(),
                          None) == -2, "a cos with no sin"
    for head_dim, refused in [(3, True), (2050, False)]:  # an odd head_dim has no halves to rotate; no bound else
        dims[fused_step.DIMS.index("head_dim")] = head_dim
        assert lib.fused_step(None, 0, 0, x.data_ptr(), None, None, None, None, dims, 0, 1e-5, 1.0, table.data_ptr(),
                              table.data_ptr()) == (-2 if refused else 0), head_dim


@each()
@pytest.mark.parametrize("batch", [1, 3])
def test_rotary_positions_give_apply_rotarys_bits(tmp_path, dtype, batch, panels_kernel):
    """Phase 0 with the step's cos and sin: q and k as starcoder2.apply_rotary rotates them (each product
    and the sum rounded as torch rounds them), k so into the cache; against the same phase without the
    tables, which leaves q and k as the linear wrote them."""
    from starcoder_tp.starcoder2 import apply_rotary, rotary_tables
    model = tiny(tmp_path, dtype, name="tiny-starcoder2")
    attn = model.transformer.h[0].attn
    h, kv, d = attn.local_heads, attn.local_kv_heads, attn.head_dim
    ids = torch.randint(0, 6000, (batch, 1), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[7], [300], [41]][:batch])
    with torch.inference_mode():
        model.setup_cache(batch, 16)
        step = model.fused
        x = model.embed(ids, positions).contiguous()
        rows, cos_sin = {}, rotary_tables(positions, model.inv_freq, dtype)
        for label, tables in {"plain": (None, None), "rotated": [t.data_ptr() for t in cos_sin]}.items():
            assert step.lib.fused_step(step.layers, 0, 1, x.data_ptr(), None, None, None, step.scratch.data_ptr(),
                                       step.dims, 5, step.eps, step.scale, *tables) == 0
            qkv = step.scratch[batch * model.config.n_embd:][:batch * (h + 2 * kv) * d].view(batch, 1, -1)
            rows[label] = (qkv[..., :h * d].view(batch, 1, h, d).clone(), attn.k_cache[:, :, 5].clone())
    (q, k), (q_rotated, k_cached) = rows["plain"], rows["rotated"]
    k = k.view(batch, 1, kv, d)
    assert torch.equal(q_rotated, apply_rotary(q, *cos_sin)) and not torch.equal(q_rotated, q)
    assert torch.equal(k_cached, apply_rotary(k, *cos_sin).view(batch, kv, d))
