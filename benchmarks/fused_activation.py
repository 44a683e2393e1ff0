"""The MLP's activation fused into its first GEMM (oneDNN post-op on a packed weight) against the
GEMM then `F.gelu`, at the bench-size model's c_fc shape ([rows, 1024] x [4096, 1024]ᵀ + bias),
one thread, per dtype and row count; best of 5 calls each, side by side in one sitting, with the
largest difference of each from an fp32 reference.

Run: python benchmarks/fused_activation.py [--rows 16,128,2048]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import best_s  # noqa: E402
from speed import write_table  # noqa: E402

from starcoder_tp.layouts import pack  # noqa: E402
from starcoder_tp.linear import packed_linear  # noqa: E402


def row(dtype: torch.dtype, rows: int) -> str:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1024, generator=gen).to(dtype)
    w = (torch.randn(4096, 1024, generator=gen) / 32).to(dtype)
    b = torch.randn(4096, generator=gen).to(dtype)
    packed = pack(w, rows)
    if packed is None:
        return f"| {str(dtype)[6:]} | {rows} | oneDNN cannot pack this dtype here | | | | |"
    gemm = lambda: packed_linear(x, packed, b)  # noqa: E731
    h = gemm()
    separate = lambda: F.gelu(packed_linear(x, packed, b), approximate="tanh")  # noqa: E731
    fused = lambda: packed_linear(x, packed, b, "gelu", "tanh")  # noqa: E731
    ms = {name: best_s(fn) * 1e3 for name, fn in (("gemm", gemm), ("gelu", lambda: F.gelu(h, approximate="tanh")),
                                                  ("separate", separate), ("fused", fused))}
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    err = {name: (fn().float() - ref).abs().max().item() for name, fn in (("separate", separate), ("fused", fused))}
    return (f"| {str(dtype)[6:]} | {rows} | {ms['gemm']:.2f} | {ms['gelu']:.2f} | {ms['separate']:.2f} | "
            f"{ms['fused']:.2f} | {ms['fused'] / ms['separate']:.2f} | {err['separate']:.2g} / {err['fused']:.2g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16,128,2048", help="Default: %(default)r")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    lines = [row(dtype, int(rows)) for dtype in (torch.float32, torch.bfloat16) for rows in args.rows.split(",")]
    write_table("Fused activation", "fused_activation.py", started,
                "c_fc of the bench-size model, weight packed for the rows; ms, best of 5. `separate` = the GEMM, then "
                "`F.gelu(tanh)`; `fused` = gelu as oneDNN's post-op; error = the largest difference from fp32 "
                "arithmetic (separate / fused).",
                ["dtype", "rows", "GEMM", "gelu alone", "separate", "fused", "fused/separate", "error"], lines)


if __name__ == "__main__":
    main()
