"""RoPE's rotation of a StarCoder2 layer's queries and keys, in place, by rotary.c where it is built.

starcoder2.apply_rotary, as torch runs it, makes the rotation five passes over the heads and four
new tensors (the negated half, the concatenation, two products, then the sum). rotary.c rotates each
head in one pass, in place, rounding as torch does, so the values are torch's to the bit
(tests/test_rotary.py): a layer's q and k at 512 tokens in 0.11-0.22 ms against torch's 0.58-1.30 in
fp32 on the EPYC Zen 4, and the StarCoder2 bench-size model's fp32 first token at 512 tokens 0.990x
(RESULTS.md, "RoPE's rotation in one pass"). In bf16 only where the kernels' path is AVX2 or wider:
widened and narrowed in the baseline's 16-byte vectors, rotary.c's bf16 loop took 1.5x torch's time
there, in AVX2's 0.7x, in AVX-512's 0.56x. Where the library is not built, or the call is traced by
torch.compile, torch's form runs.
"""
from __future__ import annotations

import torch

from . import rowdot
from .starcoder2 import apply_rotary

DTYPES = (torch.float32, torch.bfloat16)


def takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether rotary.c rotates `x` [B, T, H, D] by `cos`, `sin` [B, T, 1, D] here."""
    if torch.compiler.is_compiling():  # (first: what follows reaches the library, which a trace must not)
        return False
    b, t, _, d = x.shape
    return (x.device.type == "cpu" and x.dtype in DTYPES and _apart(x) and d % 2 == 0 and not x.requires_grad
            and all(table.dtype == x.dtype and table.device.type == "cpu" and table.is_contiguous()
                    and tuple(table.shape) == (b, t, 1, d) for table in (cos, sin))
            and rowdot.library()[0] is not None and (x.dtype == torch.float32 or rowdot.runs_at_least("avx2")))


def _apart(x: torch.Tensor) -> bool:
    """Whether x [B, T, H, D]'s values each have a place of their own, in rows of D (the q and k views
    of a projection): rotated in place, a value shared by two places would be turned twice."""
    span = 1  # (the elements an index of the next dimension out must step past)
    for size, stride in zip(reversed(x.shape), reversed(x.stride())):
        if size > 1:
            if stride < span or (span == 1 and stride != 1):
                return False
            span = stride * (size - 1) + span
    return True


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary(x, cos, sin): written into `x` itself and returned where rotary.c takes it (its
    values are then rotated: the caller's q and k views of the projection, read by nothing else),
    else torch's new tensor."""
    if not takes(x, cos, sin):
        return apply_rotary(x, cos, sin)
    lib, _ = rowdot.library()
    args = (x.data_ptr(), *x.shape, *x.stride()[:3], cos.data_ptr(), sin.data_ptr())
    if x.dtype == torch.float32:
        lib.rotary_f32(*args)
    else:  # (the widest form the kernels' path allows: a narrower path stands in for a narrower CPU)
        lib.rotary_bf16(*args, 2 if rowdot.runs_at_least("avx512") else 1)
    return x
