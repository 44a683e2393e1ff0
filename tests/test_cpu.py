"""CPU facts: the vector units' theoretical peak from /proc/cpuinfo, and the clock it is figured at."""
from pathlib import Path

import pytest

from starcoder_tp.cpu import VectorPeak, clock_ghz, cpu_model, last_level_cache_bytes, vector_peak


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


@pytest.mark.parametrize("vendor, family, flags, fp32, bf16", [
    ("AuthenticAMD", 0x17, "sse2 avx avx2 fma", 32, 32),  # Zen 2 (model 0x31): AVX2, no bf16 arithmetic
    # bf16 dot products: 2 products a lane at the FMA's rate, twice fp32's FLOP (measured on Zen 4)
    ("AuthenticAMD", 0x19, "avx2 fma avx512f avx512_bf16", 32, 64),  # Zen 4: AVX-512 in 256-bit halves
    ("AuthenticAMD", 0x1A, "avx2 fma avx512f avx512_bf16", 64, 128),  # Zen 5
    ("GenuineIntel", 6, "avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", 64, 1024),  # AMX
    ("GenuineIntel", 6, "avx2 fma avx512f", 64, 64),
])
def test_vector_peak_per_core_and_cycle(tmp_path, vendor, family, flags, fp32, bf16):
    peak = vector_peak(_cpuinfo(tmp_path, vendor, family, flags))
    assert (peak.fp32_flop_per_cycle, peak.bf16_flop_per_cycle) == (fp32, bf16), peak.basis
    assert peak.gflops("float32", 2.5, 2) == fp32 * 5
    assert peak.gflops("bfloat16", 2.5, 1) == bf16 * 2.5


def test_zen1_runs_avx2_in_halves(tmp_path):
    assert vector_peak(_cpuinfo(tmp_path, "AuthenticAMD", 0x17, "avx2 fma", model=0x01)).fp32_flop_per_cycle == 16


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


@pytest.mark.parametrize("vendor, family, model, named", [
    ("AuthenticAMD", 25, 17, "Some CPU (family 25 model 17: Zen 4)"),  # Genoa
    ("AuthenticAMD", 26, 2, "Some CPU (family 26 model 2: Zen 5)"),  # Turin
    ("AuthenticAMD", 25, 1, "Some CPU (family 25 model 1: Zen 3)"),  # Milan
    ("AuthenticAMD", 23, 49, "Some CPU (family 23 model 49: Zen 2)"),  # Rome
    ("GenuineIntel", 6, 143, "Some CPU (family 6 model 143)"),  # Sapphire Rapids: no name of ours
])
def test_cpu_kinds_a_vm_names_alike_are_told_apart(tmp_path, vendor, family, model, named):
    # A VM calls Zen 4 and Zen 5 hosts alike "AMD EPYC": plans and baselines must not be shared.
    assert cpu_model(_cpuinfo(tmp_path, vendor, family, "avx2 fma", model=model)) == named


def test_cpu_model_without_family_is_the_name_alone(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some Arm CPU\nFeatures\t: neon asimd\n")
    assert cpu_model(path) == "Some Arm CPU"


def test_a_results_fingerprint_names_the_cpu_kind():
    from starcoder_tp.device import Device
    from starcoder_tp.suite.machine import machine_fingerprint

    assert machine_fingerprint(Device("cpu"), 1)["cpu_model"] == cpu_model()
