"""Decode attention (one new token per sequence) by a kernel of our own, attend.c, in fp32 and bf16.

A decode step's attention is small: for each sequence, the G query heads of a K/V head against
its S cached keys. SDPA's flash kernel runs it per sequence with per-block overheads that dwarf
the arithmetic: in the bench-size model's bf16 batch-16 decode step on one thread of the EPYC
Zen 5 (16 multi-query heads of 64, ~150 keys) it took 211 µs a layer, 13% of the step. attend.c
puts the query heads in the lanes of a vector and runs the whole of it vertically (its header
says how): 92 µs a layer there (RESULTS.md, "Decode attention of our own" and "Decode attention:
the next sequence asked for"). With 8 query heads a K/V head or fewer (StarCoder2's bench model: 4)
that fills half the lanes or less, so attend_few.c runs those with the lanes along the head's elements
(few_heads; RESULTS.md, "Decode attention for few query heads").
Whether it is used is measured on the machine at hand, like the prefill's form (attention.py:
DECODE_FORM, calibrate_decode); where the library is not built or the CPU lacks AVX-512, SDPA
runs. It is built with rowdot.c into one library (rowdot.py).
"""
from __future__ import annotations

import functools
import math
import statistics

import torch

from . import rowdot

FEW_HEADS = 8  # attend_few.h's ATTEND_FEW_MAX: the most query heads per K/V head attend_few.c takes


def available() -> bool:
    """Whether attend.c is built and runs on this CPU."""
    lib, _ = rowdot.library()
    return lib is not None and bool(lib.attend_supported()) and rowdot.runs_at_least("avx512")


def supports(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attend` takes these: CPU, fp32 or bf16, head_dim a multiple of 16, each query head
    and each key and value row contiguous, keys and values laid out alike, a [B or 1, 1, 1, S]
    bool mask or none."""
    b, t, h, d = q.shape
    return (q.device.type == "cpu" and t == 1 and q.dtype in (torch.float32, torch.bfloat16) and d % 16 == 0
            and keys.dtype == values.dtype == q.dtype and keys.shape == values.shape
            and keys.stride() == values.stride() and keys.stride(-1) == 1 and keys.stride(-2) == d
            and q.stride(-1) == 1 and q.stride(-2) == d and h % keys.shape[1] == 0
            and (mask is None or (mask.dtype == torch.bool and mask.shape[1:3] == (1, 1)
                                  and mask.shape[0] in (1, b) and mask.shape[-1] == keys.shape[2]))
            and available())


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           scale: float, dot: bool | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for one query token per sequence: q [B, 1, H, D]; keys,
    values [B, KV, S, D] (a view of the cache: rows contiguous); mask [B or 1, 1, 1, S] bool (True:
    seen) or None; scale > 0. Returns [B, 1, H * D]. Only for what `supports` takes. `dot`: bf16 by
    AVX512_BF16's dot products (the probabilities rounded to bf16, attend.c's header) or widened to
    fp32; None: the dot products where the CPU has them (bf16_dot); fp32 ignores it."""
    if not supports(q, keys, values, mask):
        raise ValueError(f"decode_attention.attend: q {list(q.shape)} {q.dtype} (strides {q.stride()}), keys "
                         f"{list(keys.shape)} {keys.dtype} (strides {keys.stride()}), mask "
                         f"{None if mask is None else (list(mask.shape), mask.dtype)}: not what attend.c takes")
    if not (math.isfinite(scale) and scale > 0):  # (the dot path scales in the exponent: a max is a max)
        raise ValueError(f"decode_attention.attend: scale {scale!r}, expected a finite scale > 0")
    if dot and q.dtype == torch.bfloat16 and not bf16_dot():
        raise ValueError(f"decode_attention.attend: dot=True, but this CPU (or {rowdot.ENV}) runs no AVX512_BF16")
    return run(q, keys, values, mask, scale, dot)


def few_heads(most: int) -> int:
    """Set the most query heads per K/V head that attend_few.c runs, its lanes along the head's
    elements (0: none, attend.c's vertical form for every head count; at most FEW_HEADS, the default);
    returns the previous setting. For A/B timing and the tests of both forms."""
    if not isinstance(most, int) or isinstance(most, bool) or not 0 <= most <= FEW_HEADS:
        raise ValueError(f"decode_attention.few_heads: most={most!r}, expected an int from 0 to {FEW_HEADS}")
    lib, why = rowdot.library()
    if lib is None:
        raise RuntimeError(f"decode_attention.few_heads: attend.c is not built here ({why})")
    return lib.attend_few_heads(most)


def few_runs() -> int:
    """How many (sequence, K/V head) pairs attend_few.c has run in this process (0 where not built)."""
    lib, _ = rowdot.library()
    return 0 if lib is None else lib.attend_few_runs()


@functools.cache  # (per layer of every bf16 decode step; the library's path is fixed at its load)
def bf16_dot() -> bool:
    """Whether bf16 runs attend.c's dot path here: the library's path is avx512bf16 (rowdot.ENV set
    narrower stands in for a CPU without it)."""
    return rowdot.runs_at_least("avx512bf16")


def run(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
        scale: float, dot: bool | None = None) -> torch.Tensor:
    """`attend` for a caller that has checked `supports` already (attention.attend, at every layer
    of every decode step: the check is ~2 µs)."""
    b, _, h, d = q.shape
    kv, s = keys.shape[1], keys.shape[2]
    valid = None if mask is None else mask.reshape(mask.shape[0], s).contiguous()
    out = torch.empty(b, 1, h * d, dtype=q.dtype)
    lib, _ = rowdot.library()
    args = (q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1),
            None if valid is None else valid.data_ptr(), 0 if valid is None or valid.shape[0] == 1 else s,
            out.data_ptr(), b, kv, h // kv, s, d, scale)
    if q.dtype == torch.float32:
        failed = lib.attend_f32(*args)
    else:
        failed = lib.attend_bf16(*args, int(bf16_dot() if dot is None else dot))
    if failed:
        raise MemoryError(f"decode_attention.attend: attend.c could not allocate its scratch for {s} keys of {d}")
    return out


class DecodeForm:
    """Whether the decode step's attention runs attend.c (`ours`) or SDPA: measured once per
    machine (calibrate_decode, cached with the other forms by forms.calibrate_forms)."""

    def __init__(self) -> None:
        self.ours = False
        self.calibrated = ""


DECODE_FORM = DecodeForm()
# (sequences, cached keys) at which calibrate_decode times both: a short and a long context.
CALIBRATION_SHAPES = ((1, 128), (16, 1024))
# The comparison is made this many times, and each shape's verdict is its median ratio. Once, at two ranks
# timing at once, a few microseconds' short shape came out at a tie (0.011 ms each) where ours runs ~4.5%
# faster alone, and the step ran SDPA: its attention between two calls of fused_step.c, the step 2-3%
# slower (RESULTS.md, "The decode attention's form, compared five times").
REPEATS = 5


def calibrate_decode(heads: int, kv_heads: int, head_dim: int, slowest, dtype: torch.dtype = torch.float32,
                     on_progress=lambda: None) -> str:
    """Time SDPA and attend.c on this rank's heads in `dtype` at CALIBRATION_SHAPES, REPEATS times (once per
    process), and set DECODE_FORM.ours where ours was faster at every one of them (its median ratio); `slowest`
    reduces a float64 tensor to its maximum over the ranks, so that every rank takes the same
    form. Every rank must call it in step (each times both, whatever it runs). Returns what it set."""
    if DECODE_FORM.calibrated:
        return DECODE_FORM.calibrated
    from .attention import attend as sdpa_attend  # (attention.py runs this module's kernel)
    from .kernel_timing import time_across_ranks

    scale, calls, usable = head_dim ** -0.5, [], True
    for b, s in CALIBRATION_SHAPES:
        fused = torch.randn(b, 1, (heads + 2 * kv_heads) * head_dim).to(dtype)  # q: a view of the fused q/k/v
        q = fused[..., :heads * head_dim].view(b, 1, heads, head_dim)
        cache = torch.randn(2, b, kv_heads, s + 64, head_dim).to(dtype)  # keys: a slice of a longer cache
        keys, values = cache[0, :, :, :s], cache[1, :, :, :s]
        usable = usable and supports(q, keys, values, None)
        calls.append({"sdpa": lambda a=(q, keys, values): sdpa_attend(*a, None, scale),
                      "ours": lambda a=(q, keys, values): attend(*a, None, scale)})
    # A rank without it (not built, no AVX-512, shapes it does not take) makes every rank run SDPA.
    if slowest(torch.tensor([0.0 if usable else 1.0], dtype=torch.float64)).item():
        DECODE_FORM.ours, DECODE_FORM.calibrated = False, "sdpa (attend.c does not run on every rank here)"
        return DECODE_FORM.calibrated
    DECODE_FORM.ours = False  # attention.attend: SDPA while timed
    repeats = [time_across_ranks(calls, slowest, on_progress) for _ in range(REPEATS)]
    # each shape's [ours / sdpa, ours ms, sdpa ms], the median over the repeats of each
    medians = [[statistics.median(f(timings[i]) for timings in repeats)
                for f in (lambda ms: ms["ours"] / ms["sdpa"], lambda ms: ms["ours"], lambda ms: ms["sdpa"])]
               for i in range(len(CALIBRATION_SHAPES))]
    DECODE_FORM.ours = all(ratio < 1 for ratio, _, _ in medians)
    shown = ", ".join(f"{b}x{s}: {ours:.3f} vs {sdpa:.3f} ms, ours/sdpa {ratio:.2f}"
                      for (b, s), (ratio, ours, sdpa) in zip(CALIBRATION_SHAPES, medians))
    DECODE_FORM.calibrated = f"{'ours' if DECODE_FORM.ours else 'sdpa'} (attend.c vs sdpa: {shown})"
    return DECODE_FORM.calibrated
