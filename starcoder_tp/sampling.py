"""Temperature / top-p sampling that gives the same tokens at every world size.

The scheme: every rank gathers the whole vocabulary's logits (one all-gather of [B, V/N] per
step) and draws, from its own copy of each sequence's random stream, the same uniform number;
all ranks then pick the same token with no further collective. Merging the shards' top-k
candidates would move fewer bytes, but its result depends on k whenever the nucleus is larger
than k (high temperature, top_p near 1); the gathered logits are exact at every setting and
cost B x V floats a step, against the gigabytes of weights a step streams.

The token is the inverse CDF of the nucleus taken in token-id order, not in probability order:
a tiny difference in the logits between world sizes (another summation order) then moves a
token only when the uniform number falls within that difference of a boundary, instead of
whenever two near-equal probabilities swap places in a sort.

Each sequence has its own generator, seeded from its own seed, and draws one number per step
whether or not it has finished: its tokens do not depend on the batch it runs in."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 to sample (0 is greedy decoding), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


class SequenceStreams:
    """One random stream per sequence; `next()` gives each sequence's next uniform in [0, 1)."""

    def __init__(self, seeds: list[int]):
        for seed in seeds:
            if not (isinstance(seed, int) and 0 <= seed < 2**63):
                raise ValueError(f"a sequence seed must be an integer in [0, 2**63), got {seed!r}")
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def next(self) -> torch.Tensor:  # [B] float64, on the CPU
        return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])


def nucleus_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[B, V] probabilities after temperature and top-p (zero outside the nucleus, not renormalised).

    The nucleus is the most likely tokens, in probability order, up to the first whose
    cumulative probability reaches top_p (that one included), as transformers' TopPLogitsWarper
    keeps them; ties in probability go to the lower token id."""
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_before < sampling.top_p  # the first token is always kept
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return probs * keep


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[B] token ids drawn from the [B, V] full-vocabulary logits with one uniform per row."""
    probs = nucleus_probs(logits, sampling)
    cdf = probs.cumsum(-1)  # [B, V], in token-id order
    target = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # [B, 1]
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # first id whose cdf exceeds the target
    return token.clamp_(max=logits.shape[-1] - 1)
