"""rowdot.py, our own one-row kernel (rowdot.c): F.linear's result at one row on every instruction
set path this CPU runs (fp32, and bf16 within one bf16 rounding of the exact sum), F.linear itself
otherwise, a candidate only at one row where it was built, a clear reason where it was not, and
whole models decoding at batch 1 with it."""
import os

import pytest
import torch
import torch.nn.functional as F

from starcoder_tp import kernel_timing, kernels, rowdot
from starcoder_tp.comm import TPGroup
from starcoder_tp.device import Device
from starcoder_tp.kernels import Choice
from starcoder_tp.linear import Linear
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.timing import timed_generate

needs_rowdot = pytest.mark.skipif(rowdot.unavailable() is not None,
                                  reason=f"rowdot.c not built here: {rowdot.unavailable()}")


@pytest.fixture
def each_path(request):
    """Runs the test on the path named by the parameter, skipping one this CPU lacks; the widest
    path is restored afterwards."""
    if not rowdot.use_path(request.param):
        pytest.skip(f"this CPU does not run rowdot's {request.param} path")
    yield request.param
    rowdot.use_path(rowdot.path())


# K: whole vectors of every path, a partial last vector; N: whole blocks of eight rows, and not.
SHAPES = [(64, 256), (37, 300), (8, 33), (3, 7)]


@needs_rowdot
@pytest.mark.parametrize("each_path", rowdot.PATHS, indirect=True)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_one_row_is_f_linear_on_every_path(each_path, n, k, bias):
    torch.manual_seed(0)
    weight, b, x = torch.randn(n, k), torch.randn(n), torch.randn(1, 1, k)
    with torch.inference_mode():  # as generation runs it
        out = rowdot.linear(x, weight, b if bias else None)
    want = F.linear(x, weight, b if bias else None)
    assert out.shape == want.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # the sum in another order: fp32 noise only


@needs_rowdot
@pytest.mark.parametrize("each_path", rowdot.PATHS, indirect=True)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_one_row_is_the_exact_sum_rounded_once_on_every_path(each_path, n, k, bias):
    torch.manual_seed(0)
    weight, b, x = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16(), torch.randn(1, k).bfloat16()
    out = rowdot.linear(x, weight, b if bias else None)
    assert out.shape == (1, n) and out.dtype == torch.bfloat16
    exact = F.linear(x.double(), weight.double(), b.double() if bias else None)  # bf16 products, summed exactly
    # fp32 sums (bias included) rounded to bf16 once: within one bf16 rounding (2^-8) and fp32 noise.
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-3)


@needs_rowdot
def test_a_strided_row_and_a_parameter_are_taken_as_they_are():
    weight = torch.nn.Parameter(torch.randn(40, 32), requires_grad=False)
    x = torch.randn(1, 1, 64)[..., ::2]  # not contiguous
    torch.testing.assert_close(rowdot.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    bf16, row = weight.detach().bfloat16()[:, ::2], x[..., :16].bfloat16()  # a non-contiguous weight: copied
    torch.testing.assert_close(rowdot.linear(row, bf16).double(), F.linear(row.double(), bf16.double()),
                               rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("case", ["rows", "float64"])
def test_anything_else_is_f_linear_itself(monkeypatch, case):
    monkeypatch.setattr(rowdot, "library", lambda: pytest.fail("rowdot for a call it does not take"))
    monkeypatch.setattr(rowdot, "unavailable", lambda: None)  # as where it was built
    weight, x = torch.randn(32, 16), torch.randn(3, 1, 16)
    if case == "float64":
        weight, x = weight.double(), x[:1].double()
    assert torch.equal(rowdot.linear(x, weight), F.linear(x, weight))


def test_where_it_is_not_built_it_says_why_and_is_no_candidate(monkeypatch, tmp_path):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path))
    try:
        rowdot.library.cache_clear()
        monkeypatch.setenv(rowdot.ENV, "off")
        assert rowdot.unavailable() == f"{rowdot.ENV}=off"
        assert "rowdot" not in kernels.decode_candidates(torch.randn(8, 8), 1)
        assert kernels.fixed_choice("rowdot", torch.randn(8, 8)) == Choice("plain", "plain")
        monkeypatch.delenv(rowdot.ENV)

        rowdot.library.cache_clear()
        monkeypatch.setattr(rowdot, "_compiler", lambda: None)
        assert "no C compiler" in rowdot.unavailable() and not rowdot.supports(torch.randn(4, 4))

        rowdot.library.cache_clear()
        monkeypatch.setattr(rowdot, "_compiler", lambda: "false")  # runs, prints no version, fails to build
        why = rowdot.unavailable()
        assert why.startswith("false failed on ") and "rowdot.c" in why
        assert not list((tmp_path / "native").glob("*")), "a failed build leaves nothing behind"
    finally:
        rowdot.library.cache_clear()


@needs_rowdot
def test_a_build_is_cached_per_source_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path))
    try:
        rowdot.library.cache_clear()
        assert rowdot.unavailable() is None
        built = list((tmp_path / "native").glob("rowdot-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        rowdot.library.cache_clear()
        assert rowdot.unavailable() is None and built[0].stat().st_mtime_ns == stamp, "built again"
    finally:
        rowdot.library.cache_clear()


@needs_rowdot
def test_a_candidate_only_at_one_row_of_fp32_and_bf16_weights():
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(32, 16).to(dtype)
        assert "rowdot" in kernels.decode_candidates(weight, 1)
        assert "rowdot" not in kernels.decode_candidates(weight, 4), "several rows: the libraries' GEMMs"
        assert kernels.fixed_choice("rowdot", weight) == Choice("rowdot", "plain"), "prefills run plain"
        assert kernels.fixed_choice("rowdot", weight, 4) == Choice("plain", "plain")
    assert "rowdot" not in kernels.decode_candidates(torch.randn(8, 8).double(), 1)
    assert kernels.plan_key({}, 1, 1)["rowdot"] == rowdot.path(), "a plan measured without it is not reused"


@needs_rowdot
def test_the_timed_calls_run_rowdot_over_the_copies_in_turn(monkeypatch):
    seen = []
    real = rowdot.linear
    monkeypatch.setattr(rowdot, "linear", lambda x, w, b=None: seen.append(w.data_ptr()) or real(x, w, b))
    call = kernel_timing.decode_calls(torch.randn(72, 40).bfloat16(), 1, ["rowdot"], copies=3)["rowdot"]
    for _ in range(6):
        call()
    assert len(set(seen[:3])) == 3 and seen[3:] == seen[:3]


@needs_rowdot
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_decoding_one_row_with_rowdot_keeps_plains_tokens(tmp_path, embedded_dir, prompts, dtype):
    """Batch 1: every decode call (and the tied lm_head's one row) runs rowdot: fp32 keeps plain's
    tokens; bf16's top logprobs stay within bf16's resolution of plain bf16's."""
    shard_checkpoint(embedded_dir, tmp_path / "s", 1, dtype=dtype)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="rowdot")
    a = timed_generate(plain, Device("cpu"), prompts[:1], 16, topk=5)
    b = timed_generate(model, Device("cpu"), prompts[:1], 16, topk=5)
    assert {m.decode_kernel for m in model.modules() if isinstance(m, Linear)} == {"rowdot"}
    if model.config.tie_word_embeddings:
        assert model.lm_head_kernel == "rowdot"
    if dtype == "float32":
        assert torch.equal(a.output_ids, b.output_ids), (a.output_ids, b.output_ids)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(a.topk_logprobs[:, 0], b.topk_logprobs[:, 0], rtol=0, atol=0.1)


@needs_rowdot
def test_the_environment_names_a_path_or_refuses_a_bad_name(monkeypatch):
    try:
        for name in rowdot.PATHS:
            rowdot.library.cache_clear()
            monkeypatch.setenv(rowdot.ENV, name)
            if rowdot.unavailable() is None:
                assert rowdot.path() == name
            else:
                assert rowdot.unavailable() == f"{rowdot.ENV}={name}: this CPU does not run that path"
        rowdot.library.cache_clear()
        monkeypatch.setenv(rowdot.ENV, "avx1024")
        with pytest.raises(ValueError, match="avx1024"):
            rowdot.path()
    finally:
        monkeypatch.delenv(rowdot.ENV)
        rowdot.library.cache_clear()


@needs_rowdot
def test_a_narrower_path_named_leaves_out_the_avx512_kernels_as_a_narrower_cpu_would(monkeypatch):
    from starcoder_tp import argmax, decode_attention, panels

    weight = torch.zeros(32, 64)
    try:
        for name in rowdot.PATHS:
            rowdot.library.cache_clear()
            monkeypatch.setenv(rowdot.ENV, name)
            if rowdot.unavailable() is not None:
                continue  # (this CPU does not run that path)
            wide = name in ("avx512", "avx512bf16")
            assert decode_attention.available() == wide and argmax.available() == wide, name
            # panels: AVX-512's kernels, else (bf16 without AVX512_BF16 too) AVX2's, panels_avx2.c
            assert panels.supports(weight) == (name != "scalar"), name
            assert panels.supports(weight.to(torch.bfloat16)) == (name != "scalar"), name
            assert rowdot.supports(weight), "rowdot itself runs every path"
    finally:
        monkeypatch.delenv(rowdot.ENV)
        rowdot.library.cache_clear()
    assert rowdot.runs_at_least(rowdot.path()) and rowdot.runs_at_least("scalar")


PROBE = """#include <immintrin.h>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
__m512 probe(__m512 a, __m512i b) { return _mm512_dpbf16_ps(a, (__m512bh)b, (__m512bh)b); }
"""


def test_the_library_builds_wherever_its_code_is_meant_to(tmp_path):
    # Every C kernel's test skips where the library is not built: an error in one source would
    # otherwise show as skips, not as a failure, on the very machines the kernels are for. (A
    # compiler too old for the AVX-512 BF16 intrinsics is a reason to skip, as the runtime falls back.)
    import platform
    import subprocess

    off = os.environ.get(rowdot.ENV, "").lower() in ("off", "0", "no")
    compiler = rowdot._compiler()
    if platform.machine() not in ("x86_64", "AMD64") or compiler is None or off:
        pytest.skip("not x86-64 with a C compiler, or the library turned off by the environment")
    (tmp_path / "probe.c").write_text(PROBE)
    probe = subprocess.run([compiler, "-c", "-o", str(tmp_path / "probe.o"), str(tmp_path / "probe.c")],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"{compiler} has no AVX-512 BF16 intrinsics: {probe.stderr.strip()[-200:]}")
    assert rowdot.unavailable() is None, rowdot.unavailable()


def test_the_sources_build_for_a_cpu_without_the_x86_kernels(tmp_path):
    # On aarch64 (Ascend hosts) only the portable code is compiled: the sources as such a machine
    # reads them (every x86-64 block left out) must still build, or every kernel goes missing there.
    import subprocess

    compiler = rowdot._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    for source in rowdot.SOURCES + rowdot.HEADERS:
        (tmp_path / source.name).write_text(source.read_text().replace("defined(__x86_64__)", "0"))
    done = subprocess.run([compiler, *rowdot.CFLAGS, "-o", str(tmp_path / "portable.so"),
                           *(str(tmp_path / source.name) for source in rowdot.SOURCES)],
                          capture_output=True, text=True, timeout=rowdot.BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_installed_package_carries_every_source_the_library_is_built_from():
    # The library is compiled at first use from files next to rowdot.py: a non-editable install
    # has only what pyproject's package-data names (argmax.c was once left out of it).
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    path = Path(rowdot.__file__).parents[1] / "pyproject.toml"
    if not path.exists():
        pytest.skip(f"no {path}: an installed copy, not the repository")
    pyproject = tomllib.loads(path.read_text())
    shipped = set(pyproject["tool"]["setuptools"]["package-data"]["starcoder_tp"])
    needed = {path.name for path in rowdot.SOURCES + rowdot.HEADERS}
    assert needed <= shipped, f"package-data lacks {sorted(needed - shipped)}"
