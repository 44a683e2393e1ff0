"""The C allocator of a CPU rank: freed activations kept in the heap rather than mapped anew.

glibc's malloc serves a large block (from 128 KiB, a threshold it raises as far as 32 MiB as such
blocks are freed) with a fresh mapping, and unmaps it when it is freed, so the next block of that
size faults in every page again, zeroed by the kernel. A prefill allocates its activations
afresh at every layer: a batch-16 fp32 prefill of the bench-size model (2048 rows; its MLP's
activation is a 32 MiB block) touched 305-444 MiB of fresh pages per call, 80-110 thousand page
faults, on the AVX-512 Xeon (RESULTS.md, "The allocator"). Set up here, every block comes from
the heap (no mappings: M_MMAP_MAX 0) and the heap gives memory back only past TRIM_BYTES free, so
a freed block is used again; the same prefill then faulted no page.

The cost: a rank holds on to its peak heap, up to TRIM_BYTES of it unused. `STARCODER_TP_MALLOC=
system` leaves glibc as it is. (vLLM's CPU backend preloads tcmalloc for the same reason; this
needs nothing.)

Huge pages: torch's large CPU blocks (the weights, once laid out, and the activations) are asked
for in 2 MiB transparent huge pages (`enable_huge_pages`). Decode reads every weight at every
step, through the TLB. On the EPYC Zen 5, worker groups of the same code run decode apart from
one start to another; with 4 KiB pages by 7-15%, enough for the A/B harness to read 1.08-1.14
comparing main with itself, and with 2 MiB pages by 5% in three runs of four (13% in one), the
harness reading 1.03. On the AVX-512 Xeon they changed nothing measurable (RESULTS.md, "Huge
pages for the weights on Zen 5").

c10 advises such a block but aligns it to 4 KiB only, and the kernel can map a huge page only
over a whole aligned 2 MiB of the advised range: a 2 MiB weight got none, a 2.25 MiB one mostly
none, an 8 MiB one three of its four, and blocks reused from the heap none at all. So the weights
the kernels read are placed by `empty` / `copy_of`: a block of their own from a 2 MiB boundary,
whole huge pages, whatever a reused heap held there dropped (MADV_DONTNEED) so that the first write
faults huge pages in (RESULTS.md, "Weights in whole huge pages"). MADV_COLLAPSE did it before and
held a rank in the call past its peers' 60 s collective timeout twice in one day of CI on the EPYC
Zen 4 VM (the plan's decode copies, in the HumanEval suite at world size 2); dropped pages were
neutral in the decode A/B there (RESULTS.md, "Start-up, one-row panels and the decode glue on Zen 4,
second session").
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import re
from pathlib import Path

import torch

MALLOC_ENV = "STARCODER_TP_MALLOC"  # "tuned" (default) or "system"
MALLOC_CHOICES = ("tuned", "system")
TRIM_BYTES = 1 << 30  # free memory at the heap's top beyond this goes back to the system
TOP_PAD_BYTES = 64 << 20  # each growth of the heap by this much more: fewer brk calls
# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
# c10's CPU allocator: with this set to 1, blocks from 2 MiB on are advised MADV_HUGEPAGE (aligned
# to 4 KiB only: see `empty`). Read once, at the process's first allocation.
THP_ENV = "THP_MEM_ALLOC_ENABLE"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE_BYTES = 2 << 20
# `empty` places tensors from this size on: the rounding up to whole huge pages costs at most
# 2 MiB a tensor less one page (a 1 MiB weight, a rank's share of a small model's at TP=2, takes a
# huge page); the alignment's slack is released.
HUGE_PAGE_MIN_BYTES = 1 << 20
MADV_DONTNEED, MADV_HUGEPAGE = 4, 14  # linux/mman.h
PAGE_BYTES = 4096


def malloc_choice() -> str:
    """MALLOC_ENV's value, checked (the parent checks it before any rank is spawned)."""
    choice = os.environ.get(MALLOC_ENV, "tuned")
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"{MALLOC_ENV}={choice!r}: expected one of {list(MALLOC_CHOICES)}")
    return choice


def tune_malloc() -> str:
    """Set this process's glibc malloc up as above, unless MALLOC_ENV says "system"; returns what
    was done ("tuned", "system", or "system: <why not>")."""
    if malloc_choice() == "system":
        return "system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"system: not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_BYTES), (M_TOP_PAD, TOP_PAD_BYTES)):
        if mallopt(param, value) != 1:
            return f"system: glibc refused mallopt({param}, {value})"
    return "tuned"


def enable_huge_pages() -> str:
    """Have torch's large CPU blocks advised as transparent huge pages, unless MALLOC_ENV says
    "system" or THP_ENV is set already (the user's choice stands). Effective only before this
    process's first block of 2 MiB or more. Returns what was done."""
    if malloc_choice() == "system":
        return "system"
    if THP_ENV in os.environ:
        return f"{THP_ENV}={os.environ[THP_ENV]} (as set)"
    try:
        mode = re.search(r"\[(\w+)\]", THP_SETTING.read_text()).group(1)
    except (OSError, AttributeError):
        return "4 KiB pages: no transparent huge pages here"
    if mode == "never":
        return "4 KiB pages: transparent_hugepage is 'never'"
    os.environ[THP_ENV] = "1"
    return "2 MiB pages"


def as_a_cpu_rank() -> tuple[str, str]:
    """This process's allocator and page size set up as a CPU rank's: (tune_malloc's, enable_huge_pages's
    answer). Before the process's first large block. The benchmarks that load a model in-process call it
    too: in 4 KiB pages their kernels read the weights slower than a rank does (a bf16 batch-1 decode
    step 8.2-8.4 ms against 7.3; RESULTS.md, "Panels at one row without asking ahead")."""
    return tune_malloc(), enable_huge_pages()


def owned_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s tensors copied into this process's own memory: aligned blocks, in huge pages
    where enable_huge_pages set them up. safetensors' load_file leaves CPU tensors in the file's
    mapping, page-cache pages of 4 KiB at the file's unaligned offsets, and the kernels that run
    on the plain weight (gemv, oneDNN on the plain weight) read them there at every step: on the
    EPYC Zen 5 the bench-size model's fp32 batch-1 decode step took 3-18% longer so, its first
    token up to 5% (RESULTS.md, "Weights out of the file's mapping"). The copy costs 0.15 s per
    550 MB at load where the memory is at hand, 1-2 s on the EPYC Zen 4 VM, whose fresh pages fault
    in at 0.3-0.5 GB/s: load_model leaves the linear weights it lays out later in the mapping. The
    file's pages stay in the page cache, free for the system to reclaim. Large tensors are placed in
    whole huge pages (`empty`)."""
    return {name: copy_of(tensor) for name, tensor in state.items()}


@functools.cache
def _madvise():
    """libc's madvise(address, length, advice), or None off Linux/glibc."""
    if platform.system() != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def places_in_huge_pages(nbytes: int) -> bool:
    """Whether `empty` gives a CPU tensor of `nbytes` whole huge pages of its own: this process
    asked for huge pages (enable_huge_pages, or THP_ENV=1 as set) and the tensor is large enough."""
    return nbytes >= HUGE_PAGE_MIN_BYTES and os.environ.get(THP_ENV, "") == "1" and _madvise() is not None


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU; where places_in_huge_pages, a view of a block of
    its own that starts on a 2 MiB boundary and spans whole 2 MiB pages, advised as transparent
    huge pages and emptied of what a reused heap held there, so that the first write faults them
    in as huge pages (as 4 KiB ones where the kernel has no huge page free)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not places_in_huge_pages(nbytes):
        return torch.empty(shape, dtype=dtype)
    span = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    block = torch.empty(span + HUGE_PAGE_BYTES, dtype=torch.uint8)
    start = block.data_ptr()
    region = block[-start % HUGE_PAGE_BYTES:][:span]
    madvise = _madvise()
    madvise(region.data_ptr(), span, MADV_HUGEPAGE)
    madvise(region.data_ptr(), span, MADV_DONTNEED)  # (its contents are not wanted: `empty`)
    # The slack before and after the region, whole pages inside the block: released, where a
    # reused heap had them in memory (up to 2 MiB a tensor, never read).
    for low, high in ((-(-start // PAGE_BYTES) * PAGE_BYTES, region.data_ptr()),
                      (region.data_ptr() + span, (start + block.numel()) // PAGE_BYTES * PAGE_BYTES)):
        if high > low:
            madvise(low, high - low, MADV_DONTNEED)
    return region[:nbytes].view(dtype).view(shape)


def copy_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor `tensor`, placed by `empty`."""
    return empty(tensor.shape, tensor.dtype).copy_(tensor)


def placed(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself where `empty` would not place it or it starts on a 2 MiB boundary
    already (placed before), else copy_of(tensor): for a weight kept as the kernels read it."""
    nbytes = tensor.numel() * tensor.element_size()
    if (tensor.device.type != "cpu" or not places_in_huge_pages(nbytes)
            or (tensor.is_contiguous() and tensor.data_ptr() % HUGE_PAGE_BYTES == 0)):
        return tensor
    return copy_of(tensor)
