"""RoPE's rotation by rotary.c (rotary.rotate): torch's values to the bit, in place, on the strided
views the model rotates, and torch's own form wherever rotary.c does not take the call; the cos and sin
tables a cache holds (starcoder2.RotaryCache) to the bit."""
import pytest
import torch

from starcoder_tp import rotary, rowdot
from starcoder_tp.starcoder2 import RotaryCache, apply_rotary, rotary_tables

BUILT = rowdot.library()[0] is not None
needs_library = pytest.mark.skipif(not BUILT, reason=f"our kernels' library is not built here: {rowdot.library()[1]}")


def tables(b: int, t: int, d: int, dtype: torch.dtype, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # (StarCoder2's theta)
    positions = (start + torch.arange(t)).expand(b, t) + torch.arange(b)[:, None] * 7  # a batch at its own places
    return rotary_tables(positions, inv_freq, dtype)


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b, t, h, kv, d", [(1, 512, 8, 2, 128), (3, 17, 4, 1, 64), (2, 1, 8, 2, 128), (1, 5, 2, 2, 6)])
def test_the_rotation_is_torchs_to_the_bit_in_place_on_the_projections_views(dtype, b, t, h, kv, d):
    torch.manual_seed(t)
    qkv = (torch.randn(b, t, (h + 2 * kv) * d) * 30).to(dtype)  # (large values: every rounding shows)
    q = qkv[..., :h * d].view(b, t, h, d)
    k = qkv[..., h * d:(h + kv) * d].view(b, t, kv, d)
    cos, sin = tables(b, t, d, dtype, start=1000)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v_before = qkv[..., (h + kv) * d:].clone()
    taken = rotary.takes(q, cos, sin)  # (bf16: from the AVX2 path on)
    assert taken == (dtype == torch.float32 or rowdot.runs_at_least("avx2")) and taken == rotary.takes(k, cos, sin)
    got_q, got_k = rotary.rotate(q, cos, sin), rotary.rotate(k, cos, sin)
    assert (got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()) == taken, "in place where taken"
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(qkv[..., (h + kv) * d:], v_before), "the values untouched"


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_interleaved_heads_view_and_special_values_rotate_as_torchs(dtype):
    per_head = (torch.randn(2, 9, 4, 3 * 16) * 4).to(dtype)  # HF's per-head [q | k | v]
    per_head[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    per_head[1, 2, 1, 5] = 3.0e38  # (overflows in the sum)
    q = per_head[..., :16]
    cos, sin = tables(2, 9, 16, dtype)
    want = apply_rotary(q, cos, sin)
    taken = rotary.takes(q, cos, sin)
    got = rotary.rotate(q, cos, sin)
    assert (got.data_ptr() == q.data_ptr()) == taken == (dtype == torch.float32 or rowdot.runs_at_least("avx2"))
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_what_rotary_c_does_not_take_runs_torchs_form(monkeypatch):
    x = torch.randn(1, 4, 2, 8)
    cos, sin = tables(1, 4, 8, torch.float32)
    cases = {"float64": (x.double(), cos.double(), sin.double()),
             "a table of another dtype": (x, cos.bfloat16(), sin.bfloat16()),
             "a strided last dimension": (torch.randn(1, 4, 2, 16)[..., ::2], cos, sin),
             "tables not contiguous": (x, cos.transpose(0, 1), sin.transpose(0, 1)),
             "tables of other positions": (x, *tables(1, 3, 8, torch.float32)),
             "grad": (x.clone().requires_grad_(), cos, sin),
             "heads sharing their values": (torch.randn(1, 4, 1, 8).expand(1, 4, 2, 8), cos, sin),
             "rows overlapping": (torch.randn(40).as_strided((1, 4, 2, 8), (32, 4, 8, 1)), cos, sin),
             "tokens before heads": (torch.randn(1, 2, 4, 8).transpose(1, 2), cos, sin)}
    for name, (a, c, s) in cases.items():
        assert not rotary.takes(a, c, s), name
        if name != "tables of other positions":
            out = rotary.rotate(a, c, s)
            assert out.data_ptr() != a.data_ptr() and torch.equal(out, apply_rotary(a, c, s)), name
    monkeypatch.setattr(rowdot, "library", lambda: (None, "not built"))
    assert not rotary.takes(x, cos, sin), "no library"
    assert torch.equal(rotary.rotate(x, cos, sin), apply_rotary(x, cos, sin))


def test_a_traced_call_runs_torchs_form_without_reaching_the_library(monkeypatch):
    """Under torch.compile the rotation is torch's, and nothing of the library (a cached build, ctypes)
    is traced: the check comes first."""
    def reached(*_):
        raise AssertionError("the library was reached while compiling")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(rowdot, "library", reached)
    monkeypatch.setattr(rowdot, "runs_at_least", reached)
    x = torch.randn(1, 4, 2, 8).bfloat16()
    cos, sin = tables(1, 4, 8, torch.bfloat16)
    assert not rotary.takes(x, cos, sin)
    assert torch.equal(rotary.rotate(x, cos, sin), apply_rotary(x, cos, sin))


@needs_library
@pytest.mark.parametrize("wide", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_each_bf16_form_rounds_as_torch(wide):
    """rotary.c's bf16 loop in the baseline's vectors, AVX2's and AVX-512's (where this CPU runs
    them; else the next narrower)."""
    torch.manual_seed(1)
    qkv = (torch.randn(2, 33, 12 * 128) * 30).bfloat16()
    q = qkv[..., :8 * 128].view(2, 33, 8, 128)
    cos, sin = tables(2, 33, 128, torch.bfloat16, start=4000)
    want = apply_rotary(q, cos, sin)
    rowdot.library()[0].rotary_bf16(q.data_ptr(), *q.shape, *q.stride()[:3], cos.data_ptr(), sin.data_ptr(), wide)
    assert torch.equal(q, want)


@needs_library
def test_bf16_takes_rotary_c_only_from_the_avx2_path_on(monkeypatch):
    x, (cos, sin) = torch.randn(1, 4, 2, 8).bfloat16(), tables(1, 4, 8, torch.bfloat16)
    taken = {}
    for path in rowdot.PATHS:
        monkeypatch.setattr(rowdot, "runs_at_least",
                            lambda name, path=path: rowdot.PATHS.index(name) <= rowdot.PATHS.index(path))
        taken[path] = (rotary.takes(x, cos, sin), rotary.takes(x.float(), cos.float(), sin.float()))
    assert taken == {"scalar": (False, True), "avx2": (True, True), "avx512": (True, True), "avx512bf16": (True, True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 80, 128])
def test_the_caches_tables_are_the_steps_own_to_the_bit(dtype, d):
    """A step's cos and sin looked up in tables made with its cache (RotaryCache) are what rotary_tables
    computes for its positions alone: in a decode step [B, 1], ragged rows included, and in a prefill."""
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    cache = RotaryCache(2051, inv_freq, dtype)
    for positions in (torch.tensor([[2050]]), torch.tensor([[7], [0], [1999]]), torch.arange(0, 2051, 3)[None],
                      torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])):
        for looked_up, computed in zip(cache(positions), rotary_tables(positions, inv_freq, dtype)):
            assert looked_up.shape == computed.shape and looked_up.dtype == dtype
            assert torch.equal(looked_up, computed), (positions, (looked_up != computed).nonzero()[:5])
