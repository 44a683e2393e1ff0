"""Two runners with one interface, as vLLM's tests have: the reference (`transformers` on one
device) and the tensor-parallel system under test. Both take token-id prompts and return the
greedy or sampled tokens, optionally with the top-k log-probabilities at every step. Sampling
is this project's (sampling.py) on both sides, so that one seed draws one sequence on each."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import Device
from ..generate import left_pad
from ..parallel import GroupSpec, WorkerGroup
from ..sampling import Sampling, SequenceStreams, sample_tokens
from ..shard import DTYPES


@dataclass
class GreedyOutput:
    output_ids: list[list[int]]  # generated tokens only, one row per prompt
    topk_logprobs: list[list[list[float]]] | None = None  # [B][step][k]
    topk_ids: list[list[list[int]]] | None = None


class HFRunner:
    """`transformers`' GPTBigCodeForCausalLM.generate on one device: the independent reference."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).to(device).eval()
        self.device = device
        self.eos = self.model.config.eos_token_id

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, *, ignore_eos: bool = True,
                        topk: int = 0) -> GreedyOutput:
        return self._generate(prompts, max_new_tokens, ignore_eos, topk, processors=[])

    def generate_sampled(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, seeds: list[int], *,
                         ignore_eos: bool = True, topk: int = 0) -> GreedyOutput:
        return self._generate(prompts, max_new_tokens, ignore_eos, topk,
                              processors=[_ForcedSample(sampling, seeds, self.model.config.vocab_size)])

    @torch.inference_mode()
    def _generate(self, prompts, max_new_tokens, ignore_eos, topk, processors) -> GreedyOutput:
        from transformers import LogitsProcessorList

        pad = self.eos if self.eos is not None else 0
        ids, mask = left_pad(prompts, pad_id=pad)
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.long().to(self.device), do_sample=False,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else None,
            eos_token_id=None if ignore_eos else self.eos, pad_token_id=pad,
            return_dict_in_generate=True, output_logits=bool(topk), logits_processor=LogitsProcessorList(processors),
        )
        new = out.sequences[:, ids.shape[1]:].cpu()
        result = GreedyOutput(new.tolist())
        if topk:
            logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [B, steps, V]
            vals, idx = logprobs.topk(topk, dim=-1)
            result.topk_logprobs, result.topk_ids = vals.tolist(), idx.tolist()
        return result


class _ForcedSample:
    """A logits processor that leaves only this project's sampled token, so that transformers'
    greedy step takes it: the reference samples from its own logits with the same draws."""

    def __init__(self, sampling: Sampling, seeds: list[int], vocab_size: int):
        self.sampling, self.streams, self.vocab_size = sampling, SequenceStreams(list(seeds)), vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = sample_tokens(scores[:, : self.vocab_size], self.streams.next(), self.sampling)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, token.unsqueeze(-1), 0.0)


class TPRunner:
    """The tensor-parallel runtime behind the same interface (a persistent worker group)."""

    def __init__(self, shard_dir: str | Path, world_size: int, device: Device = Device("cpu"), **spec_kwargs):
        self.group = WorkerGroup(GroupSpec(str(shard_dir), world_size, device, **spec_kwargs)).start()

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, *, ignore_eos: bool = True,
                        topk: int = 0) -> GreedyOutput:
        result, _ = self.group.generate(prompts, max_new_tokens, ignore_eos=ignore_eos, topk=topk)
        out = GreedyOutput(result.output_ids.tolist())
        if topk:
            out.topk_logprobs, out.topk_ids = result.topk_logprobs.tolist(), result.topk_ids.tolist()
        return out

    def generate_sampled(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, seeds: list[int], *,
                         ignore_eos: bool = True, topk: int = 0) -> GreedyOutput:
        result, _ = self.group.generate(prompts, max_new_tokens, ignore_eos=ignore_eos, topk=topk,
                                        sampling=sampling, seeds=seeds)
        out = GreedyOutput(result.output_ids.tolist())
        if topk:
            out.topk_logprobs, out.topk_ids = result.topk_logprobs.tolist(), result.topk_ids.tolist()
        return out

    def close(self) -> None:
        self.group.close()
