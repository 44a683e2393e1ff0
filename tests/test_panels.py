"""panels.py, our own GEMM on weights in panels of 16 output columns (panels.c; panels_avx2.c on CPUs
without AVX-512): packing exact both ways, F.linear's result at every row count and panel count (fp32;
bf16 within one rounding of the exact sum) on both kernels, the activation on the accumulator, a
layout of its own in Linear and in the plans, and whole models keeping plain's tokens with it."""
import ctypes
import math
import signal
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

from starcoder_tp import kernel_timing, kernels, panels, rowdot
from starcoder_tp.comm import TPGroup
from starcoder_tp.device import Device
from starcoder_tp.kernels import Choice
from starcoder_tp.linear import Linear
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.timing import timed_generate

DTYPES = [torch.float32, torch.bfloat16]


def runs(dtype: torch.dtype) -> bool:
    return panels.supports(torch.empty(16, 2, dtype=dtype))


def needs(dtype: torch.dtype):
    return pytest.mark.skipif(not runs(dtype), reason=f"panels need AVX2 and FMA and a C compiler: "
                                                      f"this CPU or build does not run them in {dtype}")


def each(dtypes=DTYPES):
    return pytest.mark.parametrize("dtype", [pytest.param(d, marks=needs(d)) for d in dtypes], ids=str)


@each()
def test_packing_is_a_permutation_exact_both_ways(dtype):
    weight = torch.randn(48, 10).to(dtype)
    packed = panels.pack(weight)
    assert packed.numel() == weight.numel() and panels.shape_of(packed) == (48, 10)
    assert torch.equal(panels.unpack(packed), weight)
    assert torch.equal(packed.flatten()[:2], weight[:2, 0] if dtype == torch.float32 else weight[0, :2]), \
        "fp32: a panel's first step is 16 columns' first element; bf16: a column's first K pair"


# N: 1 to 7 panels (blocks of 3 and what is left); K: even and odd (fp32), 2 to 1030.
SHAPES = [(16, 2), (32, 33), (48, 64), (64, 256), (112, 96), (48, 1030), (16, 2050), (112, 2050)]  # (from 1030: K in chunks)
ROWS = [1, 2, 3, 7, 16, 17, 33]  # blocks of 8, 4, 2 and 1 rows of x in every combination


@each()
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_row_and_panel_count_is_f_linear(panels_kernel, dtype, n, k, rows, bias):
    if dtype == torch.bfloat16 and k % 2:
        k += 1
    torch.manual_seed(0)
    weight, b, x = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), torch.randn(rows, 1, k).to(dtype)
    if rows % 2:  # (a view whose rows are not side by side from 3 rows on: an attention output's, say)
        x = torch.randn(1, k, rows).to(dtype).permute(2, 0, 1)
    with torch.inference_mode():  # as generation runs it
        out = panels.linear(x, panels.pack(weight), b if bias else None)
    exact = F.linear(x.double(), weight.double(), b.double() if bias else None)
    assert out.shape == exact.shape and out.dtype == dtype
    if dtype == torch.float32:  # sums in another order: fp32 noise, growing with K
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=4e-6 * k ** 0.5)
    else:  # fp32 sums of bf16 products, bias included, rounded to bf16 once
        torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-6 * k ** 0.5)


@each()
@pytest.mark.parametrize("rows", [16, 70])
def test_k_in_chunks_carries_the_sums_and_finishes_them_once(panels_kernel, dtype, rows):
    torch.manual_seed(1)
    k = 4100  # fp32: 5 chunks of 820 steps; bf16: 3 chunks of 684, 684, 682 pairs
    weight, b, x = torch.randn(112, k).to(dtype), torch.randn(112).to(dtype), torch.randn(rows, k).to(dtype)
    out = panels.linear(x, panels.pack(weight), b, ("gelu", "tanh"))
    exact = F.gelu(F.linear(x.double(), weight.double(), b.double()), approximate="tanh")
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=4e-6 * k ** 0.5)
    else:
        torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-6 * k ** 0.5)


@each()
@pytest.mark.parametrize("k", [64, 2050])  # (2050: K in chunks too)
def test_rows_past_a_row_chunk_are_each_their_own_product(panels_kernel, dtype, k):
    # panels.c takes ROW_CHUNK (512) rows at a time, each chunk's rows interleaved on their own:
    # 1100 rows are two whole chunks and one of 76 (blocks of 8 and one of 4); panels_avx2.c, 64
    # (17 whole and one of 12). Each row's output must be its own row's product, so rows are told
    # apart by a scale per row.
    torch.manual_seed(2)
    weight, b = torch.randn(48, k).to(dtype), torch.randn(48).to(dtype)
    x = (torch.randn(1100, k) * torch.linspace(0.5, 2.0, 1100)[:, None]).to(dtype)
    out = panels.linear(x, panels.pack(weight), b)
    exact = F.linear(x.double(), weight.double(), b.double())
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=8e-6 * k ** 0.5)
    else:
        torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=2e-6 * k ** 0.5)


@each()
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("activation", [("gelu", "tanh"), ("relu", "")])
def test_the_activation_is_applied_to_the_accumulator(panels_kernel, dtype, rows, activation):
    torch.manual_seed(0)
    weight, b, x = (torch.randn(96, 64) * 0.3).to(dtype), torch.randn(96).to(dtype), torch.randn(rows, 64).to(dtype)
    out = panels.linear(x, panels.pack(weight), b, activation)
    exact = F.linear(x.double(), weight.double(), b.double())
    want = F.gelu(exact, approximate="tanh") if activation[0] == "gelu" else F.relu(exact)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-5)
    torch.testing.assert_close(out.double(), want, **tolerance)  # bf16: rounded once, after the activation


@each([torch.float32])
def test_the_tanh_gelu_holds_over_the_whole_range(panels_kernel, dtype):
    """Through exp's reduction and both tails: within a few fp32 steps of torch's fused op."""
    v = torch.linspace(-40, 40, 200_000)[:, None]
    weight = torch.zeros(16, 1)
    weight[0, 0] = 1.0
    out = panels.linear(v, panels.pack(weight), None, ("gelu", "tanh"))[:, 0]
    want = F.gelu(v.double(), approximate="tanh").flatten()
    assert ((out.double() - want).abs() <= 4e-7 * v.flatten().double().abs().clamp(min=1)).all()


@each([torch.float32])
def test_the_tanh_gelus_negative_tail_keeps_its_digits_and_non_finite_inputs_their_limits(panels_kernel, dtype):
    """In the negative tail 1 + tanh(u) cancels: the GELU there, tiny, is held to a relative bound
    against float64's v / (1 + e^(-2u)) (the same function, without the cancellation); past the
    tail it is 0, +-inf go to their limits (0 and inf) and NaN stays NaN."""
    v = torch.cat([torch.linspace(-9, -1, 20_000), torch.tensor([-1e20, -float("inf"), float("inf"), 1e20,
                                                                   float("nan")])])[:, None]
    weight = torch.zeros(16, 1)
    weight[0, 0] = 1.0
    out = panels.linear(v, panels.pack(weight), None, ("gelu", "tanh"))[:, 0].double()
    x = v[:-5, 0].double()
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    torch.testing.assert_close(out[:-5], x / (1 + torch.exp(-2 * u)), rtol=2e-5, atol=0)
    assert out[-5:-1].tolist() == [0.0, 0.0, float("inf"), v[-2, 0].item()] and math.isnan(out[-1].item())


@each()
@pytest.mark.parametrize("rows", [1, 16])
def test_relu_keeps_nan_and_infinities_as_torch_does(panels_kernel, dtype, rows):
    """Each value into output column 0 alone (weight [1, 0] there; K = 2 for bf16's pairs), `rows` at a call."""
    v = torch.tensor([float("nan"), -float("inf"), float("inf"), -1.5, 0.0, 2.5, -0.0, 1e30]).repeat(2)[:, None]
    weight = torch.zeros(16, 2)
    weight[0, 0] = 1.0
    x = torch.cat([v, torch.zeros_like(v)], 1).to(dtype)
    packed = panels.pack(weight.to(dtype))
    out = torch.cat([panels.linear(x[r:r + rows], packed, None, ("relu", ""))[:, 0] for r in range(0, 16, rows)])
    want = F.relu(v[:, 0].to(dtype))
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num()), out


def test_what_it_cannot_take_is_not_a_candidate():
    assert not panels.supports(torch.randn(24, 8)), "N not a multiple of 16"
    assert panels.pack(torch.randn(24, 8)) is None and "panels" not in kernels.decode_candidates(torch.randn(24, 8))
    assert not panels.supports(torch.randn(16, 8).double())
    assert not panels.supports(torch.randn(16, 7).bfloat16()), "bf16 takes K in pairs"
    assert kernels.fixed_choice("panels", torch.randn(24, 8)) == Choice("plain", "plain")


@each()
def test_a_candidate_at_every_row_count_that_prefills_itself(dtype):
    weight = torch.randn(32, 16).to(dtype)
    for rows in (1, 2, 4, 16, 64):
        assert "panels" in kernels.decode_candidates(weight, rows)
        assert kernels.fixed_choice("panels", weight, rows) == Choice("panels", "panels")
    assert "panels" not in kernels.decode_candidates(torch.randn(24, 16).to(dtype), 1), "24 outputs: not 16-column panels"
    with pytest.raises(ValueError, match="runs"):
        Choice("panels", "plain")
    with pytest.raises(ValueError, match="against"):
        panels.linear(torch.randn(2, 15).to(dtype), panels.pack(weight))


@each()
def test_a_linear_laid_out_in_panels_runs_them_and_gives_its_weight_back(dtype, monkeypatch):
    torch.manual_seed(0)
    layer = Linear(64, 48).to(dtype)
    plain = layer.weight.detach().clone()
    assert layer.use_kernels(Choice("panels", "panels"), 4)
    assert layer.packed_kind == "panels" and layer.weight.numel() == 0, "one copy in memory"
    packed = layer.packed
    layer.use_kernels(Choice("panels", "panels"), 16)
    assert layer.packed is packed and layer.packed_rows == 16, "the same panels for every batch: not packed again"
    layer.use_kernels(Choice("panels", "panels"), 4)
    calls = []
    real = panels.Bound.__call__
    monkeypatch.setattr(panels.Bound, "__call__", lambda self, x: calls.append((self, self.act)) or real(self, x))

    def check(x):
        want = F.linear(x.double(), plain.double(), layer.bias.double())
        torch.testing.assert_close(layer(x).double(), want, rtol=2 ** -7, atol=1e-4)

    for shape in ((4, 1, 64), (2, 70, 64)):  # a decode step, a prefill
        check(torch.randn(*shape).to(dtype))
    layer.forward_activated(torch.randn(4, 1, 64).to(dtype), "gelu_pytorch_tanh")
    assert [act for _, act in calls] == [0, 0, panels.ACTIVATIONS[("gelu", "tanh")]], \
        "the activation goes with the product"
    assert calls[0][0] is calls[1][0] and calls[1][0] is not calls[2][0], "one bound call per bias and activation"
    layer.bias = torch.nn.Parameter(layer.bias.detach() + 1, requires_grad=False)  # another bias: bound anew
    x = torch.randn(4, 1, 64).to(dtype)
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), plain.double(), layer.bias.double()),
                               rtol=2 ** -7, atol=1e-4)
    layer.bias = torch.nn.Parameter(layer.bias.detach() - 1, requires_grad=False)
    assert torch.equal(layer.plain_weight(), plain)
    old_panels = weakref.ref(layer.packed)
    del packed
    calls.clear()
    layer.use_kernels(Choice("plain", "plain"), 4)
    assert layer.packed is None and torch.equal(layer.weight, plain)
    assert old_panels() is None, "no bound call keeps the panels once the layout is another"
    layer.use_kernels(Choice("panels", "panels"), 4)  # packed anew
    check(torch.randn(4, 1, 64).to(dtype))


@each()
def test_timed_calls_run_the_panels_over_copies_with_the_activation(dtype, monkeypatch):
    seen = []
    real = panels.Bound.__call__
    monkeypatch.setattr(panels.Bound, "__call__", lambda self, x: seen.append((self.packed.data_ptr(), self.act)) or
                        real(self, x))
    weight = torch.randn(64, 32).to(dtype)
    call = kernel_timing.decode_calls(weight, 4, ["panels"], "gelu_pytorch_tanh", copies=3)["panels"]
    for _ in range(6):
        call()
    gelu = panels.ACTIVATIONS[("gelu", "tanh")]
    assert len({p for p, _ in seen[:3]}) == 3 and seen[3:] == seen[:3]
    assert {act for _, act in seen} == {gelu}, "timed with its activation, as the model runs it"
    seen.clear()
    kernel_timing.prefill_calls(weight, 4, ["panels"], 64, "gelu_pytorch_tanh")["panels"]()
    assert seen[0][1] == gelu


@each()
def test_a_model_in_panels_keeps_plains_tokens(panels_kernel, tmp_path, embedded_dir, prompts, dtype):
    """fp32 keeps plain's tokens at batches of one prompt, two and all of them (the same panels at
    each batch: decode rows 1, 2 and 4 in blocks); bf16's top logprobs stay within bf16's resolution
    of plain bf16's, through the tied lm_head too."""
    name = str(dtype).removeprefix("torch.")
    shard_checkpoint(embedded_dir, tmp_path / "s", 1, dtype=name)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="panels")
    assert len(prompts) > 2
    for batch in (prompts[:1], prompts[:2], prompts):
        a = timed_generate(plain, Device("cpu"), batch, 12, topk=5)
        b = timed_generate(model, Device("cpu"), batch, 12, topk=5)
        assert {m.packed_kind for m in model.modules() if isinstance(m, Linear)} == {"panels"}
        if dtype == torch.float32:
            assert torch.equal(a.output_ids, b.output_ids), (a.output_ids, b.output_ids)
            torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(a.topk_logprobs[:, 0], b.topk_logprobs[:, 0], rtol=0, atol=0.1)


@each()
def test_the_avx2_path_runs_avx2s_kernels(dtype):
    """rowdot's path "avx2" makes panels.c run panels_avx2.c's kernels (what a CPU without AVX-512
    gets), not its own: the outputs are AVX2's bit for bit. Where the widest path is another, fp32's
    tanh GELU tells them apart (AVX2 divides, AVX-512 takes a reciprocal and a Newton step: the
    last bit of some outputs)."""
    lib, widest = rowdot.library()
    torch.manual_seed(3)
    weight, x = torch.randn(64, 256).to(dtype), torch.randn(9, 256).to(dtype)
    packed, gelu = panels.pack(weight), ("gelu", "tanh")
    direct = lib.panels_avx2_f32 if dtype == torch.float32 else lib.panels_avx2_bf16
    direct.argtypes, direct.restype = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int], None
    want = torch.empty(9, 64, dtype=dtype)
    direct(packed.data_ptr(), x.data_ptr(), None, want.data_ptr(), 64, 256, 9, panels.ACTIVATIONS[gelu])
    own = panels.linear(x, packed, None, gelu)
    try:
        assert rowdot.use_path("avx2")
        assert torch.equal(panels.linear(x, packed, None, gelu), want)
    finally:
        rowdot.use_path(widest)
    if widest != "avx2" and dtype == torch.float32:
        assert not torch.equal(own, want), "the widest path ran AVX2's kernel too"


@pytest.mark.parametrize("failing", ["PANELS_ALLOC_ROWS", "PANELS_ALLOC_SUMS", "PANELS_AVX2_ALLOC"])
def test_without_memory_for_the_rows_or_the_sums_a_call_falls_back_and_is_still_f_linear(tmp_path, failing):
    # Out of memory, a call of many rows runs a row at a time (no interleaved rows) or K whole (no
    # chunk sums): no real call gets there, so the library is built with that allocation failing.
    dtypes = [d for d in DTYPES if runs(d)]
    if failing != "PANELS_AVX2_ALLOC":  # (AVX-512's allocations: only where AVX-512's kernels run that dtype)
        dtypes = [d for d in dtypes if rowdot.runs_at_least("avx512bf16" if d == torch.bfloat16 else "avx512")]
    if not dtypes:
        pytest.skip("no kernel that makes this allocation runs here (AVX-512's, or AVX2's and a C compiler)")
    library = tmp_path / "panels-failing.so"
    sources = [str(source) for source in rowdot.SOURCES if source.name in ("panels.c", "panels_avx2.c")]  # (alone)
    built = subprocess.run([rowdot._compiler(), *rowdot.CFLAGS, f"-D{failing}(size)=NULL", "-o", str(library),
                            *sources], capture_output=True, text=True, timeout=rowdot.BUILD_TIMEOUT_S)
    assert built.returncode == 0, built.stderr[-2000:]
    lib = ctypes.CDLL(str(library))
    lib.panels_use.argtypes, lib.panels_use.restype = [ctypes.c_int], ctypes.c_int
    if failing == "PANELS_AVX2_ALLOC":  # (AVX2's kernels, as on a CPU without AVX-512)
        lib.panels_use(1)
    torch.manual_seed(2)
    k, rows = 4100, 70  # K in chunks where the sums' memory is had; rows past one block of 8
    for dtype in dtypes:
        kernel = lib.panels_f32 if dtype == torch.float32 else lib.panels_bf16
        kernel.argtypes, kernel.restype = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int], None
        weight, b, x = torch.randn(112, k).to(dtype), torch.randn(112).to(dtype), torch.randn(rows, k).to(dtype)
        packed, out = panels.pack(weight), torch.full((rows, 112), float("nan"), dtype=dtype)
        kernel(packed.data_ptr(), x.data_ptr(), b.data_ptr(), out.data_ptr(), 112, k, rows,
               panels.ACTIVATIONS[("gelu", "tanh")])
        exact = F.gelu(F.linear(x.double(), weight.double(), b.double()), approximate="tanh")
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=4e-6 * k ** 0.5)
        else:
            torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-6 * k ** 0.5)


@pytest.mark.parametrize("kernel,dtype", [("panels_f32", "fp32"), ("panels_bf16", "bf16")])
def test_a_call_no_kernel_runs_aborts_naming_its_dtype(kernel, dtype):
    """A weight laid out before the path was narrowed below every kernel (panels_use(0)): the call aborts
    with a message, in a process of its own, rather than return with its output unwritten."""
    lib, _ = rowdot.library()
    if lib is None:
        pytest.skip(f"our kernels are not built here: {rowdot.unavailable()}")
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.panels_use(0); "
            f"lib.{kernel}(None, None, None, None, ctypes.c_long(16), ctypes.c_long(2), ctypes.c_long(1), 0)")
    run = subprocess.run([sys.executable, "-c", code, lib._name], capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGABRT, (run.returncode, run.stderr[-2000:])
    assert f"a {dtype} call, but no panels kernel of that dtype runs on this path" in run.stderr
