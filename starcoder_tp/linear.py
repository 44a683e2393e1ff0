"""The model's linear layers: nn.Linear that can leave out its bias (row-parallel layers add it
once, after the all-reduce) and runs the kernels kernels.py chose for its weight: the plain
weight through F.linear, oneDNN's or MKL's packed layout (packed once for the decode batch; the
model re-packs when the batch changes, in `TPCausalLM.setup_cache`, outside any timed region),
or bf16 computed in fp32 a block of weight rows at a time.

The fp32 path: on a CPU whose bf16 GEMM is slow (one without bf16 arithmetic, where the
libraries' bf16 GEMM cost M times a matrix-vector product on an AVX2 EPYC), bf16 x bf16 products
are computed in fp32, UPCAST_BLOCK_ROWS weight rows at a time (a block stays in cache; the
weights stay bf16 in memory). A bf16 x bf16 product is exact in fp32 and the libraries accumulate
bf16 GEMMs in fp32 too, so this is the bf16 GEMM's arithmetic up to the order of the sums,
rounded to bf16 once. Whether it pays is measured, like every other choice (kernels.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv, malloc, panels, rowdot
from .activations import ACTIVATIONS
from .kernels import SPLIT_ROWS, Choice, key_of
from .layouts import ONEDNN_LAYOUTS, PACKERS, relaid

UPCAST_BLOCK_ROWS = 1024  # weight rows converted to fp32 at a time


def native_bf16_matmul() -> bool:
    """Whether this CPU has bf16 arithmetic for GEMMs (AVX-512 BF16 or AMX tiles)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


# Probed once, at import: torch.compile cannot trace the probes (each call in a compiled decode
# step was a graph break, 46 per bf16 step of the bench-size model), but reads a global. Only
# compile_decode's choice of inductor mode reads it; eager kernels are measured (kernels.py).
NATIVE_BF16_MATMUL = native_bf16_matmul()


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear of bf16 tensors computed in fp32, a block of weight rows at a time (see above)."""
    wide = x.float()
    blocks = [F.linear(wide, weight[start:start + UPCAST_BLOCK_ROWS].float(),
                       None if bias is None else bias[start:start + UPCAST_BLOCK_ROWS].float())
              for start in range(0, weight.shape[0], UPCAST_BLOCK_ROWS)]
    return (torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]).to(x.dtype)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, post_op: str = "none",
                  algorithm: str = "") -> torch.Tensor:
    """oneDNN's GEMM on a packed weight, or on a plain [N, K] one (laid out by oneDNN as it goes);
    `post_op` (relu, gelu with algorithm tanh or none) is applied to the fp32 accumulator before
    the output is written."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post_op, [], algorithm)


def mkl_linear(x: torch.Tensor, packed: torch.Tensor, sizes: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """MKL's packed sgemm (layouts.pack_mkl) at any row count; `sizes` is any [N, K] fp32 tensor
    (an expanded scalar: torch reads its sizes, and reads its data only when the rows passed
    differ from the rows of the call, which they never do here)."""
    return torch.ops.mkl._mkl_linear(x, packed, sizes, bias, x.numel() // x.shape[-1])


def run_kernel(kind: str, x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias by the kernel `kind` (kernels.py): `packed` for onednn(_wide), unpack,
    panels and mkl_packed (whose `weight` is only its [N, K] sizes: see mkl_linear)."""
    if kind == "panels":
        return panels.linear(x, packed, bias)
    if kind == "mkl_packed":
        return mkl_linear(x, packed, weight, bias)
    if kind in ONEDNN_LAYOUTS:
        return packed_linear(x, packed, bias)
    if kind == "onednn_plain":  # oneDNN's GEMM on the plain weight
        return packed_linear(x, weight, bias)
    if kind == "unpack":
        return F.linear(x, packed.to_dense(), bias)
    if kind == "fp32":
        return fp32_linear(x, weight, bias)
    if kind == "gemv":
        return gemv.linear(x, weight, bias)
    if kind == "rowdot":
        return rowdot.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameter names, so HF state dicts load) with `forward(x, add_bias)` and
    the kernels of a kernels.Choice. Once packed, the plain weight is released (one copy in memory)."""

    packed: torch.Tensor | None = None
    packed_kind: str | None = None  # the layout of `packed`: a key of layouts.PACKERS
    packed_rows = 0  # the rows (decode batch) `packed` is laid out for
    packed_sizes: torch.Tensor | None = None  # [N, K] expanded from one element: mkl_linear's sizes
    # Reads the plain weight back from where it was loaded (the model's part on disk); set by
    # load_model. The layouts that cannot be unpacked (MKL's) are taken only where it is set.
    plain_source: Callable[[], torch.Tensor] | None = None
    # The plain weight is the part file's own mapping (load_model: it is laid out before it is read
    # at every step); a layout that keeps it plain copies it out, placed.
    in_file = False
    decode_kernel = "plain"  # for calls of at most decode_numel elements (the decode batch's rows)
    short_kernel = "plain"  # for larger calls of fewer than split_numel elements (short prefills)
    prefill_kernel = "plain"  # for the rest (long prefills)
    decode_numel = 0
    split_numel = 0
    panels_calls: dict[tuple, panels.Bound] | None = None  # (Linear._panels; a dict from use_kernels on)
    layouts_made = 0  # use_kernels calls in this process, every Linear's (a class attribute)

    def _kernel(self, x: torch.Tensor) -> str:
        n = x.numel()
        return self.decode_kernel if n <= self.decode_numel else (
            self.short_kernel if n < self.split_numel else self.prefill_kernel)

    def _panels(self, x: torch.Tensor, bias: torch.Tensor | None, activation: tuple[str, str] | None = None):
        # A panels.Bound per bias and activation (use_kernels empties them with each layout), made
        # again where the bias is another.
        call = self.panels_calls.get((bias is None, activation))
        if call is None or call.packed is not self.packed or call.bias_given is not bias:
            call = self.panels_calls[(bias is None, activation)] = panels.Bound(self.packed, bias, activation)
        return call(x)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        bias = self.bias if add_bias else None
        kind = self._kernel(x)
        if kind == "plain":
            return F.linear(x, self.weight, bias)
        if kind == "panels":
            return self._panels(x, bias)
        return run_kernel(kind, x, self.packed_sizes if kind == "mkl_packed" else self.weight, self.packed, bias)

    def forward_activated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """ACTIVATIONS[activation](x @ W.T + b). With the packed weight the activation is oneDNN's
        post-op, on the accumulator: a pass less over the [rows, N] output, the widest activation
        of a layer, which cost bf16 prefills a fifth of their time (RESULTS.md, "Fused activation")."""
        eager, post_op, algorithm = ACTIVATIONS[activation]
        kind = self._kernel(x)
        if kind in ONEDNN_LAYOUTS or kind == "onednn_plain":
            return packed_linear(x, self.weight if kind == "onednn_plain" else self.packed, self.bias, post_op,
                                 algorithm)
        if kind == "panels" and panels.fuses(post_op, algorithm):
            return self._panels(x, self.bias, (post_op, algorithm))
        return eager(self.forward(x))

    def row_parallel(self, x: torch.Tensor, tp) -> torch.Tensor:
        """This rank's partial product summed over the ranks (tp: a comm.TPGroup), the bias added
        once after the sum; at world size 1, nothing to sum: the bias goes in with the GEMM."""
        if tp.world_size == 1:
            return self(x)
        out = tp.all_reduce_(self(x, add_bias=False))
        return out if self.bias is None else out + self.bias

    def shape_key(self) -> str:
        """kernels.shape_key of the weight, without unpacking it."""
        return key_of(self.out_features, self.in_features, self.weight.dtype)

    def plain_weight(self) -> torch.Tensor:
        """The weight as [N, K]: unpacked from oneDNN's layout or our panels (exact), or read again
        from its source for MKL's, which cannot be read back."""
        if self.packed is None:
            return self.weight
        if self.packed_kind in ONEDNN_LAYOUTS:
            return self.packed.to_dense()
        if self.packed_kind == "panels":
            return panels.unpack(self.packed)
        weight = self.plain_source()
        if tuple(weight.shape) != (self.out_features, self.in_features) or weight.dtype != torch.float32:
            raise RuntimeError(f"the plain weight read back for a {self.out_features}x{self.in_features} MKL-packed "
                               f"linear is {list(weight.shape)} {weight.dtype}: the model's part changed on disk?")
        return weight

    def _owned(self, plain: torch.Tensor) -> torch.Tensor:
        """`plain` as the kernels read it at every step: placed (malloc.placed), and never the part
        file's mapping: `placed` returns a tensor as it is where it does not place it (a small one,
        no huge pages asked for) or where it starts on a 2 MiB boundary, which a mapped one may."""
        owned = malloc.copy_of(plain) if self.in_file else malloc.placed(plain)
        self.in_file = False
        return owned

    def use_kernels(self, choice: Choice, rows: int) -> bool:
        """Lay the weight out for `choice` at decode batches of `rows` rows (re-packing if the
        rows changed); returns whether it is packed. A layout the library cannot take (or, for
        MKL's, a weight with no plain_source to read it back from) falls back to plain."""
        layout = choice.decode
        # Runs inside generation's inference mode; weights made there would be inference
        # tensors, which later calls that track autograd refuse.
        Linear.layouts_made += 1  # (a fused step made before points to the old layout: FusedStep.stale)
        with torch.inference_mode(False), torch.no_grad():
            same = layout == self.packed_kind and not relaid(layout, self.packed_rows, rows)
            packed = self.packed if same else None
            if layout in PACKERS and packed is None:
                plain = self.plain_weight()
                self.packed, self.packed_kind, self.packed_rows = None, None, 0  # the old layout goes first
                reversible = layout != "mkl_packed" or self.plain_source is not None
                packed = PACKERS[layout](plain, rows) if reversible else None
                if packed is None:
                    choice = Choice("plain", "plain")
                    self.weight = nn.Parameter(self._owned(plain), requires_grad=False)
                else:
                    # The plain weight is no longer read; an empty tensor of the same dtype keeps
                    # the parameter in place (names, dtype) without holding its memory.
                    self.weight = nn.Parameter(plain.new_empty(0), requires_grad=False)
                    self.packed_sizes = plain.new_empty(1).expand(plain.shape)
                    self.in_file = False
            elif layout not in PACKERS and (self.packed is not None or self.in_file):
                self.weight = nn.Parameter(self._owned(self.plain_weight()), requires_grad=False)
        self.packed, self.packed_rows = packed, rows if packed is not None else 0
        self.panels_calls = {}  # (a bound call holds the weight it was made for: it goes with it)
        self.packed_kind = choice.decode if packed is not None else None
        self.decode_kernel, self.short_kernel, self.prefill_kernel = choice.decode, choice.short, choice.prefill
        self.decode_numel, self.split_numel = rows * self.in_features, SPLIT_ROWS * self.in_features
        return packed is not None
