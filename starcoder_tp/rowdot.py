"""One-row linear products (decode at batch 1) by a kernel of our own, rowdot.c, for fp32 and bf16.

A one-row product reads each weight element once for one multiply-add: it runs at the speed of
memory when enough loads are in flight. rowdot.c sums eight weight rows side by side. On one
thread of the EPYC Zen 5, from 2 MiB pages, it read bf16 weights at 44-47 GB/s and fp32 ones at
38-39, as fast as a plain read of the same memory; oneDNN's one-row GEMMs read the same weights
at 31-41 GB/s from one sitting to the next, and in the model's decode step the two ran alike
(RESULTS.md, "A one-row kernel of our own"). With torch and oneDNN held to AVX2 there, it ran the
bf16 lm_head at one row in 3.0 ms against aten's 3.6 and bf16 decode steps 5% faster; numpy's
BLAS has no bf16 (gemv.py is fp32 only). Whether it pays is measured per weight shape, like
every kernel (kernels.py).

rowdot.c is compiled at first use by the machine's C compiler ($CC, else cc or gcc) and cached
per source and compiler (cache_dir("native")). `STARCODER_TP_ROWDOT=off` leaves it unbuilt; set to
one of PATHS, it runs that instruction set's path instead of the widest (to see what a narrower
CPU's would do). No
compiler, a failed build or a CPU the source does not target: the kernel is not a candidate, and
`unavailable()` says why. The library runs on the calling thread only: with more threads, the
libraries' threaded GEMMs compete with it in the plan's timings.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .files import atomic_path, cache_dir

# Our kernels, built into one library: rowdot.c's one-row products, panels.c's (and on CPUs without
# AVX-512 panels_avx2.c's: panels.py), attend.c's decode attention (decode_attention.py), argmax.c's
# greedy pick (argmax.py), softmax.c's causal softmax of the prefill's blocks (softmax.py),
# fused_step.c's decode layers and rotary.c's RoPE rotation (rotary.py), stream_copy.c's publishing
# copy and shm_reduce.c's small all-reduce (shm_comm.py).
SOURCES = tuple(Path(__file__).with_name(name) for name in ("rowdot.c", "panels.c", "panels_avx2.c", "attend.c",
                                                           "attend_few.c", "argmax.c", "softmax.c", "fused_step.c",
                                                           "rotary.c", "stream_copy.c", "shm_reduce.c", "panel_rows.c"))
# (part of the build's digest: the sources include them)
HEADERS = tuple(Path(__file__).with_name(name) for name in ("simd.h", "simd_avx2.h", "attend_few.h"))
ENV = "STARCODER_TP_ROWDOT"  # "off": never build or offer the kernel; a name of PATHS: that path
# (no contraction of a * b + c into one rounding: the C code that reproduces torch's ops rounds each, as they do)
CFLAGS = ("-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off")
BUILD_TIMEOUT_S = 120
_DTYPES = (torch.float32, torch.bfloat16)
PATHS = ("scalar", "avx2", "avx512", "avx512bf16")  # rowdot.c's, narrowest first


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    """The shared library of rowdot.c built by `compiler`, from the cache if built before."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    text = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    digest = hashlib.sha256(text + version.encode() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    library = cache_dir("native", f"rowdot-{digest}.so")
    if library.exists():
        return library
    with atomic_path(library) as tmp:  # ranks building at once each rename a whole library in place
        units = [str(source) for source in SOURCES]
        done = subprocess.run([compiler, *CFLAGS, "-o", str(tmp), *units], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {' '.join(units)} (exit {done.returncode}): "
                               f"{done.stderr.strip()[-800:]}")
    return library


@functools.cache  # once per process
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library of our kernels, rowdot's path's name) or (None, why not)."""
    wanted = os.environ.get(ENV, "").lower()
    if wanted in ("off", "0", "no"):
        return None, f"{ENV}={os.environ[ENV]}"
    if wanted and wanted not in PATHS:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 'off' or one of {PATHS}")
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler ($CC, cc or gcc) to build rowdot.c"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        print(f"[rowdot] not built, the kernel is not a candidate: {error}", file=sys.stderr)
        return None, str(error)
    pointers = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 2  # w, x, bias (or NULL), y, n, k
    for fn in (lib.rowdot_f32, lib.rowdot_bf16):
        fn.argtypes, fn.restype = pointers, None
    lib.rowdot_use.argtypes, lib.rowdot_use.restype = [ctypes.c_char_p], ctypes.c_char_p
    for fn in (lib.panels_f32, lib.panels_bf16):  # (panels.py) w, x, bias (or NULL), y, n, k, rows, activation
        fn.argtypes, fn.restype = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int], None
    lib.panels_dtypes.restype = ctypes.c_int
    lib.panels_row_ahead.argtypes, lib.panels_row_ahead.restype = [ctypes.c_long], ctypes.c_long  # (panel_asks.py)
    lib.panels_block_asks.argtypes, lib.panels_block_asks.restype = [ctypes.c_int], ctypes.c_int  # (panel_asks.py)
    attend = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [
        ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p] + [ctypes.c_long] * 5 + [ctypes.c_float]
    lib.attend_f32.argtypes, lib.attend_bf16.argtypes = attend, attend + [ctypes.c_int]  # (decode_attention.py; bf16: dot)
    lib.attend_f32.restype = lib.attend_bf16.restype = ctypes.c_int
    lib.attend_few_heads.argtypes, lib.attend_few_heads.restype = [ctypes.c_int], ctypes.c_int
    lib.attend_few_runs.argtypes, lib.attend_few_runs.restype = [], ctypes.c_long
    lib.attend_supported.restype = ctypes.c_int
    for fn in (lib.causal_softmax_f32, lib.causal_softmax_bf16):  # (softmax.py) scores, groups, n, h, t1, t0, scale
        fn.argtypes, fn.restype = [ctypes.c_void_p] + [ctypes.c_long] * 5 + [ctypes.c_float], ctypes.c_int
    lib.causal_softmax_supported.restype = ctypes.c_int
    lib.stream_copy.argtypes, lib.stream_copy.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long], None
    lib.stream_copy_supported.restype = ctypes.c_int
    # (shm_comm.py) view, seq, buf, n, bf16, publish, wait_s -> the first rank missing, or -1: done
    lib.shm_all_reduce_small.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
                                         ctypes.c_int, ctypes.c_double]
    lib.shm_all_reduce_small.restype = ctypes.c_long
    # (panels.py) panels as 4-byte words, n, words a row, index, count, first, out
    lib.panels_gather_rows.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                                       ctypes.c_int64, ctypes.c_void_p]
    lib.panels_gather_rows.restype = None
    for fn in (lib.argmax_f32, lib.argmax_bf16):  # (argmax.py) x, row stride, rows, n, values, index
        fn.argtypes, fn.restype = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2, ctypes.c_int
    for fn in (lib.argmax_board_f32, lib.argmax_board_bf16):  # x, row stride, rows, n, rank, ranks, first, board
        fn.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 5 + [ctypes.c_int64, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    # board, ranks, rows, ids
    lib.argmax_board_pick.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    lib.argmax_board_pick.restype = None
    rotary = [ctypes.c_void_p] + [ctypes.c_long] * 7 + [ctypes.c_void_p] * 2  # (rotary.py) x, B, T, H, D, strides,
    lib.rotary_f32.argtypes, lib.rotary_bf16.argtypes = rotary, rotary + [ctypes.c_int]  # cos, sin (bf16: its form)
    lib.rotary_f32.restype = lib.rotary_bf16.restype = None
    taken = lib.rowdot_use(wanted.encode() if wanted else None)  # (None: the widest path this CPU runs)
    if taken is None:
        return None, f"{ENV}={wanted}: this CPU does not run that path"
    return lib, taken.decode()


def unavailable() -> str | None:
    """Why the kernel cannot run here, or None where it can."""
    lib, why = library()
    return None if lib is not None else why


def path() -> str | None:
    """The instruction set the library runs on this CPU (avx512bf16, avx512, avx2, scalar), or None."""
    lib, name = library()
    return name if lib is not None else None


def runs_at_least(name: str) -> bool:
    """Whether the path the library took at load (the widest this CPU runs, or the one ENV names)
    is `name` or wider: attend.c and argmax.c need AVX-512, so that ENV set to a narrower path stands
    in for a narrower CPU for all of them, not for rowdot.c alone (panels.c is told the path itself,
    rowdot_use: its AVX2 kernels where the path is AVX2, or bf16 without AVX512_BF16)."""
    taken = path()
    return taken is not None and PATHS.index(taken) >= PATHS.index(name)


def use_path(name: str) -> bool:
    """Run the path `name` (one of PATHS) from now on in this process, if this CPU runs it
    (whether it does is the return value): for tests of each path. Every path computes the same
    sums, and the library takes the widest at load (rowdot.c)."""
    if name not in PATHS:
        raise ValueError(f"rowdot path {name!r}: expected one of {PATHS}")
    lib, _ = library()
    if lib is None:
        raise RuntimeError(f"rowdot is not built here: {unavailable()}")
    return lib.rowdot_use(name.encode()) is not None


def supports(weight: torch.Tensor) -> bool:
    """Whether this weight can run here: fp32 or bf16 on the CPU, the library built."""
    return weight.device.type == "cpu" and weight.dtype in _DTYPES and unavailable() is None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): by rowdot.c when x holds one row of a weight `supports` takes,
    in its dtype, else F.linear itself."""
    if x.numel() != x.shape[-1] or x.dtype != weight.dtype or not supports(weight):
        return F.linear(x, weight, bias)
    if bias is not None and (bias.dtype != weight.dtype or bias.numel() != weight.shape[0]):
        return F.linear(x, weight, bias)
    lib, _ = library()
    n, k = weight.shape
    weight, row = weight.contiguous(), x.reshape(k).contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(n, dtype=weight.dtype)
    kernel = lib.rowdot_f32 if weight.dtype == torch.float32 else lib.rowdot_bf16
    kernel(weight.data_ptr(), row.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), n, k)
    return out.view(*x.shape[:-1], n)


def stream_copy():
    """stream_copy.c's copy (dst, src, bytes) by non-temporal stores, fenced; None where the library is
    not built or the CPU is not x86-64 (shm_comm.ShmComm.use_stream_copy)."""
    lib, _ = library()
    return lib.stream_copy if lib is not None and lib.stream_copy_supported() else None


def small_all_reduce():
    """shm_reduce.c's all-reduce of a small tensor in one call, or None where the library is not built
    (shm_comm.ShmComm.use_small_reduce)."""
    lib, _ = library()
    return lib.shm_all_reduce_small if lib is not None else None
