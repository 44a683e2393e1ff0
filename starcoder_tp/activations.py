"""The MLP activations, and the form the tanh GELU takes on a CPU in fp32.

torch's `F.gelu(x, approximate="tanh")` evaluates its tanh with its own vectorised routine,
while `torch.tanh` on a CPU goes through MKL's vector library: on the AVX-512 Xeon, one thread
of the fused op ran 2M fp32 elements in 3.3 ms and `torch.tanh` alone in 0.6 (RESULTS.md,
"The tanh GELU"). The split form evaluates the same formula, 0.5 x (1 + tanh(b (x + k x^3))),
as eight elementwise passes over blocks of the output small enough to stay in the core's cache;
it differs from the fused op by the tanh's last bit. Its passes cost a fixed few microseconds a
call, so it pays only from some size on: `calibrate` times both forms on the machine at hand
(once per machine: forms.calibrate_forms caches the result), and sets the size from which the split form runs (`TANH_GELU.split_from`;
None: never). Only in fp32 and on a CPU: in bf16 every pass would round to bf16 (another result,
and slower, on that machine), and other devices have their own kernels.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

BETA = math.sqrt(2 / math.pi)
KAPPA = 0.044715
# Elements per block of the split form, per thread: 2^17 fp32 (512 KiB) was the fastest of
# 2^15..2^18 at 128-2048 rows x 4096 on one and on two threads of the AVX-512 Xeon (RESULTS.md).
BLOCK_PER_THREAD = 1 << 17
# The sizes calibrate times both forms at: near the crossover (16-30 thousand elements on one
# thread of the AVX-512 Xeon; a fit from 4096 elements, where the fixed cost is all, put it at
# 32768 or 65536 from one process to the next), and a 128-row prefill of a 4096-wide MLP.
CALIBRATION_NUMEL = (1 << 14, 1 << 19)


def tanh_gelu_split(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") of a contiguous fp32 tensor as elementwise passes over blocks
    of the output, in the fused op's order of operations (only the tanh's rounding differs)."""
    out = torch.empty_like(x)
    flat_in, flat_out = x.view(-1), out.view(-1)
    block = BLOCK_PER_THREAD * torch.get_num_threads()
    for start in range(0, flat_in.numel(), block):
        xs, ys = flat_in[start:start + block], flat_out[start:start + block]
        torch.mul(xs, xs, out=ys).mul_(xs)  # x^3
        torch.add(xs, ys, alpha=KAPPA, out=ys).mul_(BETA).tanh_().add_(1).mul_(xs).mul_(0.5)
    return out


class TanhGelu:
    """The tanh GELU: the split form from `split_from` elements on (contiguous fp32 CPU tensors,
    eager, without autograd: its passes write in place), else torch's fused op. `split_from` is
    None until `calibrate` measures that it pays."""

    def __init__(self) -> None:
        self.split_from: int | None = None
        self.calibrated = ""  # what calibrate measured, for the kernel plan's line

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (self.split_from is not None and x.numel() >= self.split_from and x.dtype == torch.float32
                and x.device.type == "cpu" and x.is_contiguous() and not x.requires_grad
                and not torch.compiler.is_compiling()):
            return tanh_gelu_split(x)
        return F.gelu(x, approximate="tanh")


TANH_GELU = TanhGelu()

# config.SUPPORTED_ACTIVATIONS: eager function, oneDNN post-op and its algorithm.
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str, str]] = {
    "gelu_pytorch_tanh": (TANH_GELU, "gelu", "tanh"),
    "gelu_new": (TANH_GELU, "gelu", "tanh"),
    "gelu_fast": (TANH_GELU, "gelu", "tanh"),
    "gelu": (F.gelu, "gelu", "none"),
    "relu": (F.relu, "relu", ""),
}


def split_from(small_ms: dict[str, float], large_ms: dict[str, float],
               sizes: tuple[int, int] = CALIBRATION_NUMEL) -> int | None:
    """The size from which the split form is faster, from each form's ms per call ("fused",
    "split") at the two `sizes`, each form's cost taken as fixed + per element; rounded up to a
    power of two (a plan keyed on it is not measured again for a few percent of drift), None
    where the split form is not faster at the large size."""
    small, large = sizes
    if not small < large:
        raise ValueError(f"calibration sizes {sizes}: the first must be the smaller")
    if large_ms["split"] >= large_ms["fused"]:
        return None
    slope = {form: (large_ms[form] - small_ms[form]) / (large - small) for form in ("fused", "split")}
    fixed = {form: small_ms[form] - slope[form] * small for form in ("fused", "split")}
    if slope["fused"] <= slope["split"]:  # faster at the large size only by a smaller fixed cost
        return 1
    crossover = max(1.0, (fixed["split"] - fixed["fused"]) / (slope["fused"] - slope["split"]))
    return 1 << math.ceil(math.log2(crossover))


def calibrate(slowest: Callable[[torch.Tensor], torch.Tensor], on_progress: Callable[[], None] = lambda: None) -> str:
    """Time both forms of the fp32 tanh GELU at CALIBRATION_NUMEL elements (once per process) and
    set TANH_GELU.split_from; `slowest` reduces a float64 tensor to its maximum over the ranks, so
    that every rank takes the same form. Every rank must call it in step. Returns what it set."""
    if TANH_GELU.calibrated:
        return TANH_GELU.calibrated
    from .kernel_timing import time_across_ranks  # (kernel_timing reads ACTIVATIONS)

    inputs = [torch.randn(numel) * 3 for numel in CALIBRATION_NUMEL]
    small, large = time_across_ranks([{"fused": lambda x=x: F.gelu(x, approximate="tanh"),
                                       "split": lambda x=x: tanh_gelu_split(x)} for x in inputs], slowest, on_progress)
    TANH_GELU.split_from = split_from(small, large)
    form = f"tanh gelu split from {TANH_GELU.split_from} elements" if TANH_GELU.split_from else "tanh gelu fused"
    TANH_GELU.calibrated = f"{form} ({CALIBRATION_NUMEL[1]}: {large['split']:.3f} vs {large['fused']:.3f} ms)"
    return TANH_GELU.calibrated
