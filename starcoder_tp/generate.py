"""Loading a rank's model, and timed greedy generation: prefill, then one token per step."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig
from .device import Device
from .model import TPGPTBigCode, TPGroup
from .shard import load_part


def load_model(shard_dir: str | Path, tp: TPGroup, device: torch.device, prepack: bool = True,
               compile: bool = False) -> TPGPTBigCode:
    """Build this rank's model straight from its part: created on the meta device, then the
    loaded tensors are assigned, so the weights exist once in memory. With `prepack`, the linear
    weights are then re-laid out for oneDNN where it can take them (CPU; see linear.py). With
    `compile`, decode steps run through torch.compile instead (which packs weights itself)."""
    raw_config, state = load_part(shard_dir, tp.rank, tp.world_size, device="cpu" if device.type == "npu" else device)
    config = ModelConfig.from_hf_dict(raw_config, source=f"{shard_dir}/part_model/{tp.rank}/config.json")
    with torch.device("meta"):
        model = TPGPTBigCode(config, tp)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"part {tp.rank} of {shard_dir}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ValueError(
                f"part {tp.rank} of {shard_dir}: tensor {name} has shape {list(state[name].shape)}, "
                f"expected {list(ref.shape)} for rank {tp.rank} of {tp.world_size}"
            )
    if device.type == "npu":
        state = {name: t.to(device) for name, t in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    del state
    if compile:
        model.compile_decode()
    elif prepack:
        model.prepack()
    return model.eval()


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

    @property
    def decode_ms_per_token(self) -> float:
        return statistics.fmean(self.decode_ms) if self.decode_ms else 0.0

    @property
    def total_ms(self) -> float:
        return self.first_token_ms + sum(self.decode_ms)


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


def _spin(ms: float) -> None:
    """Busy-wait, as a slower kernel would: a sleep lets the core idle, and the step after it
    then runs measurably slower (cold core; +30% on the first decode step after a 7 ms sleep
    here), which leaked a prefill injection into the decode metric."""
    deadline = time.perf_counter() + ms / 1e3
    while time.perf_counter() < deadline:
        pass


@torch.inference_mode()
def timed_generate(model: TPGPTBigCode, device: Device, prompts: list[list[int]], max_new_tokens: int, *,
                   ignore_eos: bool = True, max_seq_len: int | None = None, topk: int = 0,
                   inject_prefill_ms: float = 0.0, inject_decode_ms: float = 0.0) -> GenerationResult:
    """Greedy decoding of `max_new_tokens` tokens for a (ragged) batch, timed step by step.

    Every clock read follows a device synchronisation; the step times are reduced to the
    maximum over ranks at the end (not in the loop, which would add a collective per step).
    With ignore_eos the logits are left alone and exactly `max_new_tokens` are produced;
    otherwise finished rows are filled with EOS and the loop stops when all have finished.
    inject_prefill_ms / inject_decode_ms add a fixed delay inside the timed regions: a test-only
    knob that proves the regression gate catches a slowdown.
    """
    config = model.config
    cache_len = check_request(config, prompts, max_new_tokens, max_seq_len)
    eos = config.eos_token_id if config.eos_token_id is not None else 0
    dev = model.transformer.ln_f.weight.device
    ids, mask = left_pad(prompts, pad_id=eos)
    batch, prompt_len = ids.shape
    padded = not bool(mask.all())
    ids, mask = ids.to(dev), mask.to(dev)
    model.setup_cache(batch, cache_len)
    key_valid = None  # no padding (equal-length prompts, as in every perf case): no mask at all
    if padded:
        key_valid = torch.ones((batch, cache_len), dtype=torch.bool, device=dev)
        key_valid[:, :prompt_len] = mask
    position_ids = (mask.long().cumsum(-1) - 1).clamp_(min=0)  # [B, L]
    next_position = position_ids[:, -1:] + 1  # [B, 1]
    out = torch.full((batch, max_new_tokens), eos, dtype=torch.long, device=dev)
    finished = torch.zeros(batch, dtype=torch.bool, device=dev)
    top_vals, top_ids = [], []
    step_ms: list[float] = []
    compiled = model.compiled_decode
    if compiled is not None:
        # Static shapes: the validity of every slot of the cache as allocated (it may be longer
        # than this request, when reused), and the slot written as a tensor.
        all_valid = torch.ones((batch, model.cache_len), dtype=torch.bool, device=dev)
        all_valid[:, :prompt_len] = mask
        slot = torch.zeros(1, dtype=torch.long, device=dev)

    # The request reaches the ranks one after the other (and the driver may wait for a core to
    # send the next one): without a barrier, the first rank's prefill clock would include that
    # skew, waiting for the others in its first collective.
    model.tp.barrier(dev)
    device.synchronize()
    started = time.perf_counter()
    logits = model(ids, position_ids, 0, key_valid)
    if inject_prefill_ms:  # before the last collective of the step: every rank's step holds it once
        _spin(inject_prefill_ms)
    token = model.pick_greedy(logits)
    device.synchronize()
    step_ms.append((time.perf_counter() - started) * 1e3)
    generated = 1
    while True:
        if topk:
            vals, tids = model.topk(logits, topk)
            top_vals.append(vals), top_ids.append(tids)
        if not ignore_eos:
            token = torch.where(finished, torch.full_like(token, eos), token)
            finished |= token == eos
        out[:, generated - 1] = token
        if generated == max_new_tokens or (not ignore_eos and bool(finished.all())):
            break
        device.synchronize()
        started = time.perf_counter()
        if compiled is not None:
            if dev.type == "cuda":  # CUDA graphs (compile_decode): the last step's outputs are dead
                torch.compiler.cudagraph_mark_step_begin()
            logits = compiled(token.unsqueeze(-1), next_position, slot.fill_(prompt_len + generated - 1), all_valid)
        else:
            logits = model(token.unsqueeze(-1), next_position, prompt_len + generated - 1, key_valid)
        if inject_decode_ms:
            _spin(inject_decode_ms)
        token = model.pick_greedy(logits)
        device.synchronize()
        step_ms.append((time.perf_counter() - started) * 1e3)
        if model.step_hook is not None:
            model.step_hook()
        next_position += 1
        generated += 1

    # On the model's device: nccl/hccl reduce device tensors only.
    times = model.tp.all_reduce_max_(torch.tensor([*step_ms, sum(step_ms)], dtype=torch.float64, device=dev)).cpu()
    return GenerationResult(
        output_ids=out[:, :generated].cpu(),
        first_token_ms=float(times[0]),
        decode_ms=[float(t) for t in times[1:-1]],
        timed_ms=float(times[-1]),
        topk_logprobs=torch.stack(top_vals, dim=1).cpu() if topk else None,
        topk_ids=torch.stack(top_ids, dim=1).cpu() if topk else None,
    )
