"""One-row linear products (decode at batch 1) as a multiply-sum that torch's inductor compiles.

At one row a linear reads each weight element once for one multiply-add, so it runs at the speed
the weight streams from memory. The libraries' one-row GEMMs do not reach it: on one thread of
the EPYC Zen 5, MKL's F.linear, its packed sgemm and oneDNN's packed layout read fp32 weights at
19-29 GB/s where a plain sum reads 38-40, and inductor's loop over `(W * x).sum(-1)` read them at
31-37 (benchmarks/RESULTS.md, "One-row products compiled by inductor"). Whether it pays is
measured per weight shape on the machine at hand, like every other kernel (kernels.py).

Products are exact in fp32 and summed in fp32 (bf16 inputs too, as the libraries' bf16 GEMMs),
then rounded to the input's dtype once. Inductor needs a C++ compiler at run time: where it has
none, or its compile fails, the kernel is not a candidate (`available`).
"""
from __future__ import annotations

import functools
import sys
import types
from typing import Callable

import torch
import torch.nn.functional as F


def _mul_sum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # x: [K], weight: [N, K] -> [N]; inductor fuses the casts into its loop (no fp32 copy is made)
    return (weight.float() * x.float()).sum(-1).to(x.dtype)


@functools.cache
def _compiled(n: int, k: int, dtype: torch.dtype) -> Callable:
    # One code object per shape: dynamo keeps its compiled variants per code object, up to a small
    # limit (8), and checks each call against them in turn. Static shapes let inductor unroll the
    # K loop; with N and K symbolic (dynamic=True) the same loop read 20-30% slower.
    name = f"gemv_{n}x{k}_{str(dtype).removeprefix('torch.')}"
    fn = types.FunctionType(_mul_sum.__code__.replace(co_name=name, co_qualname=name), _mul_sum.__globals__, name)
    # compile_threads 1: one small kernel gains nothing from inductor's pool of compile workers,
    # which a rank of many threads would otherwise fork (one per thread) and keep
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"compile_threads": 1})


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): by the compiled multiply-sum when x holds one row (the first
    call of a shape compiles it: `prepare` does that outside timed regions), else F.linear. The
    bias goes in after it: one kernel per shape and grad mode, with or without a bias."""
    if x.numel() != x.shape[-1]:
        return F.linear(x, weight, bias)
    n, k = weight.shape
    # detached: dynamo guards on the type, and a model's nn.Parameter and a plain tensor (a timed
    # copy) would each get their own compile, the second one in a timed call
    out = _compiled(n, k, weight.dtype)(x.reshape(k), weight.detach()).view(*x.shape[:-1], n)
    return out if bias is None else out + bias


def prepare(weight: torch.Tensor) -> None:
    """Compile the one-row product of this weight's shape now, as generation runs it (inference
    mode: the compiled code is specialised on the grad mode): seconds for the first shape in a
    process, a tenth of that for the next ones and from inductor's cache on disk."""
    with torch.inference_mode():
        linear(torch.zeros(1, weight.shape[1], dtype=weight.dtype), weight)


@functools.cache
def available() -> bool:
    """Whether inductor compiles and runs the kernel here (a C++ compiler, a supported CPU); checked
    once per process, on a small weight, against F.linear."""
    try:
        weight, x = torch.randn(8, 64), torch.randn(1, 64)
        with torch.no_grad():
            ok = torch.allclose(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    except Exception as err:  # inductor's errors have no common base: a missing compiler, a failed build...
        print(f"[kernels] the compiled one-row product is not a candidate: {type(err).__name__}: "
              f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}", file=sys.stderr)
        return False
    return ok
