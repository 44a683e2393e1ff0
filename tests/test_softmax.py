"""softmax.py, the causal softmax of the multi-query prefill's blocks by softmax.c: torch's scale,
mask and softmax to within fp32 rounding (bf16: the exact softmax of the bf16 scores rounded once,
at least as close as torch's), exact zeros past each row's last key, rows summing to 1,
causal_blocks alike with either softmax, and inputs it does not take refused by value."""
import pytest
import torch
import torch.nn.functional as F

from starcoder_tp import softmax
from starcoder_tp.attention import causal_blocks

DTYPES = [torch.float32, torch.bfloat16]
needs = pytest.mark.skipif(not softmax.available(torch.float32),
                           reason="softmax.c needs AVX-512 and a C compiler: this CPU or build does not run it")


def torch_causal(scores: torch.Tensor, tokens: int, heads: int, first: int, scale: float) -> torch.Tensor:
    g, _, s = scores.shape
    after = torch.full((tokens, tokens), float("-inf"), dtype=scores.dtype).triu_(1)
    scores = scores.mul(scale)
    scores.view(g, tokens, heads, s)[..., first:].add_(after.unsqueeze(1))
    return torch.softmax(scores, dim=-1)


@needs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups,tokens,heads,first", [(1, 1, 16, 0), (1, 32, 16, 0), (2, 32, 16, 480),
                                                       (3, 7, 3, 33), (1, 17, 5, 1)])
@pytest.mark.parametrize("scale", [0.125, 128 ** -0.5])  # (head_dim 64; 128, not a power of two)
def test_each_row_is_torchs_softmax_of_the_keys_it_sees_and_zero_past_them(dtype, groups, tokens, heads, first,
                                                                            scale):
    torch.manual_seed(tokens)
    s = first + tokens
    scores = (torch.randn(groups, tokens * heads, s) * 8).to(dtype)
    ours = softmax.causal_(scores.clone(), tokens, heads, first, scale)
    theirs = torch_causal(scores, tokens, heads, first, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    else:  # torch rounds the scaled scores to bf16 before its softmax (1.5% off at 128 ** -0.5); ours
        # is the exact softmax of the bf16 scores rounded once
        exact = torch_causal(scores.double(), tokens, heads, first, scale)
        torch.testing.assert_close(ours.double(), exact, rtol=2 ** -8, atol=1e-7)
        assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()
    seen = (torch.arange(s) <= first + torch.arange(tokens)[:, None])  # [tokens, S]
    rows = ours.view(groups, tokens, heads, s).float()
    assert bool((rows.masked_select(~seen[None, :, None, :]) == 0).all()), "exact zeros past a row's last key"
    torch.testing.assert_close(rows.sum(-1), torch.ones(groups, tokens, heads), rtol=0, atol=1e-5 if
                               dtype == torch.float32 else 2e-2)


@needs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_and_equal_scores_stay_finite(dtype):
    scores = torch.full((1, 4 * 2, 20), 3e4).to(dtype)
    scores[0, 0, 0] = -3e4  # e^(-huge) beside e^0: 0, not NaN
    out = softmax.causal_(scores, 4, 2, 16, 1.0).float()
    assert bool(out.isfinite().all())
    torch.testing.assert_close(out[0, 1, :17], torch.full((17,), 1 / 17), rtol=2 ** -7, atol=0)  # token 0, head 1
    assert out[0, 0, 0] == 0 and out[0, 0, 1:17].sum().item() == pytest.approx(1, abs=1e-2)


@needs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,tokens", [(1, 100), (3, 64)])
@pytest.mark.parametrize("dim", [64, 128])
def test_causal_blocks_with_either_softmax_is_sdpa(dtype, batch, tokens, dim):
    torch.manual_seed(0)
    q = torch.randn(batch, tokens, 6, dim).to(dtype)[:, :, :4]  # a strided view, as the model's fused q/k/v
    keys, values = torch.randn(batch, 1, tokens, dim).to(dtype), torch.randn(batch, 1, tokens, dim).to(dtype)
    scale = dim ** -0.5
    want = F.scaled_dot_product_attention(q.transpose(1, 2).float(), keys.expand(-1, 4, -1, -1).float(),
                                          values.expand(-1, 4, -1, -1).float(), is_causal=True, scale=scale)
    want = want.transpose(1, 2).reshape(batch, tokens, 4 * dim)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2e-2)
    for name in ("ours", "torch"):
        got = causal_blocks(q, keys, values, scale, softmax=name)
        torch.testing.assert_close(got.float(), want, **tolerance, msg=lambda m: f"{name}'s softmax: {m}")


@needs
def test_what_the_kernel_does_not_take_is_refused_by_value():
    scores = torch.randn(1, 8, 12)
    with pytest.raises(ValueError, match=r"\[1, 8, 12\].*4 tokens of 2 heads from token 9"):
        softmax.causal_(scores, 4, 2, 9, 1.0)  # 9 + 4 keys > 12
    with pytest.raises(ValueError, match="contiguous: False"):
        softmax.causal_(torch.randn(1, 12, 8).transpose(1, 2), 4, 2, 0, 1.0)
    with pytest.raises(ValueError, match="3 heads"):
        softmax.causal_(scores, 4, 3, 0, 1.0)
    with pytest.raises(ValueError, match="float64"):
        softmax.causal_(scores.double(), 4, 2, 0, 1.0)
    with pytest.raises(ValueError, match="from token -1"):
        softmax.causal_(scores, 4, 2, -1, 1.0)
    for scale in (0.0, -0.125, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"scale {scale!r}"):
            softmax.causal_(scores, 4, 2, 0, scale)
    with pytest.raises(ValueError, match="softmax 'fast'"):
        causal_blocks(torch.randn(1, 4, 2, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), 0.25, softmax="fast")


@needs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_nan_score_makes_its_row_nan_as_torchs_does(dtype):
    scores = torch.randn(1, 2 * 1, 8).to(dtype)
    scores[0, 1, 3] = float("nan")  # token 1 sees keys 0..7
    out = softmax.causal_(scores, 2, 1, 6, 1.0).float()
    assert bool(out[0, 1].isnan().all()) and bool(out[0, 0].isfinite().all())
