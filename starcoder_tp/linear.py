"""The model's linear layers: nn.Linear that can leave out its bias (row-parallel layers add it
once, after the all-reduce) and can pre-pack its weight once into oneDNN's blocked layout.

Pre-packing: `F.linear` hands a plain [N, K] weight to the BLAS on every call, which re-packs it
for its kernel each time; oneDNN's layout, packed once for the number of rows M a decode step has
(the batch), saves that. From BATCH_PACK_ROWS rows on every weight is packed for the batch; below
that only the tall, large ones (`worth_packing`), for which oneDNN still pays at M=1. The model
re-packs when the batch changes (`TPCausalLM.setup_cache`, outside any timed region; exact). At
prefill shapes the packed weight loses to F.linear, so from PREFILL_ROWS rows on it is unpacked
for the call. oneDNN packs bf16 only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT;
elsewhere, and on GPUs/NPUs, layers stay on F.linear.

bf16 on a CPU without bf16 arithmetic (no AVX-512 BF16, no AMX): there the libraries' bf16 GEMM
costs M times a matrix-vector product, so from UPCAST_MIN_ROWS rows on `linear` computes in fp32
instead, converting UPCAST_BLOCK_ROWS weight rows at a time (a block stays in cache; the weights
stay bf16 in memory). A bf16 x bf16 product is exact in fp32 and the libraries accumulate bf16
GEMMs in fp32 too, so this is the bf16 GEMM's arithmetic up to the order of the sums, rounded to
bf16 once. At 1-3 rows native bf16 is faster (it reads half the bytes).

The thresholds were measured on one kind of CPU (an AVX2 EPYC); the figures are in
benchmarks/RESULTS.md, "Kernel choices of linear.py".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


PREFILL_ROWS = 512  # from this many rows (batch x tokens) on, F.linear beats the packed weight
BATCH_PACK_ROWS = 4  # from a decode batch of this many rows on, every weight is packed for it
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


def worth_packing(weight: torch.Tensor, rows: int = 1) -> bool:
    """Whether oneDNN's layout, packed for decode steps of `rows` rows, beats F.linear (see above):
    every weight from BATCH_PACK_ROWS rows on, below that the tall and large ones."""
    if weight.dtype == torch.bfloat16 and not NATIVE_BF16_MATMUL and rows >= UPCAST_MIN_ROWS:
        return False  # `linear`'s fp32 path is the one measured for such batches (see above)
    if rows >= BATCH_PACK_ROWS:
        return True
    n, k = weight.shape
    return k >= 1024 and n >= 2 * k


def _pack(weight: torch.Tensor, rows: int = 1) -> torch.Tensor | None:
    """`weight` [N, K] in oneDNN's layout for `rows` rows, or None where oneDNN cannot take it."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw ..."
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear (same parameter names, so HF state dicts load) with `forward(x, add_bias)` and
    an optional pre-packed weight. Once packed, the plain weight is released (one copy in memory)."""

    packed: torch.Tensor | None = None
    packed_rows = 0  # the rows (decode batch) `packed` is laid out for

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        bias = self.bias if add_bias else None
        if self.packed is not None:
            if x.numel() >= PREFILL_ROWS * x.shape[-1]:
                return F.linear(x, self.packed.to_dense(), bias)
            return packed_linear(x, self.packed, bias)
        return linear(x, self.weight, bias)

    def plain_weight(self) -> torch.Tensor:
        """The weight as [N, K], unpacked if need be (exact)."""
        return self.weight if self.packed is None else self.packed.to_dense()

    def prepack(self, force: bool = False, rows: int = 1) -> bool:
        """Pack the weight for oneDNN, for decode steps of `rows` rows, and drop the plain copy;
        where that does not pay (`worth_packing`, unless `force`) or oneDNN cannot take this
        dtype/device, keep (or restore) the plain weight and return False. Called again with
        other rows, it re-packs."""
        if self.packed is not None and self.packed_rows == rows:
            return True
        # Re-packing runs inside generation's inference mode; weights made there would be
        # inference tensors, which later calls that track autograd refuse.
        with torch.inference_mode(False), torch.no_grad():
            return self._prepack(force, rows)

    def _prepack(self, force: bool, rows: int) -> bool:
        was_packed = self.packed is not None
        plain = self.plain_weight()
        self.packed, self.packed_rows = None, 0  # the old layout goes before the new one is made
        packed = _pack(plain, rows) if force or worth_packing(plain, rows) else None
        if packed is None:
            if was_packed:
                self.weight = nn.Parameter(plain, requires_grad=False)
            return False
        self.packed, self.packed_rows = packed, rows
        # The plain weight is no longer read; an empty tensor of the same dtype keeps the
        # parameter in place (names, dtype) without holding its memory.
        self.weight = nn.Parameter(plain.new_empty(0), requires_grad=False)
        return True


def prepack_model(model: nn.Module, force: bool = False, rows: int = 1) -> int:
    """Pre-pack the Linears of `model` for `rows` rows where it pays (all with `force`); returns
    how many are packed."""
    return sum(m.prepack(force, rows) for m in model.modules() if isinstance(m, Linear))


def pack_weight(weight: torch.Tensor, force: bool = False, rows: int = 1) -> torch.Tensor | None:
    """A packed copy of a weight that must also stay plain (the lm_head tied to the embedding),
    for `rows` rows, or None where it does not pay or oneDNN cannot take it."""
    with torch.inference_mode(False), torch.no_grad():  # as in Linear.prepack
        return _pack(weight, rows) if force or worth_packing(weight, rows) else None
