"""The model's linear layers: nn.Linear that can leave out its bias (row-parallel layers add it
once, after the all-reduce) and can pre-pack its weight once into oneDNN's blocked layout.

Why pre-pack, and which weights: `F.linear` hands a plain [N, K] weight to the BLAS on every
call. For tall weights (N >= 2K: the MLP's c_fc, the lm_head) at decode shapes (M = batch rows)
oneDNN's layout pays; elsewhere its ~25 us more per call loses. Measured on one thread of an AVX2
EPYC, fp32, interleaved, median us per call, F.linear -> packed:
  [4096 x 1024]  M=1 1497 -> 1575   M=16 7374 -> 5432
  [49152 x 1024] M=1 15891 -> 14437 M=16 82457 -> 51050 (the lm_head)
  [24576 x 1024] M=1 9327 -> 8886   M=16 45419 -> 27046
  [1024 x 4096]  M=1 1185 -> 1322   M=16 4661 -> 4641
  [1024 x 1024]  M=1 169 -> 208     M=16 1031 -> 1060
  [6144 x 256]   M=1 260 -> 246     M=16 1607 -> 2159 (small K: the fixed cost dominates)
while at prefill shapes the packed weight loses ([4096 x 1024] M=512 53.8 -> 63.5 ms, M=2048
237 -> 268): from PREFILL_ROWS rows on, the packed weight is unpacked for the call (`to_dense`,
4-11 ms, exact; 57.4 and 244 ms). Only weights with N >= 2K and K >= 1024 are packed
(`worth_packing`). They are packed for M=1: packed for M=16 they lost
40-60% at M=1, packed for M=1 they lost nothing at M=16. oneDNN packs bf16 only on CPUs with
AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere, and on GPUs/NPUs, layers stay on F.linear.

bf16 on a CPU without bf16 arithmetic (no AVX-512 BF16, no AMX): there the libraries' bf16 GEMM
costs M times a matrix-vector product (no reuse of a weight across rows), so from 4 rows on
`linear` computes in fp32 instead, converting 1024 weight rows at a time (a block stays in
cache; the weights stay bf16 in memory). A bf16 x bf16 product is exact in fp32 and the
libraries accumulate bf16 GEMMs in fp32 too, so this is the bf16 GEMM's arithmetic up to the
order of the sums, rounded to bf16 once. One thread of an AVX2 EPYC, ms per call, native -> fp32:
  [4096 x 1024]  M=4 3.49 -> 2.66  M=16 14.1 -> 4.5   M=128 105 -> 15.9  M=512 427 -> 63.4
  [49152 x 1024] M=4 39.3 -> 29.9  M=16 168 -> 51.6 (the lm_head)
  [1024 x 4096]  M=4 3.14 -> 3.69  M=16 12.2 -> 4.4   M=512 398 -> 63.4
and at M=1-2 native bf16 is faster (it reads half the bytes of fp32; [49152 x 1024] M=1 11.9 ms).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


PREFILL_ROWS = 512  # from this many rows (batch x tokens) on, F.linear beats the packed weight
UPCAST_MIN_ROWS = 4  # bf16 without bf16 arithmetic: from this many rows on, compute in fp32
UPCAST_BLOCK_ROWS = 1024  # weight rows converted to fp32 at a time


def native_bf16_matmul() -> bool:
    """Whether this CPU has bf16 arithmetic for GEMMs (AVX-512 BF16 or AMX tiles)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


# Probed once, at import: torch.compile cannot trace the probes (each call in a compiled decode
# step was a graph break, 46 per bf16 step of the bench-size model), but reads a global.
NATIVE_BF16_MATMUL = native_bf16_matmul()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for bf16 on a CPU without bf16 arithmetic from UPCAST_MIN_ROWS rows on,
    computed in fp32 a block of weight rows at a time (see above)."""
    if (weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or x.numel() < UPCAST_MIN_ROWS * x.shape[-1] or NATIVE_BF16_MATMUL
            or torch.compiler.is_compiling()):  # see model.compile_decode
        return F.linear(x, weight, bias)
    wide = x.float()
    blocks = [F.linear(wide, weight[start:start + UPCAST_BLOCK_ROWS].float(),
                       None if bias is None else bias[start:start + UPCAST_BLOCK_ROWS].float())
              for start in range(0, weight.shape[0], UPCAST_BLOCK_ROWS)]
    return (torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]).to(x.dtype)


def worth_packing(weight: torch.Tensor) -> bool:
    """Tall and large enough for oneDNN's layout to beat F.linear at decode shapes (see above)."""
    n, k = weight.shape
    return k >= 1024 and n >= 2 * k


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [N, K] in oneDNN's layout for M=1 rows, or None where oneDNN cannot take it."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw ..."
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear (same parameter names, so HF state dicts load) with `forward(x, add_bias)` and
    an optional pre-packed weight. Once packed, the plain weight is released (one copy in memory)."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        bias = self.bias if add_bias else None
        if self.packed is not None:
            if x.numel() >= PREFILL_ROWS * x.shape[-1]:
                return F.linear(x, self.packed.to_dense(), bias)
            return packed_linear(x, self.packed, bias)
        return linear(x, self.weight, bias)

    def prepack(self, force: bool = False) -> bool:
        """Pack the weight for oneDNN and drop the plain copy; False (nothing changed) where it
        does not pay (`worth_packing`, unless `force`) or oneDNN cannot take this dtype/device."""
        if not (force or worth_packing(self.weight)):
            return False
        packed = _pack(self.weight)
        if packed is None:
            return False
        self.packed = packed
        # The plain weight is no longer read; an empty tensor of the same dtype keeps the
        # parameter in place (names, dtype) without holding its memory.
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return True


def prepack_model(model: nn.Module, force: bool = False) -> int:
    """Pre-pack the Linears of `model` where it pays (all with `force`); returns how many."""
    return sum(m.prepack(force) for m in model.modules() if isinstance(m, Linear))


def pack_weight(weight: torch.Tensor, force: bool = False) -> torch.Tensor | None:
    """A packed copy of a weight that must also stay plain (the lm_head tied to the embedding),
    or None where it does not pay or oneDNN cannot take it."""
    return _pack(weight) if force or worth_packing(weight) else None
