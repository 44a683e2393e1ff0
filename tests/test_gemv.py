"""gemv.py, the one-row product inductor compiles: F.linear's result at one row (and F.linear
itself at more), a candidate only at one row and where inductor builds it, compiled when the
weights are laid out, and whole models decoding at batch 1 with it."""
import pytest
import torch
import torch.nn.functional as F

from starcoder_tp import gemv, kernels
from starcoder_tp.comm import TPGroup
from starcoder_tp.device import Device
from starcoder_tp.kernels import Choice
from starcoder_tp.linear import Linear, run_kernel
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.timing import timed_generate

needs_inductor = pytest.mark.skipif(not gemv.available(), reason="inductor cannot compile for this CPU here")


@needs_inductor
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 96), (96,)])  # a layer's decode row, the lm_head's, a bare row
def test_one_row_is_f_linear_in_fp32(shape, bias):
    torch.manual_seed(0)
    weight, b, x = torch.randn(200, 96), torch.randn(200), torch.randn(*shape)
    out = gemv.linear(x, weight, b if bias else None)
    want = F.linear(x, weight, b if bias else None)
    assert out.shape == want.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # the sum in another order: fp32 noise only


@needs_inductor
def test_bf16_is_summed_in_fp32_and_rounded_once():
    torch.manual_seed(0)
    weight, x = torch.randn(300, 256).bfloat16(), torch.randn(1, 1, 256).bfloat16()
    out = gemv.linear(x, weight)
    assert out.dtype == torch.bfloat16
    exact = F.linear(x.double(), weight.double())  # bf16 products are exact in fp32 and in float64
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-3)


def test_more_than_one_row_is_f_linear_itself(monkeypatch):
    monkeypatch.setattr(gemv, "_compiled", lambda *a: pytest.fail("compiled for a call of several rows"))
    weight, x = torch.randn(32, 16), torch.randn(3, 1, 16)
    assert torch.equal(gemv.linear(x, weight), F.linear(x, weight))


def test_a_candidate_only_at_one_row_and_only_where_inductor_builds_it(monkeypatch):
    weight = torch.randn(32, 16)
    monkeypatch.setattr(gemv, "available", lambda: True)
    assert "gemv" in kernels.decode_candidates(weight, 1)
    assert "gemv" not in kernels.decode_candidates(weight, 4), "several rows: the libraries' GEMMs"
    assert "gemv" not in kernels.decode_candidates(weight.double(), 1), "fp32 and bf16 only"
    assert kernels.fixed_choice("gemv", weight) == Choice("gemv", "plain"), "prefills run plain"
    monkeypatch.setattr(gemv, "available", lambda: False)
    assert "gemv" not in kernels.decode_candidates(weight, 1)
    assert kernels.fixed_choice("gemv", weight) == Choice("plain", "plain")


def test_a_failing_compile_leaves_the_kernel_out_with_the_reason(monkeypatch, capsys):
    gemv.available.cache_clear()

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
    monkeypatch.setattr(gemv, "_compiled", lambda *a: no_compiler)
    try:
        assert gemv.available() is False
        assert "not a candidate: RuntimeError: InvalidCxxCompiler: No working C++ compiler found" in capsys.readouterr().err
    finally:
        gemv.available.cache_clear()


def test_a_linear_laid_out_for_gemv_is_compiled_then_not_at_its_first_call(monkeypatch):
    prepared = []
    monkeypatch.setattr(gemv, "prepare", lambda w: prepared.append(w))
    layer = Linear(16, 32)
    layer.use_kernels(Choice("gemv", "plain"), 1)
    assert prepared and prepared[0] is layer.weight and layer.packed is None
    assert layer.decode_kernel == "gemv" and layer.prefill_kernel == "plain"
    calls = []
    monkeypatch.setattr(gemv, "linear", lambda *a: calls.append(a) or F.linear(*a))
    layer(torch.randn(1, 1, 16))
    layer(torch.randn(1, 5, 16))
    assert len(calls) == 1, "the one-row call runs gemv, the five-row one the prefill kernel"
    assert run_kernel("gemv", torch.randn(1, 16), layer.weight, None, None).shape == (1, 32)


@needs_inductor
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_decoding_one_row_with_gemv_keeps_plains_tokens(tmp_path, embedded_dir, prompts, dtype):
    """Batch 1: every decode call (and the tied lm_head's one row) runs the compiled product."""
    shard_checkpoint(embedded_dir, tmp_path / "s", 1, dtype=dtype)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="gemv")
    a = timed_generate(plain, Device("cpu"), prompts[:1], 16, topk=5)
    b = timed_generate(model, Device("cpu"), prompts[:1], 16, topk=5)
    assert {m.decode_kernel for m in model.modules() if isinstance(m, Linear)} == {"gemv"}
    if model.config.tie_word_embeddings:
        assert model.lm_head_kernel == "gemv"
    if dtype == "float32":
        assert torch.equal(a.output_ids, b.output_ids), (a.output_ids, b.output_ids)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=1e-4, atol=1e-4)
    else:  # bf16 sums in another order, rounded once: within bf16's resolution
        torch.testing.assert_close(a.topk_logprobs[:, 0], b.topk_logprobs[:, 0], rtol=0, atol=0.1)


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@needs_inductor
@pytest.mark.parametrize("measured_in", [torch.no_grad, torch.inference_mode])  # (a request measures in the latter)
def test_no_timed_call_compiles(measured_in):
    """Compiles happen in the untimed first call of a candidate (kernel_timing.time_ms) and when
    the weights are laid out (prepare), never in a later call: a compile there timed the kernel at
    30-70 ms instead of 0.2 (a model's nn.Parameter first, then copies of it of another kind)."""
    from starcoder_tp import kernel_timing

    weight = torch.nn.Parameter(torch.randn(72, 40), requires_grad=False)
    with measured_in():
        call = kernel_timing.decode_calls(weight, 1, ["gemv"], copies=3)["gemv"]
    with measured_in(), torch.no_grad():  # as time_ms
        call()
        before = _graphs()
        for _ in range(6):
            call()
    assert _graphs() == before, "a timed call over another copy compiled"
    gemv.prepare(weight)
    before = _graphs()
    with torch.inference_mode():  # as generation: the layers' [1, 1, K] rows, the lm_head's [1, K]
        gemv.linear(torch.randn(1, 1, 40), weight)
        gemv.linear(torch.randn(1, 40), weight, torch.randn(72))
    assert _graphs() == before, "a decode call compiled after prepare"
