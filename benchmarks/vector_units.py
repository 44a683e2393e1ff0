"""What one core's vector units do per cycle, measured, against what `cpu.vector_peak` says of them:
the theoretical peak the rooflines give next to the measured matmul peak rests on that table.

Independent chains of register-only instructions (12 accumulators, enough to cover the latency
of two pipes), timed on one core: fp32 FMA at 256 bits (AVX2) and 512 bits (AVX-512F), and the
bf16 dot product (AVX512_BF16, 2 products per fp32 lane) where the CPU has them. The clock is
not known in a VM, so the figure that settles the table is the ratio of FLOP/s between two
instructions run back to back on one core: bf16 dot products against 512-bit FMAs, and 512-bit
FMAs against 256-bit ones (1.0 where AVX-512 runs in 256-bit halves, as on Zen 4).

Run: python benchmarks/vector_units.py [--rounds 5]   (needs gcc; x86 only)
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import cpu_name, write_results  # noqa: E402

from starcoder_tp.cpu import clock_ghz, cpuinfo, vector_peak  # noqa: E402

CHAINS = 12  # independent accumulators a loop: enough to cover two pipes' latency
SOURCE = r"""
#include <immintrin.h>
#define LOOP(T, INIT, STEP)                                                                        \
    T a[CHAINS];                                                                                   \
    for (int i = 0; i < CHAINS; i++) a[i] = INIT(i);                                               \
    for (long k = 0; k < iters; k++)                                                               \
        for (int i = 0; i < CHAINS; i++) a[i] = STEP(a[i]);                                        \
    float s = 0; float lanes[16];                                                                  \
    for (int i = 0; i < CHAINS; i++) { _mm_storeu_ps(lanes, *(__m128 *)&a[i]); s += lanes[0]; }   \
    return s;

__attribute__((target("avx2,fma"))) static __m256 i256(int i) { return _mm256_set1_ps((float)i); }
__attribute__((target("avx2,fma"))) static __m256 s256(__m256 a) {
    return _mm256_fmadd_ps(a, _mm256_set1_ps(1.0000001f), _mm256_set1_ps(1e-9f)); }
__attribute__((target("avx2,fma"))) float fma256(long iters) { LOOP(__m256, i256, s256) }

__attribute__((target("avx512f"))) static __m512 i512(int i) { return _mm512_set1_ps((float)i); }
__attribute__((target("avx512f"))) static __m512 s512(__m512 a) {
    return _mm512_fmadd_ps(a, _mm512_set1_ps(1.0000001f), _mm512_set1_ps(1e-9f)); }
__attribute__((target("avx512f"))) float fma512(long iters) { LOOP(__m512, i512, s512) }

__attribute__((target("avx512f,avx512bf16"))) static __m512 sdp(__m512 a) {
    __m512bh one = (__m512bh)_mm512_set1_epi16(0x3f80);
    return _mm512_dpbf16_ps(a, one, one); }
__attribute__((target("avx512f,avx512bf16"))) float dpbf16(long iters) { LOOP(__m512, i512, sdp) }
"""
# FLOP per instruction: lanes x 2 (multiply, add); the dot product's lane sums 2 products into fp32.
KERNELS = {"fp32 FMA, 256-bit": ("fma256", 16, {"avx2", "fma"}),
           "fp32 FMA, 512-bit": ("fma512", 32, {"avx512f"}),
           "bf16 dot product, 512-bit": ("dpbf16", 64, {"avx512f", "avx512_bf16"})}


def build(folder: Path) -> ctypes.CDLL:
    source, library = folder / "units.c", folder / "units.so"
    source.write_text(f"#define CHAINS {CHAINS}\n{SOURCE}")
    # -funroll-all-loops: the chains must stay in registers, not in the array on the stack (checked
    # with gcc 12: twelve FMAs or dot products on twelve registers a trip; another compiler may differ).
    try:
        subprocess.run(["gcc", "-O3", "-funroll-all-loops", "-shared", "-fPIC", "-o", str(library), str(source)],
                       check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit("vector_units.py needs gcc on the PATH") from None
    except subprocess.CalledProcessError as error:  # (gcc before 10 knows no avx512bf16)
        raise SystemExit(f"gcc failed on the loops:\n{error.stderr.strip()[-2000:]}") from None
    lib = ctypes.CDLL(str(library))
    for name, *_ in KERNELS.values():
        getattr(lib, name).argtypes, getattr(lib, name).restype = [ctypes.c_long], ctypes.c_float
    return lib


def gflops(fn, flop_per_instruction: int, iters: int) -> float:
    started = time.perf_counter()
    fn(iters)
    return iters * CHAINS * flop_per_instruction / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="Default: %(default)r")
    parser.add_argument("--iters", type=int, default=30_000_000, help="loop trips per timing. Default: %(default)r")
    args = parser.parse_args()
    flags = cpuinfo()[1]
    runnable = {label: k for label, k in KERNELS.items() if k[2] <= flags}
    if not runnable:
        raise SystemExit(f"none of {list(KERNELS)} runs on this CPU (flags: no avx2/fma)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        lib = build(Path(folder))
        samples: dict[str, list[float]] = {label: [] for label in runnable}
        for _ in range(args.rounds):  # kernels alternated, so that a noisy moment hits all of them
            for label, (name, flop, _) in runnable.items():
                samples[label].append(gflops(getattr(lib, name), flop, args.iters))
    best = {label: max(v) for label, v in samples.items()}
    peak, (ghz, source) = vector_peak(), clock_ghz()
    lines = [f"| {label} | {best[label]:.1f} | {statistics.median(samples[label]):.1f} |" for label in runnable]
    ratios = []
    if {"fp32 FMA, 512-bit", "fp32 FMA, 256-bit"} <= set(best):
        ratios.append(f"512-bit / 256-bit FMA: **{best['fp32 FMA, 512-bit'] / best['fp32 FMA, 256-bit']:.2f}**")
    if {"bf16 dot product, 512-bit", "fp32 FMA, 512-bit"} <= set(best):
        ratios.append(f"bf16 dot / 512-bit FMA: **{best['bf16 dot product, 512-bit'] / best['fp32 FMA, 512-bit']:.2f}**")
    fastest_fp32 = max(v for k, v in best.items() if k.startswith("fp32"))
    if peak is None:
        claim = "cpu.vector_peak: not known for this CPU."
    else:
        implied = fastest_fp32 / peak.fp32_flop_per_cycle
        claim = (f"cpu.vector_peak says fp32 {peak.fp32_flop_per_cycle} and bf16 {peak.bf16_flop_per_cycle} FLOP per "
                 f"cycle ({peak.basis}): a ratio of {peak.bf16_flop_per_cycle / peak.fp32_flop_per_cycle:.1f}. "
                 f"The fastest fp32 loop implies a clock of {implied:.2f} GHz at that table "
                 f"(reported: {f'{ghz:.2f} GHz, {source}' if ghz else source}).")
    text = "\n".join([
        "## The vector units, measured", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/vector_units.py` in "
        f"{time.perf_counter() - started:.0f} s. Machine: {cpu_name()}; one core, {CHAINS} independent chains per "
        f"loop, {args.rounds} rounds alternating.", "",
        "| instruction | GFLOP/s, best | median |", "|---|---|---|", *lines, "",
        "Ratios of the best: " + "; ".join(ratios) + ". " + claim])
    write_results("The vector units, measured", text)
    print(text)


if __name__ == "__main__":
    main()
