"""Timed greedy generation in one process (world size 1): timing record, EOS, request checks."""
import dataclasses

import pytest
import torch

from starcoder_tp.device import Device
from starcoder_tp.generate import left_pad
from starcoder_tp.model import load_model
from starcoder_tp.timing import timed_generate
from starcoder_tp.comm import TPGroup
from starcoder_tp.testing.runners import HFRunner
from starcoder_tp.shard import shard_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory, embedded_dir):
    out = tmp_path_factory.mktemp("ws1") / "s"
    shard_checkpoint(embedded_dir, out, 1)
    return load_model(out, TPGroup(0, 1), torch.device("cpu"))


def test_left_padding_and_mask():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_timed_generation_records_every_step(model, prompts):
    result = timed_generate(model, Device("cpu"), prompts, 12)
    assert result.output_ids.shape == (len(prompts), 12)
    assert result.first_token_ms > 0 and len(result.decode_ms) == 11
    assert all(t > 0 for t in result.decode_ms)
    assert result.total_ms == pytest.approx(result.first_token_ms + sum(result.decode_ms))


def test_ignore_eos_false_stops_at_eos_like_transformers(model, embedded_dir, prompts):
    free_run = timed_generate(model, Device("cpu"), prompts[:2], 20).output_ids
    eos = int(free_run[0, 5])  # make the 6th token of row 0 the "EOS" of this run
    model.config = dataclasses.replace(model.config, eos_token_id=eos)
    try:
        stopped = timed_generate(model, Device("cpu"), prompts[:2], 20, ignore_eos=False).output_ids
        ignored = timed_generate(model, Device("cpu"), prompts[:2], 20, ignore_eos=True).output_ids
    finally:
        model.config = dataclasses.replace(model.config, eos_token_id=0)
    assert torch.equal(ignored, free_run), "ignore_eos must not touch the logits"
    assert stopped[0, :6].tolist() == free_run[0, :6].tolist() and set(stopped[0, 6:].tolist()) <= {eos}
    hf = HFRunner(embedded_dir)
    ids, mask = left_pad(prompts[:2], pad_id=eos)
    reference = hf.model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=20, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)[:, ids.shape[1]:]
    assert stopped.tolist() == reference[:, : stopped.shape[1]].tolist()


def test_static_cache_is_reused_between_requests(model, prompts):
    timed_generate(model, Device("cpu"), [[5] * 20] * 2, 10)
    cache = model.transformer.h[0].attn.k_cache
    timed_generate(model, Device("cpu"), [[7] * 10] * 2, 10)
    assert model.transformer.h[0].attn.k_cache is cache
    result = timed_generate(model, Device("cpu"), [[7] * 10] * 2, 10, max_seq_len=64)
    assert model.transformer.h[0].attn.k_cache.shape[2] == 64 and result.output_ids.shape == (2, 10)


@pytest.mark.parametrize("prompts,new,max_len,message", [
    ([[1, 2]], 0, None, "max_new_tokens must be >= 1, got 0"),
    ([], 4, None, "no prompts given"),
    ([[1, 6144]], 4, None, "token id 6144 is outside the vocabulary"),
    ([[1, -1]], 4, None, "token id -1 is outside"),
    ([[1] * 10], 10, 15, "max_seq_len=15 is shorter than input \\+ output = 20"),
    ([[1] * 4000], 200, None, "needs 4200 positions .* n_positions=4096"),
])
def test_bad_requests_are_refused_with_the_bad_value(model, prompts, new, max_len, message):
    with pytest.raises(ValueError, match=message):
        timed_generate(model, Device("cpu"), prompts, new, max_seq_len=max_len)


def test_unpadded_fast_path_matches_the_masked_path(model):
    """Equal-length prompts take SDPA's own causal masking (no mask built); the same inputs
    through the explicit-mask path (an all-valid key mask) give the same logits, prefill and decode."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    positions = torch.arange(20).expand(3, 20)
    results = []
    for key_valid in (None, torch.ones(3, 24, dtype=torch.bool)):
        model.setup_cache(3, 24)
        prefill = model(ids, positions, 0, key_valid)
        step = model(prefill.argmax(-1, keepdim=True), torch.full((3, 1), 20), 20, key_valid)
        results.append((prefill, step))
    for fast, masked in zip(*results):
        torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-4)


class _GatherFromShards:
    """A TPGroup stand-in for one rank of a simulated group: its all_gather returns every rank's tensor, and
    its all_reduce_ their sum in rank order, from what each rank gave in its last call (so every rank's result
    is whole on a second pass, once all have given theirs). `shm`: whether the ranks share memory."""

    def __init__(self, rank: int, world_size: int, given: list, shm: bool):
        self.rank, self.world_size, self.given = rank, world_size, given
        self.shm = object() if shm else None
        self.calls = []

    def _give(self, t: torch.Tensor) -> None:
        assert all(g is None or (g.dtype, g.shape) == (t.dtype, t.shape) for g in self.given), "ranks' tensors differ"
        self.given[self.rank] = t.clone()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_gather")
        self._give(t)
        return torch.stack([t if g is None else g for g in self.given])

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_reduce_")
        self._give(t)
        total = None
        for other in self.given:  # (a rank yet to give: nothing, on the first pass)
            total = other.clone() if total is None else total if other is None else total + other
        return t.copy_(total)


@pytest.mark.parametrize("way", ["fp32-board", "fp64-gather", "fp64-gather-large-ids"])
@pytest.mark.parametrize("form", ["torch", "argmax.c"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pick_greedy_is_the_full_argmax_with_ties_to_the_lowest_id(dtype, world_size, form, way, monkeypatch):
    from starcoder_tp import argmax
    from starcoder_tp.model import TPCausalLM

    if form == "argmax.c" and not argmax.available():
        pytest.skip("argmax.c is not built or this CPU lacks AVX-512")
    if way == "fp64-gather-large-ids":  # ids past what fp32 holds exactly: doubles, though memory is shared
        monkeypatch.setattr(argmax, "EXACT_FLOAT32_IDS", 12 * world_size - 1)

    # Few distinct values, so that most rows have ties within a shard and across shards.
    gen = torch.Generator().manual_seed(0)
    full = torch.randint(0, 4, (64, 12 * world_size), generator=gen).to(dtype)
    full[3] = 2  # a row of one value: token 0 wins
    full[5, -1] = 9  # the maximum in the last shard only
    full[7, 12 * world_size - 1] = float("nan")  # NaN wins, as in torch.argmax (with a finite max elsewhere)
    full[7, 0] = 9
    full[9] = -0.0  # -0 and +0 are equal: the first wins
    full[9, 1:] = 0.0
    full[11] = float("-inf")  # every logit -inf: token 0
    full[13, 2] = full[13, -1] = float("nan")  # NaNs in the first and the last shard: the first NaN
    expected = full.argmax(dim=-1)
    local = full.shape[1] // world_size
    given = [None] * world_size
    # Two passes, so that every rank's collective sees every rank's candidates on the second; ranks alternate
    # between argmax.c and torch's form where both run (each process times its own: they may differ).
    for second in (False, True):
        for rank in range(world_size):
            ours = (form == "argmax.c") != (rank % 2 == 1 and argmax.available())
            monkeypatch.setattr(argmax, "PICK_FORM", {(64, 12, dtype): ours})
            tp = _GatherFromShards(rank, world_size, given, shm=way != "fp64-gather")
            rank_model = type("RankModel", (), {"tp": tp, "vocab_start": rank * local})()
            pick = TPCausalLM.pick_greedy(rank_model, full[:, rank * local:(rank + 1) * local])
            assert tp.calls == ([] if world_size == 1 else ["all_reduce_" if way == "fp32-board" else "all_gather"])
            if second:
                assert torch.equal(pick, expected), (rank, pick.tolist(), expected.tolist())
