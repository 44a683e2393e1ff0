"""The causal softmax of the prefill's blocks (attention.causal_blocks: a K/V head's query heads) by a
kernel of our own, softmax.c, in fp32 and bf16.

causal_blocks scores a block of query tokens against the keys up to its last token, then scales
the scores, masks the block's own later keys and takes the softmax: three torch operations and,
in bf16, a widening and a rounding in each. softmax.c does the three in one call, two reads and a
write of each row (its header says how). Whether it runs is measured with the prefill's form
(attention.calibrate_attention); where the library is not built or the CPU lacks AVX-512, torch's
runs. It is built with rowdot.c into one library (rowdot.py).
"""
from __future__ import annotations

import math

import torch

from . import rowdot

DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype) -> bool:
    """Whether softmax.c is built and runs on this CPU in `dtype`."""
    lib, _ = rowdot.library()
    return (dtype in DTYPES and lib is not None and bool(lib.causal_softmax_supported())
            and rowdot.runs_at_least("avx512"))


def causal_(scores: torch.Tensor, tokens: int, heads: int, first: int, scale: float) -> torch.Tensor:
    """`scores` [G, tokens * heads, S] (contiguous; row i * heads + h: token first + i, head h)
    replaced by softmax(scale * scores) over the keys 0..first + i each row sees, 0 past them.
    Returns `scores`. Only where `available`."""
    g, rows, s = scores.shape
    if not (scale > 0 and math.isfinite(scale)):  # (softmax.c subtracts the scaled row's maximum)
        raise ValueError(f"softmax.causal_: scale {scale!r}: expected a finite positive scale")
    if not (scores.is_contiguous() and scores.device.type == "cpu" and rows == tokens * heads and first >= 0
            and first + tokens <= s and available(scores.dtype)):
        raise ValueError(f"softmax.causal_: scores {list(scores.shape)} {scores.dtype} on {scores.device} "
                         f"(contiguous: {scores.is_contiguous()}) for {tokens} tokens of {heads} heads from "
                         f"token {first}: not what softmax.c takes here")
    lib, _ = rowdot.library()
    kernel = lib.causal_softmax_f32 if scores.dtype == torch.float32 else lib.causal_softmax_bf16
    if kernel(scores.data_ptr(), g, tokens, heads, s, first, scale) != 0:
        raise MemoryError(f"softmax.causal_: no memory for a scratch row of {s} floats")
    return scores
