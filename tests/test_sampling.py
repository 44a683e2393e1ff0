"""Temperature / top-p sampling (sampling.py): the nucleus as transformers keeps it, the draw
itself, per-sequence streams that do not see the batch, and the same tokens at world sizes 1,
2 and 4 and in the transformers reference for one seed."""
import pytest
import torch

from starcoder_tp.sampling import Sampling, SequenceStreams, nucleus_probs, sample_tokens
from starcoder_tp.testing.runners import HFRunner

SAMPLING = Sampling(temperature=0.8, top_p=0.95)
NEW = 24


def test_the_nucleus_is_the_set_transformers_keeps():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.1, 0.5, 0.9, 0.95, 0.999):
        ours = nucleus_probs(logits, Sampling(1.0, top_p)) > 0
        theirs = TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")
        assert torch.equal(ours, theirs), (top_p, (ours != theirs).nonzero()[:5])


def test_draws_follow_the_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -8.0]])
    sampling = Sampling(temperature=1.0, top_p=0.9)
    probs = nucleus_probs(logits, sampling)[0]
    want = probs / probs.sum()
    streams = SequenceStreams([7])
    draws = torch.cat([sample_tokens(logits, streams.next(), sampling) for _ in range(20000)])
    seen = torch.bincount(draws, minlength=5).double() / len(draws)
    assert seen[want == 0].sum() == 0, seen  # outside the nucleus: never
    # 20000 draws: the standard error of each share is below 0.0036, so 0.02 is > 5 sigma.
    assert torch.allclose(seen, want, atol=0.02), (seen, want)


def test_bad_sampling_values_are_refused_naming_them():
    with pytest.raises(ValueError, match="temperature must be > 0 .* got 0"):
        Sampling(0)
    with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\], got 1.5"):
        Sampling(0.2, 1.5)
    with pytest.raises(ValueError, match="seed must be an integer in \\[0, 2\\*\\*63\\), got -1"):
        SequenceStreams([1, -1])


def test_a_sequence_draws_the_same_tokens_whatever_the_others_draw(tp_runners, prompts):
    """Each sequence draws from its own seeded stream: other seeds for the other sequences, or another order,
    change none of its tokens. Compared within one batch's shape: a batch of another size or padding may run
    other kernels, or its layers fused (fused_step.c, whose LayerNorm sums its moments in another order than
    torch's), and which runs is measured on the machine. Those logits agree to ~1e-5, not bit for bit, so a
    token drawn at a boundary can flip, and a comparison across batch sizes would pass or fail with the
    machine's speed (it failed 2 runs in 3 on the EPYC Zen 4 once fusion_choice.py fused batch 1 more often)."""
    runner = tp_runners(1)
    seeds = [11, 22, 33, 44]
    together = runner.generate_sampled(prompts, NEW, SAMPLING, seeds).output_ids
    others = runner.generate_sampled(prompts, NEW, SAMPLING, [11, 99, 33, 77]).output_ids
    assert (others[0], others[2]) == (together[0], together[2]), (others, together)
    assert (others[1], others[3]) != (together[1], together[3]), "the other seeds draw otherwise"
    reordered = runner.generate_sampled(prompts[::-1], NEW, SAMPLING, seeds[::-1]).output_ids
    assert reordered[::-1] == together


def test_the_seed_decides_the_sample(tp_runners, prompts):
    runner = tp_runners(1)
    first = runner.generate_sampled(prompts, NEW, SAMPLING, [1, 2, 3, 4]).output_ids
    assert runner.generate_sampled(prompts, NEW, SAMPLING, [1, 2, 3, 4]).output_ids == first
    other = runner.generate_sampled(prompts, NEW, SAMPLING, [5, 6, 7, 8]).output_ids
    assert sum(a != b for a, b in zip(first, other)) >= 3, (first, other)
    greedy = runner.generate_greedy(prompts, NEW).output_ids
    assert first != greedy  # it samples: at temperature 0.8 four sequences of 24 tokens leave the argmax


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_draw_the_tokens_of_one_rank_and_of_transformers(tp_runners, prompts, embedded_dir, world_size):
    seeds = [101, 202, 303, 404]
    hf = HFRunner(embedded_dir)
    reference = hf.generate_sampled(prompts, NEW, SAMPLING, seeds).output_ids
    assert tp_runners(1).generate_sampled(prompts, NEW, SAMPLING, seeds).output_ids == reference
    assert tp_runners(world_size).generate_sampled(prompts, NEW, SAMPLING, seeds).output_ids == reference
    # Stopping at EOS: finished rows keep drawing on both sides, so the other rows' streams stay aligned.
    hot = Sampling(temperature=1.5)
    stopping = hf.generate_sampled(prompts, NEW, hot, seeds, ignore_eos=False).output_ids
    ours = tp_runners(world_size).generate_sampled(prompts, NEW, hot, seeds, ignore_eos=False).output_ids
    assert ours == stopping, (ours, stopping)


def test_sampling_requests_are_checked_before_the_ranks(tp_runners, prompts):
    runner = tp_runners(2)
    with pytest.raises(ValueError, match="one seed per prompt: 4 prompts, seeds \\[1\\]"):
        runner.generate_sampled(prompts, NEW, SAMPLING, [1])
    with pytest.raises(ValueError, match="got 'x'"):
        runner.generate_sampled(prompts, NEW, SAMPLING, [1, 2, 3, "x"])
    assert runner.generate_greedy(prompts[:1], 2).output_ids  # the group still serves
