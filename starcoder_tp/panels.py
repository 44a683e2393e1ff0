"""The `panels` layout: a weight in panels of 16 output columns, run by our own kernel (panels.c).

A GEMM that keeps its accumulators along the output columns needs the weight's columns side by
side: [N/16][K][16] in fp32, and [N/16][K/2][16][2] in bf16, each K pair next to each other, as
AVX512_BF16's dot product takes it. Every panel is then one run through memory, read in order, and
the kernel asks for the next panels while it computes on these, so the weight's stream overlaps
the arithmetic. Decode batches of several rows are where that pays: oneDNN's GEMM added the
weight's stream to its arithmetic there (RESULTS.md, "What limits the batch-16 decode"). The same
kernel runs the prefill's rows. Whether it pays is measured per weight like every layout
(kernels.py).

Packing and unpacking are a permutation of the weight (exact both ways). The kernel needs AVX2
and FMA, N a multiple of 16 and, in bf16, K even: panels.c runs AVX-512's kernels where the CPU
has AVX-512 (bf16: AVX512_BF16), and panels_avx2.c's otherwise (bf16 widened in registers, each
pair summed as AVX512_BF16's dot product sums it: AVX-512's bits in every product tried on the
EPYC Zen 4, fp32's too but for the tanh GELU's last bit; the dot product flushes denormals, AVX2
keeps them). It is built with rowdot.c (rowdot.py:
the machine's C compiler, at first use), and where it is not built it is not a candidate. One
thread, as rowdot.
"""
from __future__ import annotations

import torch

from . import malloc, rowdot

COLUMNS = 16  # output columns per panel
# The activations the kernel applies to its output, by the oneDNN post-op and algorithm that
# activations.ACTIVATIONS names for them (panels.c's act codes).
ACTIVATIONS = {("gelu", "tanh"): 1, ("relu", ""): 2}
_DTYPE_BITS = {torch.float32: 1, torch.bfloat16: 2}  # panels_dtypes()'s


def _runs(dtype: torch.dtype) -> bool:
    # (panels_dtypes: what the path rowdot.c took at load, or a test's use_path since, lets panels.c run)
    lib, _ = rowdot.library()
    return lib is not None and bool(lib.panels_dtypes() & _DTYPE_BITS.get(dtype, 0))


def supports(weight: torch.Tensor) -> bool:
    """Whether this [N, K] weight can be laid out in panels here."""
    n, k = weight.shape
    return (weight.device.type == "cpu" and weight.dtype in _DTYPE_BITS and n % COLUMNS == 0
            and (weight.dtype != torch.bfloat16 or k % 2 == 0) and _runs(weight.dtype))


def pack(weight: torch.Tensor, rows: int = 1) -> torch.Tensor | None:
    """`weight` [N, K] in panels (the layout is the same for every row count), or None where it
    cannot be (supports)."""
    if not supports(weight):
        return None
    n, k = weight.shape
    with torch.inference_mode(False), torch.no_grad():  # packed weights outlive inference mode
        if weight.dtype == torch.bfloat16:  # [N/16, 16, K/2, 2] -> [N/16, K/2, 16, 2]
            order = weight.detach().reshape(n // COLUMNS, COLUMNS, k // 2, 2).permute(0, 2, 1, 3)
        else:
            order = weight.detach().reshape(n // COLUMNS, COLUMNS, k).permute(0, 2, 1)  # [N/16, K, 16]
        return malloc.copy_of(order)  # (in whole huge pages where the rank asked for them)


def shape_of(packed: torch.Tensor) -> tuple[int, int]:
    """The plain weight's [N, K] of a packed one."""
    return packed.shape[0] * COLUMNS, packed.shape[1] * (2 if packed.dim() == 4 else 1)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The plain [N, K] weight of a packed one (exact), placed as the kernels read a weight (malloc.empty)."""
    n, k = shape_of(packed)
    order = (0, 2, 1, 3) if packed.dim() == 4 else (0, 2, 1)
    with torch.inference_mode(False), torch.no_grad():
        plain, panels = malloc.empty((n, k), packed.dtype), packed.permute(*order)  # [N/16, 16, K(/2, 2)]
        plain.view(panels.shape).copy_(panels)
        return plain


def rows(packed: torch.Tensor, index: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The plain weight's rows `index - first` (index: int64 ids of any shape) of a packed one, [*index.shape, K]
    (exact), gathered from their panels without unpacking the rest (a tied embedding's lookup), and zeros
    for an id outside [first, first + N) (another vocabulary shard's token: embedding.py). By panel_rows.c
    where the library is built: one call where torch's indexing took a dozen ops."""
    # A row is one value (bf16: one K pair, as 32 bits) every 16 in its panel: 64 bytes apart, a cache
    # line each, 4 KiB of values from 64 KiB; gathered at ~25-40 GB/s (RESULTS.md, "Start-up: the tied
    # embedding read from the lm_head's panels").
    n, k = shape_of(packed)
    lib, _ = rowdot.library()
    # (a compiled step traces torch's ops below)
    if (lib is not None and index.dtype == torch.int64 and packed.is_contiguous()
            and packed.device.type == index.device.type == "cpu" and not torch.compiler.is_compiling()):
        index = index.contiguous()
        out = torch.empty(*index.shape, k, dtype=packed.dtype)
        lib.panels_gather_rows(packed.data_ptr(), n, packed.shape[1], index.data_ptr(), index.numel(), first,
                               out.data_ptr())
        return out
    local, outside = shard_ids(index, first, n)
    words = packed.view(torch.int32).squeeze(-1) if packed.dim() == 4 else packed  # [N/16, K', 16]
    gathered = words.permute(0, 2, 1)[local // COLUMNS, local % COLUMNS]  # [*, K']
    return gathered.view(packed.dtype).masked_fill_(outside.unsqueeze(-1), 0)


def shard_ids(index: torch.Tensor, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`index - first` with ids outside [first, first + n) as 0, those ids' mask): a vocabulary shard's rows
    looked up by torch's ops (rows' fallback, embedding.Embedding.shard_rows), the outside ones zeroed after."""
    local = index - first
    outside = (local < 0) | (local >= n)
    return local.masked_fill(outside, 0), outside


def fuses(post_op: str, algorithm: str) -> bool:
    """Whether `linear` applies this activation (activations.ACTIVATIONS' post-op and algorithm)."""
    return (post_op, algorithm) in ACTIVATIONS


class Bound:
    """`linear` of one packed weight, bias and activation, with what depends on them alone (the
    checks, the library's function, the pointers) done once: the bench-size model's layers call
    their linears 32 times a decode step, and that part was half of a one-row call's 7.3 us of
    Python (RESULTS.md, "Start-up, one-row panels and the decode glue on Zen 4, second session").
    It holds the tensors it points to (a storage swapped under them, `.data = `, it does not see)."""

    __slots__ = ("n", "k", "dtype", "packed", "bias_given", "bias", "kernel", "act", "pointers")

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: tuple[str, str] | None = None):
        self.n, self.k = shape_of(packed)
        self.dtype, self.packed, self.bias_given = packed.dtype, packed, bias
        if bias is not None and (bias.dtype != packed.dtype or bias.numel() != self.n):
            raise ValueError(f"panels.linear: bias {list(bias.shape)} {bias.dtype} against a [{self.n}, {self.k}] "
                             f"{packed.dtype} weight")
        self.bias = None if bias is None else bias.contiguous()
        lib, _ = rowdot.library()
        self.kernel = lib.panels_f32 if packed.dtype == torch.float32 else lib.panels_bf16
        self.act = ACTIVATIONS[activation] if activation else 0
        self.pointers = (packed.data_ptr(), None if bias is None else self.bias.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.k or x.dtype != self.dtype:
            raise ValueError(f"panels.linear: x {list(x.shape)} {x.dtype} against a [{self.n}, {self.k}] "
                             f"{self.dtype} weight")
        x = x if x.is_contiguous() else x.contiguous()  # (rows of K side by side)
        out = torch.empty(*x.shape[:-1], self.n, dtype=self.dtype)
        self.kernel(self.pointers[0], x.data_ptr(), self.pointers[1], out.data_ptr(), self.n, self.k,
                    x.numel() // self.k, self.act)
        return out


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
           activation: tuple[str, str] | None = None) -> torch.Tensor:
    """x @ W.T + bias (then the activation, a post-op `fuses` takes) for W in panels: x and bias in
    its dtype, x of any number of rows."""
    return Bound(packed, bias, activation)(x)

