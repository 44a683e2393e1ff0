"""gemv.py, one-row fp32 products by BLAS's sgemv: F.linear's result at one row (and F.linear
itself otherwise), the BLAS held to one thread, a candidate only at one row of an fp32 weight,
and whole models decoding at batch 1 with it."""
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_info

from starcoder_tp import gemv, kernel_timing, kernels, rowdot
from starcoder_tp.comm import TPGroup
from starcoder_tp.device import Device
from starcoder_tp.kernels import Choice
from starcoder_tp.linear import Linear, run_kernel
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.timing import timed_generate


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 96), (96,)])  # a layer's decode row, the lm_head's, a bare row
def test_one_row_is_f_linear(shape, bias):
    torch.manual_seed(0)
    weight, b, x = torch.randn(200, 96), torch.randn(200), torch.randn(*shape)
    with torch.inference_mode():  # as generation runs it: inference tensors in, one out
        out = gemv.linear(x, weight, b if bias else None)
    want = F.linear(x, weight, b if bias else None)
    assert out.shape == want.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # the sum in another order: fp32 noise only


def test_a_parameter_and_a_strided_row_are_taken_as_they_are():
    weight = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
    x = torch.randn(1, 1, 64)[..., ::2]  # not contiguous
    torch.testing.assert_close(gemv.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["rows", "bf16", "float64"])
def test_anything_else_is_f_linear_itself(monkeypatch, case):
    monkeypatch.setattr(gemv.np, "dot", lambda *a, **k: pytest.fail("sgemv for a call it does not take"))
    weight, x = torch.randn(32, 16), torch.randn(3, 1, 16)
    if case != "rows":
        dtype = torch.bfloat16 if case == "bf16" else torch.float64
        weight, x = weight.to(dtype), x[:1].to(dtype)
    assert torch.equal(gemv.linear(x, weight), F.linear(x, weight))


def _blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_the_blas_runs_one_thread_whatever_torch_runs():
    """Its worker threads would spin beside torch's OpenMP ones and take their cores."""
    from threadpoolctl import threadpool_limits

    saved = torch.get_num_threads()
    gemv._one_blas_thread.cache_clear()
    weight, x = torch.randn(32, 16), torch.randn(1, 16)
    try:
        threadpool_limits(limits=2, user_api="blas")  # as numpy starts on two cores
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            gemv.linear(x, weight)
            assert _blas_threads() == {1}
    finally:
        torch.set_num_threads(saved)


def test_a_candidate_only_at_one_row_of_an_fp32_weight():
    weight = torch.randn(32, 16)
    assert "gemv" in kernels.decode_candidates(weight, 1)
    assert "gemv" not in kernels.decode_candidates(weight, 4), "several rows: the libraries' GEMMs"
    assert "gemv" not in kernels.decode_candidates(weight.bfloat16(), 1), "numpy has no bf16"
    assert kernels.fixed_choice("gemv", weight) == Choice("gemv", "plain"), "prefills run plain"
    assert kernels.fixed_choice("gemv", weight, 4) == Choice("plain", "plain"), "--kernels gemv at batch 4"
    assert kernels.fixed_choice("gemv", weight.bfloat16()) == Choice("plain", "plain")


def test_the_timed_calls_run_sgemv_over_the_copies_in_turn(monkeypatch):
    seen = []
    real = gemv.np.dot
    monkeypatch.setattr(gemv.np, "dot", lambda w, *a, **k: seen.append(w.ctypes.data) or real(w, *a, **k))
    call = kernel_timing.decode_calls(torch.randn(72, 40), 1, ["gemv"], copies=3)["gemv"]
    for _ in range(6):
        call()
    assert len(set(seen[:3])) == 3 and seen[3:] == seen[:3]


@pytest.mark.parametrize("kind", ["gemv", "rowdot"])
def test_a_linear_laid_out_for_a_one_row_kernel_runs_it_for_one_row_only(monkeypatch, kind):
    """gemv and rowdot (test_rowdot.py) alike: the plain weight, prefills by the plain layout's kernels."""
    module = {"gemv": gemv, "rowdot": rowdot}[kind]
    if kind == "rowdot" and rowdot.unavailable() is not None:
        pytest.skip(f"rowdot.c not built here: {rowdot.unavailable()}")
    layer = Linear(16, 32)
    layer.use_kernels(Choice(kind, "plain"), 1)
    assert layer.packed is None and layer.decode_kernel == kind and layer.prefill_kernel == "plain"
    calls = []
    monkeypatch.setattr(module, "linear", lambda *a: calls.append(a) or F.linear(*a))
    layer(torch.randn(1, 1, 16))
    layer(torch.randn(1, 5, 16))
    assert len(calls) == 1, f"the one-row call runs {kind}, the five-row one the prefill kernel"
    assert run_kernel(kind, torch.randn(1, 16), layer.weight, None, None).shape == (1, 32)


def test_a_model_decoding_one_row_with_gemv_keeps_plains_tokens(tmp_path, embedded_dir, prompts):
    """Batch 1: every decode call (and the tied lm_head's one row) runs sgemv."""
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="gemv")
    a = timed_generate(plain, Device("cpu"), prompts[:1], 16, topk=5)
    b = timed_generate(model, Device("cpu"), prompts[:1], 16, topk=5)
    assert {m.decode_kernel for m in model.modules() if isinstance(m, Linear)} == {"gemv"}
    if model.config.tie_word_embeddings:
        assert model.lm_head_kernel == "gemv"
    assert torch.equal(a.output_ids, b.output_ids), (a.output_ids, b.output_ids)
    torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=1e-4, atol=1e-4)
