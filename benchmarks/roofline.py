"""The machine's own limits, for the rooflines of speed.py and profile_step.py.

- read bandwidth: per thread count, one stream per core at once (torch.sum on one thread over
  its own buffer, in 2 MiB pages where the system has them), as the ranks read their weights;
  the best of the samples taken through a run (Limits.sample): on the 2-vCPU EPYC
  Zen 5 VM two cores read 50 GB/s one minute and 81 the next, and a bound taken at one moment
  was beaten by 21% at another (RESULTS.md, "A bandwidth bound the ranks beat");
- the matmul peak: the fastest of the kernels the libraries offer here, at MATMUL_SIZE³, per
  dtype and thread count: `F.linear` (MKL sgemm in fp32, aten/oneDNN in bf16), oneDNN with the
  weight packed for those rows, and for bf16 the fp32 path (linear.fp32_linear). A "peak" that
  is one library's speed (the former `F.linear` alone) flatters the runtime where another
  library is twice as fast on the same CPU; sampled through a run like the bandwidth (two
  threads' oneDNN GEMM read 382 GFLOP/s in one sample and 493-506 in others, and the ranks'
  prefill beat the low one);
- the theoretical peak of the vector units (cpu.vector_peak: FLOP/cycle/core from the ISA and
  microarchitecture) at the clock the OS reports (cpu.clock_ghz, with its source), or at the
  clock the fastest fp32 kernel proves where that is higher: what the silicon could do, so that
  "% of peak" can also mean "of what this machine can do".
"""
from __future__ import annotations

import mmap
import os
import threading
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


def _stream_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of ones in memory of their own, advised as huge pages as the ranks' weights are
    (malloc.enable_huge_pages); the advice does nothing where the system has none."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(region, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.frombuffer(region, dtype=torch.float32)
    buffer.fill_(1.0)
    return buffer


def read_bandwidth_gbs(streams: int, total_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """GB/s read by `streams` threads at once, each pinned to a core of its own and summing a
    buffer of its own on one torch thread; the best of `repeats` rounds after a warm-up, each
    round timed from the common start to the last stream's end."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if streams > max(len(cores), 1):
        raise ValueError(f"{streams} read streams but this process may run on {len(cores)} core(s)")
    size = max(total_bytes // streams, 64 << 20) // 4 * 4
    buffers = [_stream_buffer(size) for _ in range(streams)]
    start = threading.Barrier(streams)
    spans = [[(0.0, 0.0)] * streams for _ in range(repeats + 1)]  # round -> stream -> (began, ended)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    errors: list[BaseException] = []

    def stream(index: int) -> None:
        # Each stream reads its own clock: a thread that timed the others would share a core
        # with one of them and read its clock late.
        try:
            if cores:
                os.sched_setaffinity(0, {cores[index]})  # this thread only
            for round_ in spans:
                start.wait(timeout=60)
                began = time.perf_counter()
                buffers[index].sum()
                round_[index] = (began, time.perf_counter())
        except BaseException as error:  # raised by the caller
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        torch.set_num_threads(saved)
    if errors:
        raise errors[0]
    rounds = [max(end for _, end in round_) - min(began for began, _ in round_) for round_ in spans[1:]]
    return size * streams / min(rounds) / 1e9


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


def measure_matmuls(dtype: str) -> dict[str, float]:
    """Each kernel of matmul_kernels at MATMUL_SIZE³ on torch's current threads, GFLOP/s (best of 3)."""
    return {name: 2 * MATMUL_SIZE ** 3 / best_s(call, 3) / 1e9 for name, call in matmul_kernels(dtype).items()}


@dataclass
class Limits:
    bandwidth_samples: dict[int, list[float]] = field(default_factory=dict)  # threads -> read GB/s, each sample
    # (dtype, threads) -> kernel -> GFLOP/s, each sample
    matmul_samples: dict[tuple[str, int], dict[str, list[float]]] = field(default_factory=dict)
    vector: VectorPeak | None = None
    ghz: float | None = None  # as the system reports it
    ghz_source: str = ""

    @property
    def bandwidth_gbs(self) -> dict[int, float]:
        """threads -> the best read GB/s sampled: what the machine showed it can do."""
        return {threads: max(samples) for threads, samples in self.bandwidth_samples.items()}

    @property
    def matmul_gflops(self) -> dict[tuple[str, int], dict[str, float]]:
        """(dtype, threads) -> kernel -> its best GFLOP/s sampled."""
        return {at: {kernel: max(samples) for kernel, samples in kernels.items()}
                for at, kernels in self.matmul_samples.items()}

    def sample(self) -> None:
        """Measure the read bandwidth and the matmul kernels again, at every thread count and
        dtype measured so far: what two cores of the EPYC Zen 5 VM gave moved by up to 60% from
        one minute to the next, and a bound taken once was beaten later in the run."""
        saved = torch.get_num_threads()
        try:
            for threads in self.bandwidth_samples:
                self.bandwidth_samples[threads].append(read_bandwidth_gbs(threads))
            for (dtype, threads), kernels in self.matmul_samples.items():
                torch.set_num_threads(threads)
                for name, gflops in measure_matmuls(dtype).items():
                    kernels[name].append(gflops)
        finally:
            torch.set_num_threads(saved)

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
        """The vector units' peak at `clock()`, GFLOP/s (None where not known)."""
        ghz, _ = self.clock()
        if self.vector is None or ghz is None:
            return None
        return self.vector.gflops(dtype, ghz, threads)

    def clock(self) -> tuple[float | None, str]:
        """The clock the vector peak is figured at, and where it comes from: the reported one, or
        higher where a measured kernel proves it (a VM's 'cpu MHz' is the nominal clock, turbo runs
        above it): each dtype's fastest kernel over its FLOP per cycle, the highest of them."""
        if self.vector is None or not self.matmul_samples:
            return self.ghz, self.ghz_source
        per_cycle = {"float32": self.vector.fp32_flop_per_cycle, "bfloat16": self.vector.bf16_flop_per_cycle}
        implied, dtype = max((self.best_kernel(d, t)[1] / (per_cycle[d] * t), d)
                             for d, t in self.matmul_samples if d in per_cycle)
        if self.ghz is not None and implied <= self.ghz:
            return self.ghz, self.ghz_source
        source = f"implied by the fastest {'fp32' if dtype == 'float32' else 'bf16'} kernel"
        return implied, (f"at least: {source}, above {self.ghz_source} {self.ghz:.2f} GHz" if self.ghz else source)

    def describe(self) -> str:
        """One markdown paragraph: bandwidth, each kernel's figure, the theoretical peak and its basis."""
        def bandwidth(threads: int, samples: list[float]) -> str:
            spread = f", the best of {len(samples)} samples through the run, the least {min(samples):.1f}" \
                if len(samples) > 1 else ""
            return f"{max(samples):.1f} GB/s ({threads} stream{'s' if threads > 1 else ''}{spread})"

        parts = ["Read bandwidth " + ", ".join(bandwidth(t, samples) for t, samples in sorted(self.bandwidth_samples.items()))
                 + "."]
        samples = max((len(v) for kernels in self.matmul_samples.values() for v in kernels.values()), default=1)
        if samples > 1:
            parts.append(f"Matmul figures: the best of {samples} samples through the run.")
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
            ghz, source = self.clock()
            clock = f"{ghz:.2f} GHz ({source})" if ghz else "no clock exposed"
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
            limits.bandwidth_samples[count] = [read_bandwidth_gbs(count)]
            torch.set_num_threads(count)
            for dtype in dtypes:
                limits.matmul_samples[(dtype, count)] = {name: [gflops] for name, gflops in measure_matmuls(dtype).items()}
    finally:
        torch.set_num_threads(saved)
    return limits


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="Default: %(default)r")
    print(machine_limits(parser.parse_args().dtypes.split(",")).describe())
