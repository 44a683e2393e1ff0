"""What a latency figure depends on besides the code: the machine fingerprint stored with every
result row, so that a stored baseline is never read against another machine by accident."""
from __future__ import annotations

import torch

from ..cpu import cpu_cores, cpu_model, isa_flags
from ..device import Device

FINGERPRINT_COLUMNS = ("cpu_model", "cpu_isa", "cores", "torch_version", "threads_per_rank", "accelerator")


def accelerator_name(device: Device) -> str:
    """The accelerator's model ('' on CPU); not imported or initialised unless the run uses one."""
    if device.kind == "cpu":
        return ""
    if device.kind == "npu":
        from ..device import import_torch_npu

        import_torch_npu()
    module = getattr(torch, device.kind)
    try:
        return f"{module.get_device_name(device.device_id)} x{module.device_count()}"
    except (RuntimeError, AssertionError, AttributeError):
        return f"{device.kind} (unnamed)"


def machine_fingerprint(device: Device, threads_per_rank: int) -> dict[str, str]:
    """The fields of FINGERPRINT_COLUMNS, as strings (they go into the CSV as they are)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_isa": isa_flags(),
        "cores": str(cpu_cores()),
        "torch_version": torch.__version__,
        "threads_per_rank": str(threads_per_rank),
        "accelerator": accelerator_name(device),
    }


def fingerprint_differences(theirs: dict[str, str], ours: dict[str, str]) -> list[str]:
    """What differs between two fingerprints, in words ([] when they are the same machine kind)."""
    differences = []
    for column in FINGERPRINT_COLUMNS:
        a, b = str(theirs.get(column, "")), str(ours.get(column, ""))
        if a == b:
            continue
        if column == "cpu_isa":
            only_theirs, only_ours = sorted(set(a.split()) - set(b.split())), sorted(set(b.split()) - set(a.split()))
            parts = ([f"only the baseline's has {' '.join(only_theirs)}"] if only_theirs else []) + \
                    ([f"only this machine has {' '.join(only_ours)}"] if only_ours else [])
            differences.append("CPU instruction sets differ: " + "; ".join(parts))
        elif column == "cpu_model" and " (family " not in a and b.startswith(a + " (family "):
            # A baseline saved before fingerprints named the family and model: perhaps this very
            # kind, perhaps another that the VM names alike; it cannot tell, so it is refused.
            differences.append(f"cpu_model {a!r} (baseline, saved before fingerprints named the CPU's family "
                               f"and model: save a new baseline on this machine) vs {b!r} (this run)")
        else:
            differences.append(f"{column} {a!r} (baseline) vs {b!r} (this run)")
    return differences


def describe(fingerprint: dict[str, str]) -> str:
    """One line for a report: CPU, cores, torch, threads per rank, accelerator."""
    text = (f"{fingerprint.get('cpu_model') or 'unknown CPU'}, {fingerprint.get('cores')} cores, torch "
            f"{fingerprint.get('torch_version')}, {fingerprint.get('threads_per_rank')} thread(s) per rank")
    return text + (f", {fingerprint['accelerator']}" if fingerprint.get("accelerator") else "")
