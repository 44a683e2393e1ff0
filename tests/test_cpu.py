"""CPU facts: the vector units' theoretical peak from /proc/cpuinfo, and the clock it is figured at."""
from pathlib import Path

import pytest

from starcoder_tp.cpu import VectorPeak, clock_ghz, cpu_kind, cpu_model, last_level_cache_bytes, vector_peak


def _cpuinfo(tmp_path: Path, vendor: str, family: int, flags: str, mhz: str | None = "2600.000",
             model: int = 0x31) -> Path:
    lines = ["processor\t: 0", f"vendor_id\t: {vendor}", f"cpu family\t: {family}", f"model\t\t: {model}",
             "model name\t: Some CPU"]
    if mhz is not None:
        lines.append(f"cpu MHz\t\t: {mhz}")
    lines.append(f"flags\t\t: {flags}")
    # A second processor with other values: only the first one's are read.
    lines += ["", "processor\t: 1", "cpu MHz\t\t: 1.000", "flags\t\t: sse2"]
    path = tmp_path / "cpuinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("vendor, family, flags, fp32, bf16, model", [
    ("AuthenticAMD", 0x17, "sse2 avx avx2 fma", 32, 32, 0x31),  # Zen 2: AVX2, no bf16 arithmetic
    # bf16 dot products: 2 products a lane at the FMA's rate, twice fp32's FLOP (measured on Zen 4)
    ("AuthenticAMD", 0x19, "avx2 fma avx512f avx512_bf16", 32, 64, 0x11),  # Zen 4: AVX-512 in 256-bit halves
    ("AuthenticAMD", 0x1A, "avx2 fma avx512f avx512_bf16", 64, 128, 0x02),  # Zen 5
    ("GenuineIntel", 6, "avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", 64, 1024, 143),  # AMX
    ("GenuineIntel", 6, "avx2 fma avx512f", 64, 64, 85),
])
def test_vector_peak_per_core_and_cycle(tmp_path, vendor, family, flags, fp32, bf16, model):
    peak = vector_peak(_cpuinfo(tmp_path, vendor, family, flags, model=model))
    assert (peak.fp32_flop_per_cycle, peak.bf16_flop_per_cycle) == (fp32, bf16), peak.basis
    assert peak.gflops("float32", 2.5, 2) == fp32 * 5
    assert peak.gflops("bfloat16", 2.5, 1) == bf16 * 2.5


def test_zen1_runs_avx2_in_halves(tmp_path):
    assert vector_peak(_cpuinfo(tmp_path, "AuthenticAMD", 0x17, "avx2 fma", model=0x01)).fp32_flop_per_cycle == 16
    # Zen 1 by amd_core's ranges (0x50-0x5F too), Zen 2 at full AVX2 width
    assert vector_peak(_cpuinfo(tmp_path, "AuthenticAMD", 0x17, "avx2 fma", model=0x55)).fp32_flop_per_cycle == 16
    assert vector_peak(_cpuinfo(tmp_path, "AuthenticAMD", 0x17, "avx2 fma", model=0x31)).fp32_flop_per_cycle == 32


@pytest.mark.parametrize("flags", ["sse2 avx", "neon asimd", ""])
def test_vector_peak_is_unknown_without_fma(tmp_path, flags):
    assert vector_peak(_cpuinfo(tmp_path, "GenuineIntel", 6, flags)) is None


def test_clock_prefers_cpufreq_then_cpuinfo(tmp_path):
    info = _cpuinfo(tmp_path, "GenuineIntel", 6, "fma avx2")
    freq = tmp_path / "cpufreq"
    freq.mkdir()
    assert clock_ghz(info, freq) == (2.6, "/proc/cpuinfo 'cpu MHz'")
    (freq / "cpuinfo_max_freq").write_text("3700000\n")  # kHz
    assert clock_ghz(info, freq) == (3.7, "cpufreq cpuinfo_max_freq")
    assert clock_ghz(_cpuinfo(tmp_path, "GenuineIntel", 6, "fma", mhz=None), tmp_path / "none") == (None, "no clock exposed")


def test_vector_peak_is_a_frozen_fact():
    with pytest.raises(AttributeError):
        VectorPeak(32, 32, "x").fp32_flop_per_cycle = 64


def test_the_last_level_cache_is_the_highest_level_data_or_unified_one(tmp_path):
    caches = [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"), (3, "Unified", "32768K")]
    for i, (level, kind, size) in enumerate(caches):
        index = tmp_path / f"index{i}"
        index.mkdir()
        (index / "level").write_text(f"{level}\n")
        (index / "type").write_text(f"{kind}\n")
        (index / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32 << 20
    (tmp_path / "index3" / "size").write_text("oops\n")  # unreadable: the next level down
    assert last_level_cache_bytes(tmp_path) == 1 << 20
    assert last_level_cache_bytes(tmp_path / "absent") is None


@pytest.mark.parametrize("vendor, family, model, kind", [
    ("AuthenticAMD", 25, 17, "Zen 4"),  # Genoa (this project's Zen 4 VM)
    ("AuthenticAMD", 26, 2, "Zen 5"),  # Turin (its Zen 5 VM)
    ("AuthenticAMD", 25, 1, "Zen 3"),  # Milan
    ("AuthenticAMD", 23, 49, "Zen 2"),  # Rome
    # the ranges' edges, as Linux's amd.c draws them
    ("AuthenticAMD", 0x19, 0x0F, "Zen 3"), ("AuthenticAMD", 0x19, 0x10, "Zen 4"), ("AuthenticAMD", 0x19, 0x1F, "Zen 4"),
    ("AuthenticAMD", 0x19, 0x20, "Zen 3"), ("AuthenticAMD", 0x19, 0x5F, "Zen 3"), ("AuthenticAMD", 0x19, 0x60, "Zen 4"),
    ("AuthenticAMD", 0x19, 0x90, "Zen 4"), ("AuthenticAMD", 0x19, 0xAF, "Zen 4"), ("AuthenticAMD", 0x19, 0xB0, None),
    ("AuthenticAMD", 0x17, 0x2F, "Zen 1"), ("AuthenticAMD", 0x17, 0x30, "Zen 2"), ("AuthenticAMD", 0x17, 0x50, "Zen 1"),
    ("AuthenticAMD", 0x1A, 0x50, None),  # not Zen 5: no name rather than a wrong one
    ("GenuineIntel", 6, 143, None),  # Sapphire Rapids: no name of ours
])
def test_cpu_kinds_a_vm_names_alike_are_told_apart(tmp_path, vendor, family, model, kind):
    # A VM calls Zen 4 and Zen 5 hosts alike "AMD EPYC": plans and baselines must not be shared.
    path = _cpuinfo(tmp_path, vendor, family, "avx2 fma", model=model)
    assert cpu_model(path) == f"Some CPU (family {family} model {model})", "the key: numbers, not names"
    assert cpu_kind(path) == (f"Some CPU (family {family} model {model}: {kind})" if kind else cpu_model(path))


def test_cpu_model_without_family_is_the_name_alone(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some Arm CPU\nFeatures\t: neon asimd\n")
    assert cpu_model(path) == cpu_kind(path) == "Some Arm CPU"


def test_a_results_fingerprint_and_a_kernel_plan_are_keyed_by_the_cpu_model(monkeypatch):
    from starcoder_tp import kernels
    from starcoder_tp.device import Device
    from starcoder_tp.suite import machine

    monkeypatch.setattr(machine, "cpu_model", lambda: "Some CPU (family 25 model 17)")
    monkeypatch.setattr(kernels, "cpu_model", lambda: "Some CPU (family 25 model 17)")
    assert machine.machine_fingerprint(Device("cpu"), 1)["cpu_model"] == "Some CPU (family 25 model 17)"
    assert kernels.plan_key({}, 1, world_size=1)["cpu_model"] == "Some CPU (family 25 model 17)"
