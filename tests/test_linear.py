"""The linear layers: every kernel of kernels.py (oneDNN packed, unpacked for the call, or on
the plain weight, MKL packed, bf16 via fp32, one-row sgemv) against F.linear,
the bias left out for row-parallel layers, the fallback where oneDNN cannot pack, re-packing
for another batch, and whole models under every plan."""
import pytest
import torch
import torch.nn.functional as F

from starcoder_tp.comm import TPGroup
from starcoder_tp.device import Device
from starcoder_tp.kernels import Choice, KERNEL_MODES
from starcoder_tp.layouts import pack, pack_mkl
from starcoder_tp.linear import ACTIVATIONS, Linear, fp32_linear
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.timing import timed_generate

needs_onednn = pytest.mark.skipif(pack(torch.ones(2, 2), 1) is None, reason="oneDNN cannot pack fp32 here")
needs_mkl = pytest.mark.skipif(pack_mkl(torch.ones(2, 2), 1) is None, reason="torch has no MKL packed sgemm here")


@needs_onednn
@pytest.mark.parametrize("prefill", ["onednn", "unpack"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 64), (2, 7, 64), (2, 300, 64)])  # the last two: prefill rows
def test_packed_linear_matches_f_linear_with_and_without_bias(shape, prefill):
    torch.manual_seed(0)
    layer = Linear(64, 96)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(*shape)
    assert layer.use_kernels(Choice("onednn", prefill), rows=3)
    assert layer.weight.numel() == 0, "the plain weight must be released once packed"
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x, add_bias=False), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (*shape[:-1], 96)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("choice", [Choice("plain", "plain"), Choice("onednn", "onednn"), Choice("onednn", "unpack"),
                                    Choice("plain", "onednn_plain")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activated_linear_is_the_activation_of_the_linear_under_every_kernel(activation, choice, dtype):
    """The MLP's c_fc: fused as oneDNN's post-op where the weight is packed, else applied after."""
    if "onednn" in choice.decode + choice.prefill and pack(torch.ones(2, 2, dtype=dtype), 1) is None:
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    torch.manual_seed(0)
    layer = Linear(64, 96).to(dtype)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.use_kernels(choice, rows=2)
    eager = ACTIVATIONS[activation][0]
    # Rounded once (fused, from the accumulator) or twice (after the linear's output): bf16 apart.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for shape in [(2, 64), (2, 1, 64), (3, 50, 64)]:  # decode rows, then prefill rows
        x = torch.randn(*shape).to(dtype)
        got = layer.forward_activated(x, activation)
        expected = eager(F.linear(x.float(), weight.float(), bias.float())).to(dtype)
        torch.testing.assert_close(got, expected, **tol, msg=f"{activation} {choice} {shape}")


@needs_onednn
def test_decode_rows_take_the_decode_kernel_and_more_rows_the_prefill_one(monkeypatch):
    import starcoder_tp.linear as linear_module

    ran = []
    real = linear_module.run_kernel
    monkeypatch.setattr(linear_module, "run_kernel", lambda kind, *a: ran.append(kind) or real(kind, *a))
    layer = Linear(64, 32)
    layer.use_kernels(Choice("onednn", "unpack"), rows=4)
    layer(torch.randn(4, 64)), layer(torch.randn(4, 1, 64)), layer(torch.randn(1, 64)), layer(torch.randn(2, 3, 64))
    assert ran == ["onednn", "onednn", "onednn", "unpack"]


@needs_onednn
def test_a_linear_repacks_for_other_rows_and_unpacks_exactly():
    torch.manual_seed(0)
    layer = Linear(64, 96)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert not layer.use_kernels(Choice("plain", "plain"), rows=1) and layer.packed is None
    assert layer.use_kernels(Choice("onednn", "onednn"), rows=16) and layer.packed_rows == 16
    assert layer.weight.numel() == 0
    x = torch.randn(16, 64)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert layer.use_kernels(Choice("onednn", "onednn"), rows=8) and layer.packed_rows == 8
    torch.testing.assert_close(layer(x[:8]), F.linear(x[:8], weight, bias), rtol=1e-5, atol=1e-5)
    assert not layer.use_kernels(Choice("plain", "plain"), rows=1)
    assert layer.packed is None and torch.equal(layer.weight, weight), "unpacking must give the weight back exactly"
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias))


def _mkl_layer(n: int = 96, k: int = 64) -> tuple[Linear, torch.Tensor, torch.Tensor, list[int]]:
    """A linear whose plain_source counts its reads (a stand-in for the part on disk)."""
    torch.manual_seed(0)
    layer = Linear(k, n)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    reads = []
    layer.plain_source = lambda: reads.append(1) or weight.clone()
    return layer, weight, bias, reads


@needs_mkl
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 64), (2, 7, 64), (2, 300, 64)])
def test_mkl_packed_linear_matches_f_linear_at_every_row_count(shape, rows):
    """Packed for `rows` rows, run at others too: MKL's packed buffer carries its own format."""
    layer, weight, bias, _ = _mkl_layer()
    x = torch.randn(*shape)
    assert layer.use_kernels(Choice("mkl_packed", "mkl_packed"), rows=rows) and layer.packed_kind == "mkl_packed"
    assert layer.weight.numel() == 0, "the plain weight must be released once packed"
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x, add_bias=False), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (*shape[:-1], 96)


@needs_mkl
@needs_onednn
def test_an_mkl_packed_linear_reads_its_weight_back_from_its_source_when_the_layout_changes():
    layer, weight, bias, reads = _mkl_layer()
    x = torch.randn(16, 64)
    assert layer.use_kernels(Choice("mkl_packed", "mkl_packed"), rows=1) and not reads
    assert layer.use_kernels(Choice("mkl_packed", "mkl_packed"), rows=1) and not reads, "same layout: kept"
    assert layer.use_kernels(Choice("mkl_packed", "mkl_packed"), rows=16) and reads == [1], "re-packed from the source"
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert layer.use_kernels(Choice("onednn", "onednn"), rows=4) and layer.packed_kind == "onednn" and reads == [1, 1]
    torch.testing.assert_close(layer(x[:4]), F.linear(x[:4], weight, bias), rtol=1e-5, atol=1e-5)
    assert layer.use_kernels(Choice("mkl_packed", "mkl_packed"), rows=4) and reads == [1, 1], "unpacked from oneDNN"
    assert not layer.use_kernels(Choice("plain", "plain"), rows=1) and reads == [1, 1, 1]
    assert layer.packed is None and layer.packed_kind is None and torch.equal(layer.weight, weight)


@needs_mkl
def test_a_linear_without_a_source_does_not_take_mkls_layout_and_a_wrong_source_is_refused():
    torch.manual_seed(0)
    layer = Linear(64, 96)
    weight = layer.weight.detach().clone()
    assert not layer.use_kernels(Choice("mkl_packed", "mkl_packed"), rows=1), "it could never be unpacked"
    assert layer.packed is None and layer.decode_kernel == "plain" and torch.equal(layer.weight, weight)
    layer.plain_source = lambda: weight[:, :32].clone()
    assert layer.use_kernels(Choice("mkl_packed", "mkl_packed"), rows=1)
    with pytest.raises(RuntimeError, match=r"96x64 MKL-packed linear is \[96, 32\]"):
        layer.use_kernels(Choice("plain", "plain"), rows=1)


def test_unpacked_linear_can_leave_out_its_bias():
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x, add_bias=False), x @ layer.weight.T)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


def test_a_weight_oneDNN_cannot_take_stays_plain():
    layer = Linear(8, 4).to(torch.float64)  # oneDNN has no fp64 linear
    assert not layer.use_kernels(Choice("onednn", "onednn"), rows=1)
    assert layer.packed is None and layer.weight.shape == (4, 8) and layer.decode_kernel == "plain"
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("shape", [(16, 256), (2, 8, 256), (1, 256)])  # decode rows, prefill rows, one row
def test_bf16_via_fp32_is_the_bf16_gemm_computed_in_fp32(shape):
    """2500 output rows: three fp32 blocks of 1024, the last one short, each with its bias slice."""
    torch.manual_seed(0)
    weight, bias = torch.randn(2500, 256).bfloat16(), torch.randn(2500).bfloat16()
    x = torch.randn(*shape).bfloat16()
    out = fp32_linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (*shape[:-1], 2500)
    exact = F.linear(x.double(), weight.double(), bias.double())  # bf16 products and sums, exactly
    # Rounded to bf16 once from an fp32 sum: within one bf16 rounding (2^-8) and fp32 noise.
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-3)
    torch.testing.assert_close(out, F.linear(x.float(), weight.float(), bias.float()).bfloat16(), rtol=2 ** -7, atol=0)


# Every fixed mode, and mixed plans that no mode gives: each layout with each prefill kernel it runs.
PLANS = [*KERNEL_MODES, Choice("onednn", "unpack"), Choice("plain", "fp32"), Choice("fp32", "plain"),
         Choice("mkl_packed", "mkl_packed"), Choice("plain", "onednn_plain"), Choice("gemv", "onednn_plain")]


def _with_plan(model, plan, rows: int = 1):
    if isinstance(plan, str):
        model.use_kernels(plan, rows)
    else:  # one choice for every weight, laid out by hand; setup_cache keeps it while the batch is `rows`
        for module in model.modules():
            if isinstance(module, Linear):
                module.use_kernels(plan, rows)
        model.kernel_rows = rows
    return model


@needs_onednn
@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_every_plan_generates_the_tokens_of_plain_fp32(tmp_path, embedded_dir, prompts, plan):
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = _with_plan(load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain"), plan,
                       rows=len(prompts))
    a = timed_generate(plain, Device("cpu"), prompts, 16, topk=5)
    b = timed_generate(model, Device("cpu"), prompts, 16, topk=5)
    assert torch.equal(a.output_ids, b.output_ids), (plan, a.output_ids, b.output_ids)
    torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=1e-4, atol=1e-4)


@needs_onednn
@needs_mkl
@pytest.mark.parametrize("mode", ["onednn", "mkl_packed"])
def test_a_model_relays_its_weights_for_each_batch_size(tmp_path, embedded_dir, prompts, mode):
    """MKL's layout cannot be unpacked: re-packing for another batch reads the part again."""
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels=mode)
    n_weights = 4 * model.config.n_layer + 1  # c_attn, 2x c_proj, c_fc; lm_head
    batch = (prompts * 4)[:4]
    for rows, request in ((1, prompts[:1]), (4, batch), (1, prompts[:1])):
        out = timed_generate(model, Device("cpu"), request, 8, topk=3)
        assert out.kernels.startswith(f"{mode} (fixed, batch {rows}): "), "a forced mode is not weighed"
        assert model.kernel_rows == rows and sum(1 for _ in model.packed_weights()) == n_weights
        assert {m.packed_rows for m in model.modules() if isinstance(m, Linear)} == {rows}
        assert {m.packed_kind for m in model.modules() if isinstance(m, Linear)} == {mode}
        assert not any(t.is_inference() for t in [*model.packed_weights(), *model.parameters()]), \
            "weights re-packed during generation must stay usable outside inference mode"
        ref = timed_generate(plain, Device("cpu"), request, 8, topk=3)
        assert torch.equal(out.output_ids, ref.output_ids)
        torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, rtol=1e-4, atol=1e-4)


# oneDNN takes bf16 from AVX-512 BW (or AVX-NE-CONVERT) on: elsewhere its plans are plain's
needs_onednn_bf16 = pytest.mark.skipif(pack(torch.ones(2, 2, dtype=torch.bfloat16), 1) is None,
                                       reason="oneDNN cannot pack bf16 here")


@pytest.mark.parametrize("plan", [pytest.param("onednn", marks=needs_onednn_bf16), "fp32", "panels",
                                  pytest.param(Choice("onednn", "unpack", "onednn"), marks=needs_onednn_bf16),
                                  Choice("plain", "fp32"), Choice("fp32", "plain"),
                                  pytest.param(Choice("plain", "onednn_plain"), marks=needs_onednn_bf16)],
                         ids=str)
def test_every_bf16_plan_stays_within_bf16_rounding_of_plain_bf16(tmp_path, embedded_dir, prompts, plan):
    """bf16 kernels round differently (fp32 sums in another order, rounded once): the top-5
    logprobs agree within bf16's resolution, through the tied lm_head as well."""
    shard_checkpoint(embedded_dir, tmp_path / "s", 1, dtype="bfloat16")
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = _with_plan(model, plan, rows=len(prompts)) if not isinstance(plan, str) else model
    if isinstance(plan, str):
        model.kernel_mode = plan  # laid out at the request, as a loaded model is
    a = timed_generate(plain, Device("cpu"), prompts, 4, topk=5)
    b = timed_generate(model, Device("cpu"), prompts, 4, topk=5)
    if isinstance(plan, str):
        assert {m.decode_kernel for m in model.modules() if isinstance(m, Linear)} == {plan}
        assert model.lm_head_kernel == plan
    torch.testing.assert_close(a.topk_logprobs[:, 0], b.topk_logprobs[:, 0], rtol=0, atol=0.1)
