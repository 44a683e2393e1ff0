"""Greedy generation on one rank: a request checked and made ready (left padding, positions,
the cache), then the prefill and one decode step per new token. Observers (`StepHooks`) see
every step begin and end; timing (timing.py) and the suite's injected faults are observers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import ModelConfig
from .model import TPCausalLM
from .sampling import Sampling, SequenceStreams, sample_tokens


class StepHooks:
    """What an observer of generation may do at each step (0 is the prefill, then 1, 2, ...
    for the decode steps); the default does nothing. `before_pick` runs after the step's forward
    and before its last collective (the greedy pick's), so that whatever it does is held
    once by every rank's step."""

    def step_begin(self, step: int) -> None:
        pass

    def before_pick(self, step: int) -> None:
        pass

    def step_end(self, step: int) -> None:
        pass


@dataclass
class Generation:
    output_ids: torch.Tensor  # [B, new_tokens], generated tokens only
    topk_logprobs: torch.Tensor | None = None  # [B, new_tokens, k] when asked for
    topk_ids: torch.Tensor | None = None


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and a [B, L] bool mask (False on the left padding) for ragged prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt):] = True
    return ids, mask


def check_request(config: ModelConfig, prompts: list[list[int]], max_new_tokens: int, max_seq_len: int | None) -> int:
    """Validate a request against the model; returns the cache length to use."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts given (batch size 0)")
    for row, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {row}: token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    needed = max(len(p) for p in prompts) + max_new_tokens
    cache_len = needed if max_seq_len is None else max_seq_len
    if cache_len < needed:
        raise ValueError(f"max_seq_len={max_seq_len} is shorter than input + output = {needed} tokens")
    if cache_len > config.n_positions:
        raise ValueError(
            f"input + output needs {cache_len} positions (max_seq_len), but the model has n_positions={config.n_positions}"
        )
    return cache_len


class _Request:
    """A request laid out on the model's device: ids, positions and the validity of every cache
    slot, and the cache allocated for it."""

    def __init__(self, model: TPCausalLM, prompts: list[list[int]], max_new_tokens: int, max_seq_len: int | None):
        config = model.config
        cache_len = check_request(config, prompts, max_new_tokens, max_seq_len)
        self.eos = config.eos_token_id if config.eos_token_id is not None else 0
        dev = model.transformer.ln_f.weight.device
        ids, mask = left_pad(prompts, pad_id=self.eos)
        self.batch, self.prompt_len = ids.shape
        self.ids, mask = ids.to(dev), mask.to(dev)
        # The kernels weigh this request's prefill against the decode steps the cache has room for
        # (kernels.weigh): a caller that sizes the cache for more tokens (the perf suite's one-token
        # warm-up of a case) gets the layouts of the whole request.
        model.setup_cache(self.batch, cache_len, request=(self.batch * self.prompt_len, cache_len - self.prompt_len - 1))
        self.key_valid = None  # no padding (equal-length prompts, as in every perf case): no mask at all
        if not bool(mask.all()):
            self.key_valid = torch.ones((self.batch, cache_len), dtype=torch.bool, device=dev)
            self.key_valid[:, :self.prompt_len] = mask
        self.position_ids = (mask.long().cumsum(-1) - 1).clamp_(min=0)  # [B, L]
        if model.compiled_decode is not None:
            # Fixed shapes: the validity of every slot of the cache as allocated (it may be
            # longer than this request, when reused), and the slot written as a tensor.
            self.all_valid = torch.ones((self.batch, model.cache_len), dtype=torch.bool, device=dev)
            self.all_valid[:, :self.prompt_len] = mask
            self.slot = torch.zeros(1, dtype=torch.long, device=dev)


@torch.inference_mode()
def generate(model: TPCausalLM, prompts: list[list[int]], max_new_tokens: int, *, ignore_eos: bool = True,
             max_seq_len: int | None = None, topk: int = 0, hooks: Sequence[StepHooks] = (),
             sampling: Sampling | None = None, seeds: Sequence[int] | None = None) -> Generation:
    """Greedy decoding of `max_new_tokens` tokens for a (ragged) batch, or with `sampling` a
    draw from each sequence's own stream (`seeds`, one per prompt; see sampling.py). With ignore_eos the
    logits are left alone and exactly `max_new_tokens` are produced; otherwise finished rows
    are filled with EOS and the loop stops when all have finished. `hooks` begin each step in
    their order and end it in the reverse order (an outer timer sees the others' work)."""
    request = _Request(model, prompts, max_new_tokens, max_seq_len)
    streams = None
    if sampling is not None:
        if seeds is None or len(seeds) != len(prompts):
            raise ValueError(f"sampling needs one seed per prompt: {len(prompts)} prompts, seeds {seeds!r}")
        streams = SequenceStreams(list(seeds))
    batch, prompt_len, eos = request.batch, request.prompt_len, request.eos
    dev = request.ids.device
    next_position = request.position_ids[:, -1:] + 1  # [B, 1]
    out = torch.full((batch, max_new_tokens), eos, dtype=torch.long, device=dev)
    finished = torch.zeros(batch, dtype=torch.bool, device=dev)
    top_vals, top_ids = [], []
    compiled = model.compiled_decode

    def step(index: int, run) -> tuple[torch.Tensor, torch.Tensor]:
        for hook in hooks:
            hook.step_begin(index)
        logits = run()
        for hook in hooks:
            hook.before_pick(index)
        if streams is None:
            token = model.pick_greedy(logits)
        else:
            token = sample_tokens(model.gather_logits(logits), streams.next(), sampling)
        for hook in reversed(hooks):
            hook.step_end(index)
        return logits, token

    def decode(last: torch.Tensor, slot: int) -> torch.Tensor:
        if compiled is None:
            return model(last, next_position, slot, request.key_valid)
        if dev.type == "cuda":  # CUDA graphs (compile_decode): the last step's outputs are dead
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(last, next_position, request.slot.fill_(slot), request.all_valid)

    logits, token = step(0, lambda: model(request.ids, request.position_ids, 0, request.key_valid))
    generated = 1
    while True:
        if topk:
            vals, ids = model.top_logprobs(logits, topk)
            top_vals.append(vals), top_ids.append(ids)
        if not ignore_eos:
            token = torch.where(finished, torch.full_like(token, eos), token)
            finished |= token == eos
        out[:, generated - 1] = token
        if generated == max_new_tokens or (not ignore_eos and bool(finished.all())):
            break
        last = token.unsqueeze(-1)
        logits, token = step(generated, lambda: decode(last, prompt_len + generated - 1))
        next_position += 1
        generated += 1

    return Generation(
        output_ids=out[:, :generated].cpu(),
        topk_logprobs=torch.stack(top_vals, dim=1).cpu() if topk else None,
        topk_ids=torch.stack(top_ids, dim=1).cpu() if topk else None,
    )
