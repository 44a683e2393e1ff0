"""The linear layers: pre-packed (oneDNN) against F.linear, the bias left out for row-parallel
layers, the fallback where oneDNN cannot pack, and a whole model packed against unpacked."""
import pytest
import torch
import torch.nn.functional as F

from starcoder_tp.device import Device
from starcoder_tp.model import load_model
from starcoder_tp.timing import timed_generate
import starcoder_tp.linear as linear_module
from starcoder_tp.linear import BATCH_PACK_ROWS, UPCAST_MIN_ROWS, Linear, linear, pack_weight, worth_packing
from starcoder_tp.comm import TPGroup
from starcoder_tp.shard import shard_checkpoint

needs_onednn = pytest.mark.skipif(pack_weight(torch.ones(2, 2), force=True) is None, reason="oneDNN cannot pack fp32 here")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 64), (2, 7, 64), (2, 300, 64)])  # the last: prefill rows
def test_packed_linear_matches_f_linear_with_and_without_bias(shape):
    torch.manual_seed(0)
    layer = Linear(64, 96)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(*shape)
    assert not layer.prepack(), "a small, square-ish weight is not worth packing"
    assert layer.prepack(force=True)
    assert layer.weight.numel() == 0, "the plain weight must be released once packed"
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x, add_bias=False), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (*shape[:-1], 96)


def test_at_batch_1_only_tall_large_weights_are_worth_packing():
    assert worth_packing(torch.empty(4096, 1024)) and worth_packing(torch.empty(49152, 1024))
    assert not worth_packing(torch.empty(1024, 4096))  # c_proj: wide
    assert not worth_packing(torch.empty(1152, 1024))  # c_attn of MQA: square-ish
    assert not worth_packing(torch.empty(6144, 256))  # tall but small K


def test_from_batch_4_every_weight_is_worth_packing_except_bf16_without_bf16_arithmetic(monkeypatch):
    shapes = [(4096, 1024), (1024, 4096), (1152, 1024), (6144, 256), (320, 256)]
    assert all(worth_packing(torch.empty(s), rows=BATCH_PACK_ROWS) for s in shapes)
    assert all(worth_packing(torch.empty(s), rows=32) for s in shapes)
    assert not worth_packing(torch.empty(1024, 4096), rows=BATCH_PACK_ROWS - 1)
    monkeypatch.setattr(linear_module, "NATIVE_BF16_MATMUL", False)
    assert not worth_packing(torch.empty(4096, 1024, dtype=torch.bfloat16), rows=16)  # linear's fp32 path
    assert worth_packing(torch.empty(4096, 1024, dtype=torch.bfloat16), rows=1)
    monkeypatch.setattr(linear_module, "NATIVE_BF16_MATMUL", True)
    assert worth_packing(torch.empty(1024, 4096, dtype=torch.bfloat16), rows=16)


@needs_onednn
def test_a_linear_repacks_for_other_rows_and_unpacks_exactly():
    torch.manual_seed(0)
    layer = Linear(64, 96)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert not layer.prepack(rows=1) and layer.packed is None
    assert layer.prepack(rows=16) and layer.packed_rows == 16 and layer.weight.numel() == 0
    x = torch.randn(16, 64)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert layer.prepack(rows=8) and layer.packed_rows == 8
    torch.testing.assert_close(layer(x[:8]), F.linear(x[:8], weight, bias), rtol=1e-5, atol=1e-5)
    assert not layer.prepack(rows=1), "back at one row, this weight is not worth packing"
    assert layer.packed is None and torch.equal(layer.weight, weight), "unpacking must give the weight back exactly"
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias))


def test_unpacked_linear_can_leave_out_its_bias():
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x, add_bias=False), x @ layer.weight.T)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


def test_a_weight_oneDNN_cannot_take_stays_plain():
    layer = Linear(8, 4).to(torch.float64)  # oneDNN has no fp64 linear
    assert not layer.prepack(force=True)
    assert layer.packed is None and layer.weight.shape == (4, 8)
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_a_packed_model_generates_the_same_tokens_and_logits(tmp_path, embedded_dir, prompts):
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), prepack=False)
    assert sum(1 for _ in load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu")).packed_weights()) == 0, \
        "the embedded model's weights (n_embd 256) are too small to be worth packing"
    packed = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), prepack=False)
    packed.prepack(force=True)
    assert sum(1 for _ in plain.packed_weights()) == 0
    n_layers = plain.config.n_layer
    assert sum(1 for _ in packed.packed_weights()) == 4 * n_layers + 1  # c_attn, 2x c_proj, c_fc; lm_head
    a = timed_generate(plain, Device("cpu"), prompts, 16, topk=5)
    b = timed_generate(packed, Device("cpu"), prompts, 16, topk=5)
    assert torch.equal(a.output_ids, b.output_ids)
    torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_a_prepacked_model_repacks_for_each_batch_size(tmp_path, embedded_dir, prompts):
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), prepack=False)
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"))
    n_weights = 4 * model.config.n_layer + 1
    batch = (prompts * BATCH_PACK_ROWS)[:BATCH_PACK_ROWS]
    for rows, expect_packed, request in ((1, 0, prompts[:1]), (BATCH_PACK_ROWS, n_weights, batch), (1, 0, prompts[:1])):
        out = timed_generate(model, Device("cpu"), request, 8, topk=3)
        assert model.pack_rows == rows and sum(1 for _ in model.packed_weights()) == expect_packed
        assert not any(t.is_inference() for t in [*model.packed_weights(), *model.parameters()]), \
            "weights re-packed during generation must stay usable outside inference mode"
        ref = timed_generate(plain, Device("cpu"), request, 8, topk=3)
        assert torch.equal(out.output_ids, ref.output_ids)
        torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(16, 256), (2, 8, 256), (1, 256)])  # decode rows, prefill rows, one row
@pytest.mark.parametrize("native", [False, True])
def test_bf16_linear_without_bf16_arithmetic_is_the_bf16_gemm_computed_in_fp32(monkeypatch, shape, native):
    """2500 output rows: three fp32 blocks of 1024, the last one short, each with its bias slice."""
    monkeypatch.setattr(linear_module, "NATIVE_BF16_MATMUL", native)
    torch.manual_seed(0)
    weight, bias = torch.randn(2500, 256).bfloat16(), torch.randn(2500).bfloat16()
    x = torch.randn(*shape).bfloat16()
    out = linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (*shape[:-1], 2500)
    exact = F.linear(x.double(), weight.double(), bias.double())  # bf16 products and sums, exactly
    # Rounded to bf16 once from an fp32 sum: within one bf16 rounding (2^-8) and fp32 noise.
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-3)
    if not native and x.numel() >= UPCAST_MIN_ROWS * shape[-1]:
        torch.testing.assert_close(out, F.linear(x.float(), weight.float(), bias.float()).bfloat16(), rtol=2 ** -7, atol=0)
    else:  # one row, or a CPU with bf16 arithmetic: the libraries' own bf16 GEMM
        assert torch.equal(out, F.linear(x, weight, bias))


def test_bf16_linear_upcasts_only_on_cpu_without_bf16_arithmetic(monkeypatch):
    calls = []
    monkeypatch.setattr(linear_module, "NATIVE_BF16_MATMUL", False)
    real = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: calls.append(t.shape) or real(t))
    x, weight = torch.randn(8, 64), torch.randn(32, 64)
    linear(x, weight)  # fp32: nothing to convert
    linear(x[:3].bfloat16(), weight.bfloat16())  # 3 rows: the native bf16 GEMM is faster
    assert calls == []
    linear(x.bfloat16(), weight.bfloat16())
    assert calls == [(8, 64), (32, 64)]
