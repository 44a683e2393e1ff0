"""CPU facts: the vector units' theoretical peak from /proc/cpuinfo, and the clock it is figured at."""
from pathlib import Path

import pytest

from starcoder_tp.cpu import VectorPeak, clock_ghz, last_level_cache_bytes, vector_peak


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
    ("AuthenticAMD", 0x19, "avx2 fma avx512f avx512_bf16", 32, 128),  # Zen 4: AVX-512 in 256-bit halves
    ("AuthenticAMD", 0x1A, "avx2 fma avx512f avx512_bf16", 64, 256),  # Zen 5
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
