"""One-row fp32 linear products (decode at batch 1) by BLAS's sgemv, through numpy.

At one row a linear reads each weight element once for one multiply-add: it is a stream through
the weight, at the speed of memory. torch's one-row GEMMs do not reach it: on one thread of the
EPYC Zen 5, MKL's F.linear, its packed sgemm and oneDNN's packed layout read fp32 weights at
19-29 GB/s where a plain sum reads 38-40, and the sgemv of numpy's BLAS (OpenBLAS in numpy's
wheels) read them at 31-36 (benchmarks/RESULTS.md, "One-row products"). Whether it pays is
measured per weight shape on the machine at hand, like every other kernel (kernels.py).

numpy shares the tensors' memory (no copy). The BLAS runs one thread (threadpoolctl), the
calling one: given torch's two threads, OpenBLAS's worker and torch's OpenMP worker, each spinning
after its own work, took the cores from each other, and a rank of two threads ran its decode steps
2.7-3x slower (RESULTS.md). With more threads than one, the libraries' threaded GEMMs compete
with the one-thread sgemv in the plan's timings.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

@functools.cache  # once per process
def _one_blas_thread() -> None:
    threadpool_limits(limits=1, user_api="blas")


def supports(weight: torch.Tensor) -> bool:
    """Whether this weight can run here: fp32 on the CPU."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): by sgemv when x holds one row of a weight `supports` takes, else
    F.linear itself."""
    if x.numel() != x.shape[-1] or not supports(weight) or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    _one_blas_thread()
    n, k = weight.shape
    out = torch.empty(n, dtype=torch.float32)  # (not the default dtype: a caller may have changed it)
    np.dot(weight.detach().numpy(), x.detach().reshape(k).numpy(), out=out.numpy())  # [N, K] @ [K] -> [N]
    out = out.view(*x.shape[:-1], n)
    return out if bias is None else out + bias
