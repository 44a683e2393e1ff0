"""The packed weight layouts, each packing a plain [N, K] weight for a number of rows: oneDNN's
blocked layout (fp32, bf16, fp16; it can be read back with to_dense), for the decode batch's rows
or for at least WIDE_ROWS, MKL's packed sgemm (fp32 only; it cannot be read back), and our own
panels (panels.py: fp32, bf16; the same for every row count). kernels.py chooses between them.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import panels


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """`weight` [N, K] in oneDNN's layout for `rows` rows, or None where oneDNN cannot take it."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    with torch.inference_mode(False), torch.no_grad():  # packed weights outlive inference mode
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw ..."
            return None


def pack_mkl(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """`weight` [N, K] fp32 in MKL's packed sgemm layout for `rows` rows, or None where MKL is
    absent or the dtype is not fp32 (MKL packs sgemm only)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkl.is_available():
        return None
    with torch.inference_mode(False), torch.no_grad():  # packed weights outlive inference mode
        try:
            return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), rows)
        except (RuntimeError, AttributeError):  # a torch built without MKL's packed API
            return None


# oneDNN's layout packed for at least this many rows, whatever the decode batch: for one row
# oneDNN lays a weight out otherwise, and on the EPYC Zen 5 (fp32, one thread) that layout ran
# one-row products 10-30% slower than the layouts packed for 16 to 2048 rows, which read weights
# from memory as fast as BLAS's sgemv or faster, and ran 128-row prefills 5-20% faster than the
# plain weight (RESULTS.md, "oneDNN's layout packed for many rows, at one row"). Whether it pays
# is measured per weight like every layout (kernels.py).
WIDE_ROWS = 64


def pack_wide(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """`weight` in oneDNN's layout for max(rows, WIDE_ROWS) rows (see WIDE_ROWS), or None as pack."""
    return pack(weight, max(rows, WIDE_ROWS))


# The packed layouts: each packs a plain [N, K] weight for a number of rows (None: cannot).
PACKERS: dict[str, Callable[[torch.Tensor, int], torch.Tensor | None]] = {"onednn": pack, "onednn_wide": pack_wide,
                                                                           "mkl_packed": pack_mkl,
                                                                           "panels": panels.pack}
# The layouts packed alike for every row count: a change of decode batch keeps them as they are.
ROW_FREE_LAYOUTS = ("panels",)


def relaid(kind: str, old_rows: int, rows: int) -> bool:
    """Whether the layout `kind`, packed for `old_rows` rows, is packed again for `rows`."""
    return rows != old_rows and kind not in ROW_FREE_LAYOUTS
# The layouts oneDNN runs and reads back (to_dense).
ONEDNN_LAYOUTS = ("onednn", "onednn_wide")
