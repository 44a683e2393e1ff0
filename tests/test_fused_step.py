"""fused_step.py: a decode step's layers in one call of fused_step.c, where every linear runs in
panels and the attention by attend.c. The logits of the layers run op by op, step after step, at
world size 1 and across two (stand-in) ranks; when a model fuses and when it runs op by op, and
that a new layout or cache makes it decide again."""
from pathlib import Path

import pytest
import torch

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
    """Decode attention by attend.c, whatever this machine measured faster (the fused step needs it)."""
    if not decode_attention.available():
        pytest.skip("attend.c needs AVX-512 and a C compiler: this CPU or build does not run it")
    monkeypatch.setattr(decode_attention.DECODE_FORM, "calibrated", "ours (test)")
    monkeypatch.setattr(decode_attention.DECODE_FORM, "ours", True)
    monkeypatch.delenv(fused_step.ENV, raising=False)


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
def test_the_layers_in_one_call_give_the_logits_of_the_layers_op_by_op(tmp_path, dtype, world_size, batch):
    """The same kernels and roundings; only the LayerNorm's moments are summed in another order (an ulp
    of a normalised element, now and then). bf16 within 2^-10 of the largest logit, a fifth of its ulp:
    attend.c widened to fp32 instead of its bf16 dot products (as the model runs it where the CPU has
    them) moves them 10x that."""
    model = tiny(tmp_path, dtype, world_size)
    calls = []
    run = fused_step.FusedStep.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_step.FusedStep, "run", lambda self, x, start: calls.append(start) or run(self, x, start))
        fused = decode_logits(model, batch, fused=True)
    op_by_op = decode_logits(model, batch, fused=False)
    assert calls == list(range(9, 15)), "every decode step ran fused"
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -10
    torch.testing.assert_close(fused, op_by_op, rtol=tolerance, atol=tolerance * op_by_op.abs().max().item())
    assert torch.equal(fused.argmax(-1), op_by_op.argmax(-1))


@each([torch.float32])
def test_what_the_fused_step_does_not_take_runs_op_by_op(tmp_path, dtype, monkeypatch):
    model = tiny(tmp_path, dtype)
    with torch.inference_mode():
        model.setup_cache(2, 16)
    assert fused_step.why_not(model) is None
    monkeypatch.setenv(fused_step.ENV, "0")
    assert fused_step.why_not(model) == f"{fused_step.ENV}=0"
    monkeypatch.delenv(fused_step.ENV)
    monkeypatch.setattr(decode_attention.DECODE_FORM, "ours", False)
    assert fused_step.why_not(model) == "the decode attention runs SDPA"
    monkeypatch.setattr(decode_attention.DECODE_FORM, "ours", True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.transformer.h[0].attn, "head_dim", 24)  # attend.c takes multiples of 16
        assert fused_step.why_not(model) == "attend.c does not take 8 heads of 24 over 1 K/V heads"
    plain = tiny(tmp_path, dtype, kernels="plain")
    with torch.inference_mode():
        plain.setup_cache(2, 16)
    assert fused_step.why_not(plain) == "a linear's decode kernel is plain, not panels"
    rotary = tiny(tmp_path, dtype, name="tiny-starcoder2")
    with torch.inference_mode():
        rotary.setup_cache(2, 16)
    assert fused_step.why_not(rotary).startswith("rotary positions")


@each([torch.float32])
def test_a_step_with_a_mask_or_more_tokens_runs_op_by_op(tmp_path, dtype, monkeypatch):
    model = tiny(tmp_path, dtype)
    calls = []
    monkeypatch.setattr(fused_step.FusedStep, "run", lambda self, x, start: calls.append(start) or x)
    ids, positions = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.arange(3).expand(2, 3)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[0, 0] = False  # left padding: a mask
    with torch.inference_mode():
        model.setup_cache(2, 16)
        model(ids, positions, 0, valid)
        model(ids[:, :1], positions[:, :1] + 3, 3, valid)
        model(ids[:, 1:], positions[:, 1:] + 3, 3)  # two new tokens
        assert calls == []
        model(ids[:, :1], positions[:, :1] + 3, 3)
    assert calls == [3], "a plain step fuses"


@each([torch.float32])
def test_a_new_cache_or_layout_decides_again(tmp_path, dtype):
    model = tiny(tmp_path, dtype)
    one = torch.tensor([[5]])
    with torch.inference_mode():
        model.setup_cache(1, 16)
        model(one, one, 0)
        first = model.fused
        assert isinstance(first, fused_step.FusedStep) and first.batch == 1
        model.setup_cache(2, 16)  # a new batch: new caches, weights laid out again
        assert model.fused is False
        model(one.expand(2, 1), one.expand(2, 1), 0)
        assert model.fused is not first and model.fused.batch == 2
        assert model.fused.layers[4] == model.transformer.h[0].attn.k_cache.data_ptr(), "it points into the new cache"


@each()
def test_the_summed_partial_and_its_bias_are_rounded_as_the_ops_round_them(tmp_path, dtype):
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
    end = step.segments  # an empty range: the sum folded in, no layer run
    code = step.lib.fused_step(step.layers, end, end, x.data_ptr(), incoming.data_ptr(), bias.data_ptr(), None,
                               step.scratch.data_ptr(), step.dims, 0, step.eps, step.scale)
    assert code == 0 and torch.equal(x, expected), (x - expected).abs().max()
