"""Panels on AVX2 (panels_avx2.c) against what a CPU without AVX-512 runs otherwise, side by side.

A CPU without AVX-512 has, for a decode batch's products, oneDNN's packed layout and MKL's F.linear
in fp32, and in bf16 only the fp32 path (oneDNN takes bf16 from AVX-512 BW or AVX-NE-CONVERT on)
and aten's GEMM. This times, on one thread, interleaved round by round: the panels kernels AVX2's
and, where this CPU has them, AVX-512's; oneDNN packed for the rows; MKL's F.linear (fp32); the fp32
path (bf16). The libraries are held to AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, set
before torch loads them: the script runs itself again with them), so that on an AVX-512 CPU the
figures stand in for an AVX2 one of its clock and memory; rowdot's path "avx2" runs panels by
AVX2's kernels. Decode row counts read weights from a set of copies larger than the caches, as a
model's step does; 512 rows from one copy. Ratios are AVX2's panels over each other kernel, the
median of the rounds' ratios.

Run: python benchmarks/panels_avx2.py [--rounds 7]   (needs a C compiler; x86 only)
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HELD = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SHAPES = ((2048, 1024), (1024, 2048))  # a bench-size model's MLP at world size 2, both ways
ROWS = (1, 16, 64, 512)
SET_BYTES = 96 << 20  # the copies a decode timing cycles through: past the caches


def timed_ms(call, arg) -> float:
    started = time.perf_counter()
    call(arg)
    return (time.perf_counter() - started) * 1e3


def kernels_of(dtype, n: int, k: int, rows: int):
    """{name: (call, [arguments])}: each kernel and the copies of its weight it cycles through."""
    import torch
    import torch.nn.functional as F

    from starcoder_tp import layouts, linear, panels, rowdot

    weight, x = torch.randn(n, k).to(dtype), torch.randn(rows, k).to(dtype)
    copies = 1 if rows > 64 else max(1, min(32, SET_BYTES // (weight.numel() * weight.element_size())))
    plain = [weight.clone() for _ in range(copies)]
    out = {}
    widest = rowdot.path()
    for path in dict.fromkeys(("avx2", widest)):  # (measure switches the path before the kernel's timings)
        out[f"panels {path}"] = (lambda p: panels.linear(x, p), [panels.pack(c) for c in plain])
    packed = [layouts.pack(c, rows) for c in plain]
    if packed[0] is not None:
        out["oneDNN"] = (lambda p: linear.packed_linear(x, p, None), packed)
    if dtype == torch.float32:
        out["MKL F.linear"] = (lambda c: F.linear(x, c), plain)
    else:
        out["fp32 path"] = (lambda c: linear.fp32_linear(x, c), plain)
        out["aten bf16"] = (lambda c: F.linear(x, c), plain)
    return out


def measure(dtype, n: int, k: int, rows: int, rounds: int) -> dict[str, list[float]]:
    """Per kernel, one timing a round (the median of a pass through its copies), kernels in turn."""
    from starcoder_tp import rowdot

    kernels = kernels_of(dtype, n, k, rows)
    per_round = {name: [] for name in kernels}
    for r in range(rounds + 1):  # (round 0 warms up)
        for name, (call, args) in kernels.items():
            rowdot.use_path(name.removeprefix("panels ") if name.startswith("panels ") else rowdot.path())
            times = [timed_ms(call, a) for a in args * (2 if len(args) == 1 else 1)]
            if r:
                per_round[name].append(statistics.median(times))
    return per_round


def table(rounds: int) -> list[str]:
    import torch

    from starcoder_tp import rowdot

    torch.set_num_threads(1)
    lines = ["| dtype | N x K | rows | " + "kernel ms (median) | " + "AVX2 panels / each (median of the rounds' ratios) |",
             "|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        for rows in ROWS:
            for n, k in SHAPES:
                got = measure(dtype, n, k, rows, rounds)
                ours = got["panels avx2"]
                times = ", ".join(f"{name} {statistics.median(t):.3f}" for name, t in got.items())
                ratios = ", ".join(f"{name} {statistics.median(a / b for a, b in zip(ours, t)):.2f}"
                                   for name, t in got.items() if name != "panels avx2")
                line = f"| {str(dtype).removeprefix('torch.')} | {n}x{k} | {rows} | {times} | {ratios} |"
                print(line, flush=True)
                lines.append(line)
    rowdot.use_path(rowdot.path())
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case. Default: %(default)r")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    if any(os.environ.get(name) != value for name, value in HELD.items()):  # (the libraries read them at load)
        sys.exit(subprocess.run([sys.executable, *sys.argv], env={**os.environ, **HELD}).returncode)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import cpu_name, write_results

    from starcoder_tp import rowdot

    if rowdot.path() is None or not rowdot.use_path("avx2"):
        sys.exit(f"panels_avx2.py: AVX2's kernels do not run here ({rowdot.unavailable() or 'no AVX2'})")
    rowdot.use_path(rowdot.path())
    started = time.time()
    lines = table(args.rounds)
    text = "\n".join([
        "## Panels on AVX2", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/panels_avx2.py` in "
        f"{time.time() - started:.0f} s on {cpu_name()}, one thread, {args.rounds} interleaved rounds; oneDNN and "
        f"MKL held to AVX2 ({', '.join(f'{k}={v}' for k, v in HELD.items())}). Decode rows read their weight "
        f"from copies past the caches; 512 rows from one.", "", *lines, ""])
    if not args.no_write:
        write_results("Panels on AVX2", text)


if __name__ == "__main__":
    main()
