"""The machine's own limits, for the rooflines of speed.py and profile_step.py.

- read bandwidth: a sum over 512 MB, per thread count;
- the matmul peak: the fastest of the kernels the libraries offer here, at MATMUL_SIZE³, per
  dtype and thread count: `F.linear` (MKL sgemm in fp32, aten/oneDNN in bf16), oneDNN with the
  weight packed for those rows, and for bf16 the fp32 path (linear.fp32_linear). A "peak" that
  is one library's speed (the former `F.linear` alone) flatters the runtime where another
  library is twice as fast on the same CPU;
- the theoretical peak of the vector units (cpu.vector_peak: FLOP/cycle/core from the ISA and
  microarchitecture) at the clock the OS reports (cpu.clock_ghz, with its source), or at the
  clock the fastest fp32 kernel proves where that is higher: what the silicon could do, so that
  "% of peak" can also mean "of what this machine can do".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from starcoder_tp.cpu import VectorPeak, clock_ghz, cpu_cores, vector_peak
from starcoder_tp.layouts import pack
from starcoder_tp.linear import fp32_linear, packed_linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MATMUL_SIZE = 2048


def best_s(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` calls after one warm-up, seconds: the least disturbed one."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_kernels(dtype: str, size: int = MATMUL_SIZE) -> dict:
    """The candidate kernels for a [size, size] x [size, size]ᵀ product, as zero-argument calls."""
    x = torch.randn(size, size).to(DTYPES[dtype])
    w = torch.randn(size, size).to(DTYPES[dtype])
    kernels = {"F.linear": lambda: F.linear(x, w)}
    packed = pack(w, size)
    if packed is not None:
        kernels["oneDNN packed"] = lambda: packed_linear(x, packed, None)
    if dtype == "bfloat16":
        kernels["fp32 path"] = lambda: fp32_linear(x, w)
    return kernels


@dataclass
class Limits:
    bandwidth_gbs: dict[int, float] = field(default_factory=dict)  # threads -> read GB/s
    matmul_gflops: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)  # (dtype, threads) -> kernel -> GFLOP/s
    vector: VectorPeak | None = None
    ghz: float | None = None
    ghz_source: str = ""

    def best_kernel(self, dtype: str, threads: int) -> tuple[str, float]:
        """The fastest kernel of `dtype` itself and its GFLOP/s."""
        measured = self.matmul_gflops[(dtype, threads)]
        name = max(measured, key=measured.__getitem__)
        return name, measured[name]

    def peak(self, dtype: str, threads: int) -> float:
        """The matmul peak, GFLOP/s: the best kernel of `dtype`, and for bf16 at least fp32's
        (a bf16 product is exact in fp32, and the fp32 path is one of the runtime's kernels)."""
        best = self.best_kernel(dtype, threads)[1]
        if dtype != "float32" and ("float32", threads) in self.matmul_gflops:
            best = max(best, self.best_kernel("float32", threads)[1])
        return best

    def theoretical(self, dtype: str, threads: int) -> float | None:
        """The vector units' peak at the reported clock, GFLOP/s (None where not known)."""
        if self.vector is None or self.ghz is None:
            return None
        return self.vector.gflops(dtype, self.ghz, threads)

    def describe(self) -> str:
        """One markdown paragraph: bandwidth, each kernel's figure, the theoretical peak and its basis."""
        parts = ["Read bandwidth " + ", ".join(f"{gbs:.1f} GB/s ({t} thread{'s' if t > 1 else ''})"
                                               for t, gbs in sorted(self.bandwidth_gbs.items())) + "."]
        for (dtype, threads), measured in self.matmul_gflops.items():
            best = self.best_kernel(dtype, threads)[0]
            cells = ", ".join(f"{'**' if k == best else ''}{k} {v:.1f}{'**' if k == best else ''}"
                              for k, v in measured.items())
            theory = self.theoretical(dtype, threads)
            share = f"; the best is {self.peak(dtype, threads) / theory:.0%} of the vector peak {theory:.0f}" if theory else ""
            parts.append(f"Matmul {dtype}, {threads} thread{'s' if threads > 1 else ''} ({MATMUL_SIZE}³, GFLOP/s): "
                         f"{cells}{share}.")
        if self.vector is None:
            parts.append("Vector peak: not known for this CPU.")
        else:
            clock = f"{self.ghz:.2f} GHz ({self.ghz_source})" if self.ghz else "no clock exposed"
            parts.append(f"Vector peak per core and cycle: fp32 {self.vector.fp32_flop_per_cycle} FLOP, bf16 "
                         f"{self.vector.bf16_flop_per_cycle} FLOP ({self.vector.basis}); clock {clock}. Turbo can "
                         "run above a VM's reported clock and wide AVX-512/AMX work below it, so the vector peak "
                         "is an estimate, the measured figures are not.")
        return " ".join(parts)


def machine_limits(dtypes: list[str], threads: list[int] | None = None) -> Limits:
    """Bandwidth and every matmul kernel's throughput per dtype (fp32 always: see Limits.peak),
    on one thread and on all this process's cores, and the vector peak."""
    dtypes = list(dict.fromkeys(["float32", *dtypes]))
    threads = threads or sorted({1, cpu_cores()})
    ghz, source = clock_ghz()
    limits = Limits(vector=vector_peak(), ghz=ghz, ghz_source=source)
    saved = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            x = torch.ones(128 << 20)  # 512 MB
            limits.bandwidth_gbs[count] = x.numel() * 4 / best_s(lambda: x.sum()) / 1e9
            del x
            for dtype in dtypes:
                kernels = matmul_kernels(dtype)
                limits.matmul_gflops[(dtype, count)] = {name: 2 * MATMUL_SIZE ** 3 / best_s(call, 3) / 1e9
                                                        for name, call in kernels.items()}
    finally:
        torch.set_num_threads(saved)
    if limits.vector is not None:
        # A kernel faster than the vector peak at the reported clock proves the clock higher (a
        # VM's 'cpu MHz' is the nominal one, turbo runs above it): figure the peak at least there.
        implied = max(limits.best_kernel("float32", t)[1] / (limits.vector.fp32_flop_per_cycle * t) for t in threads)
        if limits.ghz is None or implied > limits.ghz:
            limits.ghz_source = (f"at least: implied by the fastest fp32 kernel, above {limits.ghz_source} "
                                 f"{limits.ghz:.2f} GHz" if limits.ghz else "implied by the fastest fp32 kernel")
            limits.ghz = implied
    return limits


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="Default: %(default)r")
    print(machine_limits(parser.parse_args().dtypes.split(",")).describe())
