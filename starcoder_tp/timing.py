"""Generation timed step by step, as the perf suite and `generate` report it: the first token
(prefill + its argmax) and every decode step, each clock read after a device synchronisation,
the slowest rank's figures."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .device import Device
from .generate import StepHooks, generate
from .model import TPCausalLM
from .sampling import Sampling


@dataclass
class GenerationResult:
    """What one timed greedy generation produced; times are the slowest rank's."""

    output_ids: torch.Tensor  # [B, new_tokens], generated tokens only
    first_token_ms: float  # prefill + the first token
    decode_ms: list[float] = field(default_factory=list)  # one entry per later token
    # The slowest rank's own sum of its timed steps: each rank's steps lie inside the request,
    # so this never exceeds the wall time around it (the sum of per-step maxima can, by the
    # skew between ranks, when a rank is held up after a step's last collective).
    timed_ms: float = 0.0
    topk_logprobs: torch.Tensor | None = None  # [B, new_tokens, k] when asked for
    topk_ids: torch.Tensor | None = None
    kernels: str = ""  # the model's kernel plan for this batch (TPCausalLM.kernels_summary)
    setup_s: dict[str, float] = field(default_factory=dict)  # the set-up's phases, untimed (TPCausalLM.setup_s)

    @property
    def decode_ms_per_token(self) -> float:
        return statistics.fmean(self.decode_ms) if self.decode_ms else 0.0

    @property
    def total_ms(self) -> float:
        return self.first_token_ms + sum(self.decode_ms)


class StepTimer(StepHooks):
    """Each step's milliseconds on this rank. The step times are reduced to the maximum over
    ranks once, at the end (`slowest`), not in the loop, which would add a collective per step."""

    def __init__(self, model: TPCausalLM, device: Device):
        self.model, self.device = model, device
        self.step_ms: list[float] = []
        self._started = 0.0

    def step_begin(self, step: int) -> None:
        if step == 0:
            # The request reaches the ranks one after the other (and the driver may wait for a
            # core to send the next one): without a barrier, the first rank's prefill clock
            # would include that skew, waiting for the others in its first collective.
            self.model.tp.barrier(self.model.transformer.ln_f.weight.device)
        self.device.synchronize()
        self._started = time.perf_counter()

    def step_end(self, step: int) -> None:
        self.device.synchronize()
        self.step_ms.append((time.perf_counter() - self._started) * 1e3)

    def slowest(self) -> tuple[list[float], float]:
        """Every step's maximum over the ranks, and the largest of the ranks' own sums."""
        dev = self.model.transformer.ln_f.weight.device  # nccl/hccl reduce device tensors only
        times = self.model.tp.max_(torch.tensor([*self.step_ms, sum(self.step_ms)], dtype=torch.float64, device=dev))
        times = times.cpu().tolist()
        return times[:-1], times[-1]


def timed_generate(model: TPCausalLM, device: Device, prompts: list[list[int]], max_new_tokens: int, *,
                   ignore_eos: bool = True, max_seq_len: int | None = None, topk: int = 0,
                   hooks: Sequence[StepHooks] = (), sampling: Sampling | None = None,
                   seeds: Sequence[int] | None = None) -> GenerationResult:
    """`generate` with every step timed; `hooks` run inside the timed steps."""
    timer = StepTimer(model, device)
    generation = generate(model, prompts, max_new_tokens, ignore_eos=ignore_eos, max_seq_len=max_seq_len, topk=topk,
                          hooks=(timer, *hooks), sampling=sampling, seeds=seeds)
    steps, timed_ms = timer.slowest()
    return GenerationResult(output_ids=generation.output_ids, first_token_ms=steps[0], decode_ms=steps[1:],
                            timed_ms=timed_ms, topk_logprobs=generation.topk_logprobs, topk_ids=generation.topk_ids,
                            kernels=model.kernels_summary(), setup_s=dict(model.setup_s))
