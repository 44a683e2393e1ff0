"""Attention over the static KV cache: one function for the prefill and the decode step, eager
or with fixed shapes (torch.compile, CUDA graphs), with or without left padding.

A rank holds H query heads and KV key/value heads (KV = 1 for StarCoder's multi-query
attention and for replicated K/V heads, KV = H for multi-head, anything between for
StarCoder2's grouped-query attention); G = H // KV query heads share each K/V head. A K/V head
is never copied once per query head on the decode path, where reading the cache is the whole
cost.

The sliding window (StarCoder2) is a mask over a full cache, not a ring buffer: the cache then
keeps one layout, slot = position in the padded batch, for every path (eager, fixed-shape,
left-padded), and the suites' sequences (≤ 2048 tokens) are shorter than the published
models' window (4096), where a ring buffer would save nothing. Past the window a ring buffer
would bound the cache's memory; the mask bounds only what each query sees.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_attention
from . import softmax as causal_softmax
from .comm import TPGroup
from .config import ModelConfig
from .decode_attention import DECODE_FORM
from .linear import Linear
from .rotary import rotate


def attention_mask(key_valid: torch.Tensor, query_slots: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[B, 1, T, S] bool, broadcast over the heads: query t (at cache slot query_slots[t]) sees
    the valid slots up to its own (with a `window`, only the last `window` of them, itself
    included, as transformers' sliding window: slot > query - window), and always itself, so
    that a row of left padding is never fully masked (SDPA would give NaN). key_valid: [B, S],
    False on padding and on the slots not written yet; query_slots: [T] long (a tensor, so that
    a fixed-shape step can move it). Padding is on the left only, so a slot distance between
    two valid tokens is their position distance."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)  # [S]
    query = query_slots.unsqueeze(-1)  # [T, 1]
    seen = slots <= query  # [T, S]
    if window is not None:
        seen = seen & (slots > query - window)
    mask = (key_valid[:, None, :] & seen) | (slots == query)  # [B, T, S]
    return mask.unsqueeze(1)


class PrefillForm:
    """How a plain causal prefill of K/V heads shared by several query heads (`kv_heads` of them a
    rank, the count calibrated) runs on a CPU in the model's dtype (`dtype`, the one calibrated):
    SDPA's flash kernel, or `causal_blocks` for prompts nearest (in ratio) to the lengths in
    `blocks_at`, where calibrate_attention measured them faster on the machine at hand, with the
    query tokens per block (`rows`) and the blocks' `softmax` (softmax.c's, "ours", or torch's)
    it swept for one sequence; a batch takes the block size that was fastest over
    CALIBRATION_BATCHES (`batched_rows`): its sequences share each call, and a call's cost weighs
    less than for one sequence. Lengths, not a threshold: on two threads of the AVX-512 Xeon the
    fp32 blocks won at 512 tokens and lost at 256 and at 1024."""

    def __init__(self) -> None:
        self.blocks_at: frozenset[int] = frozenset()  # the prompt lengths of CALIBRATION_TOKENS that take the blocks
        self.rows = BLOCK_ROWS  # query tokens per block for one sequence
        self.batched_rows = BLOCK_ROWS  # and for a batch of several
        self.dtype = torch.float32
        self.kv_heads = 1
        self.calibrated = ""
        self.softmax = "torch"  # causal_blocks' softmax: "ours" (softmax.c) where it measured faster

    def state(self) -> dict:
        """What calibrate_attention measured, as kernels.py caches it."""
        return {"blocks_at": sorted(self.blocks_at), "rows": self.rows, "batched_rows": self.batched_rows,
                "softmax": self.softmax}

    @staticmethod
    def parse(state: dict) -> tuple[frozenset[int], int, int, str]:
        """A cached `state`'s (blocks_at, rows, batched_rows, softmax); ValueError (or KeyError,
        TypeError) where it is not one that `state` writes."""
        lengths, rows, batched, softmax = state["blocks_at"], state["rows"], state["batched_rows"], state["softmax"]
        if not (isinstance(lengths, list) and all(type(t) is int and t in CALIBRATION_TOKENS for t in lengths)
                and len(set(lengths)) == len(lengths) and softmax in ("ours", "torch")
                and all(type(r) is int and r in BLOCK_CHOICES for r in (rows, batched))):
            raise ValueError(f"prefill form: blocks at {lengths!r}, rows {rows!r}, batched {batched!r}, "
                             f"softmax {softmax!r}")
        return frozenset(lengths), rows, batched, softmax

    def restore(self, parsed: tuple[frozenset[int], int, int, str], dtype: torch.dtype, calibrated: str,
                kv_heads: int = 1) -> None:
        """`parse`'s result taken as this process's form (forms.calibrate_forms)."""
        (self.blocks_at, self.rows, self.batched_rows, self.softmax), self.dtype = parsed, dtype
        self.calibrated, self.kv_heads = calibrated, kv_heads

    def describe(self) -> str:
        if not self.blocks_at:
            return "sdpa"
        return (f"blocks@{_lengths(self.blocks_at)} rows:{self.rows} batch:{self.batched_rows}"
                + (" softmax:ours" if self.softmax == "ours" else ""))

    def block_rows(self, tokens: int, batch: int = 1) -> int:
        """The query tokens per block of `batch` prompts of `tokens` tokens; 0: SDPA."""
        if not self.blocks_at:
            return 0
        nearest = min(CALIBRATION_TOKENS, key=lambda length: (abs(math.log2(tokens / length)), length))
        if nearest not in self.blocks_at:
            return 0
        return self.batched_rows if batch > 1 else self.rows


# The prompt lengths calibrate_attention times both forms at.
CALIBRATION_TOKENS = (64, 128, 256, 512, 1024)
BLOCK_ROWS = 32  # where none is given or measured: the one size before they were timed (8d63f9a)
PREFILL_FORM = PrefillForm()
# The block sizes calibrate_attention times. Which is fastest depends on the dtype, the query
# heads per K/V head and the batch (on the EPYC Zen 4, one sequence at 512 tokens: bf16 128 a block
# with 4 query heads a K/V head, 32 in fp32 with 16; RESULTS.md, "Block sizes of the prefill's
# attention"). BLOCK_ROWS is one of them, so that a cached form without blocks reads back.
BLOCK_CHOICES = (32, 64, 128)
assert BLOCK_ROWS in BLOCK_CHOICES
# (sequences, tokens) the block size for batches is timed at: the sizes ranked differently at
# 16 x 128 (32 and 64 within 1%) and at 4 x 512 (128 and 64 within 1%, 32 17% slower) in bf16;
# 4 x 256 ranked them as 4 x 512 did, in a third of the time.
CALIBRATION_BATCHES = ((16, 128), (4, 256))
# The lengths the block sizes and softmaxes are timed at: one size was fastest at 128-1024 tokens,
# or within a few percent of the fastest, and a sweep at two lengths keeps the calibration short
# (every size at every length took the bench model's fp32 heads 3.9 s, against 1.1 s with one
# size; RESULTS.md, "Block sizes of the prefill's attention").
SWEEP_TOKENS = (128, 512)
SCORES_BYTES = 2 << 20  # causal_blocks' scores per call: of 1-16 MiB and all, 1-4 MiB ran alike on the EPYC Zen 4


def causal_blocks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                  block: int = BLOCK_ROWS, softmax: str | None = None) -> torch.Tensor:
    """Plain causal attention (T == S) whose K/V heads each serve G query heads (multi-query: one K/V
    head for all; grouped), as two batched GEMMs per block of query tokens and K/V head: each
    sequence's block of queries of the head's G query heads, [n * G, D], against its keys up to the
    block's last token, the causal mask on the block's own keys only, so the keys after the block cost
    nothing. SDPA's flash kernel runs per query head, the K/V head broadcast to its G query heads; one
    GEMM over the G reuses each key G times from the cache (RESULTS.md, "The grouped prefill's
    attention in blocks"). The sequences go in groups whose scores fit SCORES_BYTES (a loop over them
    took 1.16-1.56x as long in bf16 at batch 16; all in one call, 1.15-1.8x as long in fp32 at 16 x
    1024 and 16 x 128: RESULTS.md, "... the prefill's attention batched"). `softmax`: "ours"
    (softmax.c: scale, mask and softmax in one call) or "torch"; None: PREFILL_FORM's.
    q: [B, T, H, D]; keys, values: [B, KV, S, D]. Returns [B, T, H * D]."""
    b, t, h, d = q.shape
    kv = keys.shape[1]
    g = h // kv
    if softmax not in (None, "ours", "torch"):
        raise ValueError(f"causal_blocks: softmax {softmax!r}: expected 'ours', 'torch' or None")
    ours = (softmax or PREFILL_FORM.softmax) == "ours"
    out = q.new_empty(kv, b, t, g, d)  # (one K/V head: the [B, T, H, D] result itself)
    after = None if ours else torch.full((block, block), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    for t0 in range(0, t, block):
        t1 = min(t, t0 + block)
        n = t1 - t0
        group = max(1, SCORES_BYTES // (n * g * t1 * q.element_size()))
        for i in range(0, b, group):
            j = min(b, i + group)
            for head in range(kv):
                queries = q[i:j, t0:t1, head * g:(head + 1) * g].reshape(j - i, n * g, d)
                scores = torch.matmul(queries, keys[i:j, head, :t1].transpose(1, 2))  # [j - i, n * G, t1]
                if ours:
                    probabilities = causal_softmax.causal_(scores, n, g, t0, scale)
                else:
                    scores.mul_(scale).view(j - i, n, g, t1)[..., t0:].add_(after[:n, :n].unsqueeze(1))
                    probabilities = torch.softmax(scores, dim=-1)
                torch.bmm(probabilities, values[i:j, head, :t1], out=out[head, i:j, t0:t1].view(j - i, n * g, d))
    return out.permute(1, 2, 0, 3, 4).reshape(b, t, h * d)


def _block_rows(q: torch.Tensor, kv: int, mask: torch.Tensor | None) -> int:
    """causal_blocks' query tokens per block for this prefill; 0: SDPA."""
    # (the K/V head count calibrated; several query heads to a K/V head, or nothing to gain)
    if (mask is None and kv == PREFILL_FORM.kv_heads and q.shape[2] > kv and q.dtype == PREFILL_FORM.dtype
            and q.device.type == "cpu" and not torch.compiler.is_compiling()):
        return PREFILL_FORM.block_rows(q.shape[1], q.shape[0])
    return 0


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """q: [B, T, H, D]; keys, values: [B, KV, S, D]; mask: [B, 1, T, S] bool, or None for plain
    causal attention (then T == S: a prefill from slot 0, or T == 1: a decode step that sees
    every slot). Returns [B, T, H * D]."""
    b, t, h, d = q.shape
    kv = keys.shape[1]
    if t == 1:
        if DECODE_FORM.ours and not torch.compiler.is_compiling() and decode_attention.supports(q, keys, values, mask):
            return decode_attention.run(q, keys, values, mask, scale)  # attend.c, where it measured faster
        # One query per head: the G query heads of a K/V head stand in for its query length, so
        # one product per K/V head serves all of them, and the mask [B, 1, 1, S] broadcasts.
        out = F.scaled_dot_product_attention(q.reshape(b, kv, h // kv, d), keys, values, attn_mask=mask, scale=scale)
        return out.reshape(b, 1, h * d)  # [B, KV, G, D] -> [B, 1, H * D]
    rows = _block_rows(q, kv, mask)
    if rows:
        return causal_blocks(q, keys, values, scale, rows)
    grouped = {}
    if kv != h and q.device.type == "cpu":
        # SDPA maps the G query heads of each K/V head itself: no copy of the keys for GQA, and
        # in bf16 5-13% faster than expanded keys (fp32: within noise; RESULTS.md, "Grouped
        # attention"). CPU only: not every accelerator's SDPA (torch_npu's) takes enable_gqa.
        grouped = {"enable_gqa": True}
    elif kv == 1:
        # Multi-query: the one K/V head broadcast to the query heads by expand, a view.
        keys, values = keys.expand(b, h, -1, d), values.expand(b, h, -1, d)
    elif kv != h:
        # Grouped: a prefill step does T times the work per key that a copy of the keys costs.
        keys, values = keys.repeat_interleave(h // kv, dim=1), values.repeat_interleave(h // kv, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=mask is None,
                                         scale=scale, **grouped)  # [B, H, T, D]
    return out.transpose(1, 2).reshape(b, t, h * d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.head_dim = config.head_dim
        self.local_heads = config.n_head // tp.world_size
        self.local_kv_heads = config.kv_layout(tp.world_size)[0]
        # GPTBigCode's multi-head rows are interleaved per head; MQA's and StarCoder2's (fused at
        # load) are [q of all heads | k | v].
        self.interleaved = config.model_type == "gpt_bigcode" and not config.multi_query
        qkv_rows = (self.local_heads + 2 * self.local_kv_heads) * self.head_dim
        self.c_attn = Linear(config.n_embd, qkv_rows, bias=config.use_bias)
        self.c_proj = Linear(self.local_heads * self.head_dim, config.n_embd, bias=config.use_bias)
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.k_cache: torch.Tensor | None = None  # [B, KV, S_max, D]
        self.v_cache: torch.Tensor | None = None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [B, T, E] -> q [B, T, H, D], k and v [B, T, KV, D]
        b, t, _ = x.shape
        h, kv, d = self.local_heads, self.local_kv_heads, self.head_dim
        qkv = self.c_attn(x)
        if not self.interleaved:
            q = qkv[..., : h * d].view(b, t, h, d)
            k = qkv[..., h * d : (h + kv) * d].view(b, t, kv, d)
            v = qkv[..., (h + kv) * d :].view(b, t, kv, d)
            return q, k, v
        per_head = qkv.view(b, t, h, 3 * d)  # HF's per-head interleaved [q_h | k_h | v_h]
        return per_head[..., :d], per_head[..., d : 2 * d], per_head[..., 2 * d :]

    def forward(self, x: torch.Tensor, start: int | torch.Tensor, mask: torch.Tensor | None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [B, T, E], written to cache slots start .. start + T - 1. `start` an int: attention
        over the slots up to the last one written. `start` a [1] long tensor: the fixed-shape
        step, attention over the whole cache, `mask` hiding what is not written yet. `rotary`:
        (cos, sin) [B, T, 1, D] of the new tokens' positions, for models with RoPE."""
        q, k, v = self._qkv(x)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)  # (in place where rotary.c runs)
        t = x.shape[1]
        if isinstance(start, int):
            end = start + t
            self.k_cache[:, :, start:end] = k.transpose(1, 2)
            self.v_cache[:, :, start:end] = v.transpose(1, 2)
            keys, values = self.k_cache[:, :, :end], self.v_cache[:, :, :end]  # [B, KV, S, D]
        else:
            slots = start + torch.arange(t, device=start.device)
            self.k_cache.index_copy_(2, slots, k.transpose(1, 2))
            self.v_cache.index_copy_(2, slots, v.transpose(1, 2))
            keys, values = self.k_cache, self.v_cache
        return self.c_proj.row_parallel(attend(q, keys, values, mask, self.scale), self.tp)


def blocks_at(sdpa_ms: list[float], blocks_ms: list[float], tokens: tuple[int, ...] = CALIBRATION_TOKENS
              ) -> frozenset[int]:
    """The lengths of `tokens` at which causal_blocks was faster than SDPA, from each form's ms per call."""
    if not len(sdpa_ms) == len(blocks_ms) == len(tokens):
        raise ValueError(f"calibration: {len(sdpa_ms)} and {len(blocks_ms)} timings at tokens {tokens}")
    return frozenset(t for t, sdpa, blocks in zip(tokens, sdpa_ms, blocks_ms) if blocks < sdpa)


def fastest(per_shape: list[dict[str, float]]) -> str:
    """The name with the least time relative to each shape's fastest, summed over the shapes (of
    equal sums, the first): one shape's long calls do not outweigh another's short ones."""
    names = list(per_shape[0])
    relative = {name: sum(ms[name] / (min(ms.values()) or 1.0) for ms in per_shape) for name in names}
    return min(names, key=lambda name: (relative[name], names.index(name)))


def _lengths(lengths: frozenset[int]) -> str:
    return ",".join(str(t) for t in sorted(lengths))


def _inputs(batch: int, tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple:
    return (torch.randn(batch, tokens, heads + 2 * kv_heads, head_dim, dtype=dtype)[:, :, :heads],  # a view, as q is
            torch.randn(batch, kv_heads, tokens, head_dim, dtype=dtype),
            torch.randn(batch, kv_heads, tokens, head_dim, dtype=dtype))


def calibrate_attention(heads: int, head_dim: int, slowest, dtype: torch.dtype = torch.float32,
                        on_progress=lambda: None, *, kv_heads: int) -> str:
    """Set PREFILL_FORM for this rank's `heads` query heads over `kv_heads` K/V heads in `dtype`
    (once per process), in three timings: causal_blocks at each of BLOCK_CHOICES with torch's
    softmax and, where softmax.c runs, with ours, at SWEEP_TOKENS (the pair with the least time
    relative to each length's fastest: `softmax` and the block size); SDPA against those blocks at
    each of CALIBRATION_TOKENS (`blocks_at`); where blocks are taken, the block sizes at
    CALIBRATION_BATCHES (`batched_rows`). `slowest` reduces a float64 tensor to its maximum over
    the ranks, so that every rank takes the same form. Every rank must call it in step. Returns
    what it set."""
    if PREFILL_FORM.calibrated:
        return PREFILL_FORM.calibrated
    from .kernel_timing import time_across_ranks  # (kernel_timing reads linear.py, which this module uses)

    scale = 1 / math.sqrt(head_dim)
    # Ours is timed only where every rank runs it: the ranks reduce timings of one length.
    lacking = slowest(torch.tensor([0.0 if causal_softmax.available(dtype) else 1.0], dtype=torch.float64)).item()
    softmaxes = ("torch",) if lacking else ("torch", "ours")
    PREFILL_FORM.dtype, PREFILL_FORM.kv_heads = dtype, kv_heads

    def blocks(i: tuple, name: str, rows: int):
        return lambda: causal_blocks(*i, scale, rows, softmax=name)

    sweep = time_across_ranks([{f"{name} {rows}": blocks(i, name, rows) for name in softmaxes for rows in BLOCK_CHOICES}
                               for i in (_inputs(1, t, heads, kv_heads, head_dim, dtype) for t in SWEEP_TOKENS)],
                              slowest, on_progress)
    name, size = fastest(sweep).split()
    rows = int(size)
    saved, PREFILL_FORM.blocks_at = PREFILL_FORM.blocks_at, frozenset()  # attend: SDPA while timed
    try:
        inputs = [_inputs(1, t, heads, kv_heads, head_dim, dtype) for t in CALIBRATION_TOKENS]
        timings = time_across_ranks([{"sdpa": lambda i=i: attend(*i, None, scale), "blocks": blocks(i, name, rows)}
                                     for i in inputs], slowest, on_progress)
    finally:
        PREFILL_FORM.blocks_at = saved
    sdpa, chosen = [ms["sdpa"] for ms in timings], [ms["blocks"] for ms in timings]
    PREFILL_FORM.blocks_at, PREFILL_FORM.softmax = blocks_at(sdpa, chosen), name
    PREFILL_FORM.rows = rows if PREFILL_FORM.blocks_at else BLOCK_ROWS  # (SDPA's form caches one state)
    PREFILL_FORM.batched_rows, batched = BLOCK_ROWS, []
    if PREFILL_FORM.blocks_at:  # the block size for batches, with that softmax
        batched = time_across_ranks([{f"{size}": blocks(i, name, size) for size in BLOCK_CHOICES}
                                     for i in (_inputs(b, t, heads, kv_heads, head_dim, dtype)
                                               for b, t in CALIBRATION_BATCHES)], slowest, on_progress)
        PREFILL_FORM.batched_rows = int(fastest(batched))
    named = {"ours": "softmax.c's softmax", "torch": "torch's softmax"}
    shown = "; ".join([f"{t} tokens: " + ", ".join(f"{key} a block {v:.2f}" for key, v in ms.items())
                       for t, ms in zip(SWEEP_TOKENS, sweep)]
                      + [f"blocks of {rows} vs sdpa: " + ", ".join(f"{t}: {b:.2f} vs {s:.2f}" for t, s, b in
                                                                  zip(CALIBRATION_TOKENS, sdpa, chosen))]
                      + [f"{b} x {t} tokens: " + ", ".join(f"{key} a block {v:.2f}" for key, v in ms.items())
                         for (b, t), ms in zip(CALIBRATION_BATCHES, batched)])
    PREFILL_FORM.calibrated = (f"causal blocks at {_lengths(PREFILL_FORM.blocks_at)} tokens, {rows} a block, "
                               f"batches {PREFILL_FORM.batched_rows} a block, {named[name]}"
                               if PREFILL_FORM.blocks_at else "sdpa") + f" (ms: {shown})"
    return PREFILL_FORM.calibrated
