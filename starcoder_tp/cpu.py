"""Facts about the CPU this process runs on that decide which kernels run: its model, its
instruction-set extensions, the cores this process may use."""
from __future__ import annotations

import os
import platform
import re
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


def cpu_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def isa_flags() -> str:
    """The kernel-deciding extensions of this CPU, sorted, space-separated."""
    return " ".join(sorted(f for f in cpuinfo()[1] if ISA_FLAG.match(f)))
