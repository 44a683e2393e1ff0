"""Facts about the CPU this process runs on: its model, its instruction-set extensions (which
decide the kernels), the cores this process may use, and what its vector units can do at most
(the rooflines' theoretical peak)."""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

# The instruction-set extensions that decide which kernels run (oneDNN, inductor, our own
# measured choices in kernels.py). Other /proc/cpuinfo flags (mitigations, virtualisation) differ between
# hosts of one CPU kind without changing a kernel, and would refuse baselines for nothing.
ISA_FLAG = re.compile(r"^(sse\d.*|ssse3|avx.*|amx.*|fma|f16c|bmi\d|sve.*|asimd.*|neon|sme.*|bf16|i8mm)$")


def cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """The CPU's model name and its flags (x86 'flags', Arm 'Features'), from /proc/cpuinfo."""
    model, flags = "", set()
    try:
        text = path.read_text()
    except OSError:
        return platform.processor() or platform.machine(), flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


# AMD's microarchitectures by family and model ranges, as Linux's arch/x86/kernel/cpu/amd.c names
# them; a model outside these has no name here. A VM's model name ("AMD EPYC") and the extension
# flags the kernels see can be the same on hosts whose vector units differ (Zen 4 runs AVX-512 in
# 256-bit halves, Zen 5 at full width).
AMD_CORES = ((0x17, ((0x00, 0x2F), (0x50, 0x5F)), "Zen 1"),
             (0x17, ((0x30, 0x4F), (0x60, 0x7F), (0x90, 0x91), (0xA0, 0xAF)), "Zen 2"),
             (0x19, ((0x00, 0x0F), (0x20, 0x5F)), "Zen 3"),
             (0x19, ((0x10, 0x1F), (0x60, 0xAF)), "Zen 4"),
             (0x1A, ((0x00, 0x2F), (0x40, 0x4F), (0x60, 0x7F)), "Zen 5"))


def amd_core(family: int, model: int) -> str | None:
    """AMD's name for the microarchitecture of this family and model ("Zen 4"), or None."""
    return next((name for f, ranges, name in AMD_CORES
                 if f == family and any(low <= model <= high for low, high in ranges)), None)


def _family_model(cpuinfo_path: Path) -> tuple[str, int, int] | None:
    fields = _first_fields(cpuinfo_path)
    try:
        return fields.get("vendor_id", ""), int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return None


def cpu_model(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and, on x86, its family and model numbers: what tells one kind of CPU
    from another where the name alone does not (a VM's "AMD EPYC" on a Zen 4 host and on a Zen 5
    one). Machine fingerprints and kernel plans are keyed by it (by the numbers, not by a name
    for them that a later table could change)."""
    return _named(cpuinfo_path, with_core=False)


def cpu_kind(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> str:
    """cpu_model with AMD's name for the microarchitecture where it is known, for people to read."""
    return _named(cpuinfo_path, with_core=True)


def _named(cpuinfo_path: Path, with_core: bool) -> str:
    name, _ = cpuinfo(cpuinfo_path)
    found = _family_model(cpuinfo_path)
    if found is None:
        return name
    vendor, family, model = found
    core = amd_core(family, model) if with_core and vendor == "AuthenticAMD" else None
    return f"{name} (family {family} model {model}{': ' + core if core else ''})"


def cpu_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def isa_flags() -> str:
    """The kernel-deciding extensions of this CPU, sorted, space-separated."""
    return " ".join(sorted(f for f in cpuinfo()[1] if ISA_FLAG.match(f)))


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of the first CPU's last-level cache (its highest-level data or unified cache), as
    the system reports it (a VM reports what its host chose to), or None where it reports none."""
    best: tuple[int, int] | None = None
    for index in sorted(cache_dir.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", size)
        if kind == "Instruction" or match is None:
            continue
        size_bytes = int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]
        if best is None or level > best[0]:
            best = (level, size_bytes)
    return best[1] if best else None


def _first_fields(path: Path) -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo, keys lower-cased."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip() and fields:
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def clock_ghz(cpuinfo_path: Path = Path("/proc/cpuinfo"),
              cpufreq: Path = Path("/sys/devices/system/cpu/cpu0/cpufreq")) -> tuple[float | None, str]:
    """The core clock the vector peak is figured at, and where it came from: cpufreq's maximum
    (turbo) when the kernel exposes it, else /proc/cpuinfo's 'cpu MHz' (in a VM usually the
    host's nominal clock: turbo may run above it, wide AVX-512 work below it)."""
    try:
        return int((cpufreq / "cpuinfo_max_freq").read_text()) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        return float(_first_fields(cpuinfo_path)["cpu mhz"]) / 1e3, "/proc/cpuinfo 'cpu MHz'"
    except (KeyError, ValueError):
        return None, "no clock exposed"


@dataclass(frozen=True)
class VectorPeak:
    """What the CPU's vector units can do per core and cycle, from its instruction set and
    microarchitecture: FMA units x lanes x 2 (bf16: dot-product instructions, 2 products per
    fp32 lane, so 2x fp32; AMX: one 16x32 by 32x16 tile product per 16 cycles)."""

    fp32_flop_per_cycle: int
    bf16_flop_per_cycle: int
    basis: str

    def gflops(self, dtype: str, ghz: float, cores: int) -> float:
        per_cycle = self.bf16_flop_per_cycle if dtype == "bfloat16" else self.fp32_flop_per_cycle
        return per_cycle * ghz * cores


def vector_peak(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> VectorPeak | None:
    """The theoretical FLOP/cycle/core of this x86 CPU, or None where it is not known (other
    architectures, x86 without FMA). bf16 without bf16 instructions computes in fp32 (linear.py),
    so its peak is fp32's."""
    fields = _first_fields(cpuinfo_path)
    flags = set(fields.get("flags", "").split())
    vendor = fields.get("vendor_id", "")
    try:
        family, model = int(fields.get("cpu family", "0")), int(fields.get("model", "0"))
    except ValueError:
        family, model = 0, 0
    if "fma" not in flags:
        return None
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family < 0x1A:
            # Zen 4 runs 512-bit instructions on its two 256-bit FMA pipes, in halves.
            fp32, basis = 32, "Zen 4: AVX-512 on 2 x 256-bit FMA pipes"
        elif vendor == "AuthenticAMD":
            fp32, basis = 64, "Zen 5: 2 x 512-bit FMA pipes (Zen 5c and mobile parts: 256-bit, half)"
        else:
            fp32, basis = 64, "Intel AVX-512: 2 x 512-bit FMA units (parts with one unit: half)"
    elif "avx2" in flags and vendor == "AuthenticAMD" and amd_core(family, model) == "Zen 1":
        fp32, basis = 16, "Zen 1: AVX2 on 2 x 128-bit FMA pipes"
    elif "avx2" in flags:
        fp32, basis = 32, "AVX2: 2 x 256-bit FMA units"
    else:
        return None
    if "amx_bf16" in flags:
        bf16, basis = 1024, basis + "; bf16 on AMX tiles, 1024 FLOP/cycle"
    elif "avx512_bf16" in flags:
        # A dot product's lane: 2 bf16 products summed into fp32, 4 FLOP where an FMA's is 2, at
        # the FMA's rate: 2.0x fp32's FLOP/cycle on Zen 4 (benchmarks/vector_units.py), and oneDNN's bf16
        # GEMM ran at 2.1x its fp32 one on Zen 5 (RESULTS.md).
        bf16, basis = 2 * fp32, basis + f"; bf16 dot products, {2 * fp32} FLOP/cycle"
    else:
        bf16, basis = fp32, basis + "; no bf16 arithmetic: bf16 at fp32's rate"
    return VectorPeak(fp32, bf16, basis)
