"""The regression gate's comparison and statistics on synthetic numbers."""
import argparse
import random
import re

import pytest

from starcoder_tp.suite.gate import Baseline, compare_metric, kernels_difference, write_baseline
from starcoder_tp.suite.options import thresholds as parse_thresholds
from starcoder_tp.suite.perf import Case, CaseResult
from starcoder_tp.suite.report import result_row

CASE = Case(1, 32, 32)
SHAPE = "L4-E256-H8-KV1-I1024-V6144"  # ModelConfig.shape_id
MACHINE = {"cpu_model": "AMD EPYC 7B13", "cpu_isa": "avx avx2 fma sse4_2", "cores": "2", "torch_version": "2.13.0+cpu",
           "threads_per_rank": "1", "accelerator": ""}


def test_thresholds_are_per_metric():
    assert parse_thresholds("first_token=10%,decode=15%") == {"first_token": 0.10, "decode": 0.15}
    assert parse_thresholds("decode=0.2") == {"decode": 0.2}
    for bad, message in [("latency=10%", "'latency=10%' is not METRIC=N%"), ("decode=fast", "'fast' is not a number"),
                         ("decode=0%", "must be > 0"), ("decode", "is not METRIC=N%")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_thresholds(bad)


def test_a_clear_slowdown_is_a_regression_and_a_speedup_an_improvement():
    base = [10.0, 10.2, 9.9, 10.1, 10.0]
    slow = [12.5, 12.6, 12.4, 12.7, 12.5]
    verdict = compare_metric(CASE, "decode", slow, base, threshold=0.10, alpha=0.05)
    assert verdict.kind == "regression" and verdict.ratio == pytest.approx(1.25) and verdict.p_value < 0.05
    assert "bs1-in32-out32 decode: baseline 10.000 ms, now 12.500 ms, ratio 1.250 (threshold 10%" in verdict.message()
    fast = [7.0, 7.1, 6.9, 7.0, 7.2]
    assert compare_metric(CASE, "decode", fast, base, threshold=0.10, alpha=0.05).kind == "improvement"


def test_a_slowdown_within_the_threshold_passes_however_significant():
    base = [10.0, 10.01, 10.02, 10.0, 10.01]
    now = [10.5, 10.51, 10.52, 10.5, 10.51]  # +5%: significant, but under 10%
    assert compare_metric(CASE, "decode", now, base, 0.10, 0.05).kind == "ok"


def test_one_noisy_round_does_not_fail_the_build():
    base = [10.0, 10.1, 9.9, 10.0, 10.1]
    now = [10.0, 30.0, 30.0, 9.9, 10.2]  # median 10.2... two outliers
    assert compare_metric(CASE, "first_token", now, base, 0.10, 0.05).kind == "ok"
    # Over the threshold on the median, but the rounds overlap: not significant.
    overlapping = [9.5, 11.3, 11.4, 9.8, 11.5]
    base_wide = [9.6, 11.0, 9.7, 11.2, 9.9]
    verdict = compare_metric(CASE, "first_token", overlapping, base_wide, 0.10, 0.05)
    assert verdict.ratio > 1.10 and verdict.kind == "ok" and verdict.p_value >= 0.05
    assert verdict.inconclusive  # listed apart in the summary, not silently "ok"
    assert not compare_metric(CASE, "first_token", base, base, 0.10, 0.05).inconclusive


def test_noisy_a_a_comparisons_rarely_alarm():
    """Both sides from one distribution with 8% noise (5 rounds each): one comparison alarms
    less often than alpha, and with the re-measurement (both must alarm) almost never; a real
    +25% slowdown is still caught almost always."""
    rng = random.Random(0)

    def rounds(scale):
        return [10.0 * scale * rng.gauss(1, 0.08) for _ in range(5)]

    def gate(scale):  # one measurement, and a second one only if the first alarms
        base = rounds(1.0)
        return all(compare_metric(CASE, "decode", rounds(scale), base, 0.10, 0.05).kind == "regression"
                   for _ in range(2))

    trials = 2000
    single = sum(compare_metric(CASE, "decode", rounds(1.0), rounds(1.0), 0.10, 0.05).kind == "regression"
                 for _ in range(trials)) / trials
    assert single < 0.05, single
    assert sum(gate(1.0) for _ in range(trials)) / trials < 0.005
    assert sum(gate(1.25) for _ in range(trials)) / trials > 0.8


def test_normalisation_scales_by_the_machine_speed():
    base = [10.0, 10.1, 9.9, 10.0, 10.1]
    on_slower_machine = [15.0, 15.1, 14.9, 15.0, 15.2]  # a machine with 2/3 of the bandwidth
    assert compare_metric(CASE, "decode", on_slower_machine, base, 0.10, 0.05).kind == "regression"
    assert compare_metric(CASE, "decode", on_slower_machine, base, 0.10, 0.05, scale=2 / 3).kind == "ok"


def test_the_calibration_of_an_accelerator_run_times_the_device_in_the_runs_dtype(monkeypatch):
    """On CUDA the rows held the CPU's one-thread figures, so --perf-normalize scaled a GPU's
    times by the host's memcpy. Faked here (the 'device' is the CPU): tensors on the rank's
    device, that device synchronised around every clock read, matmuls in the run's dtype, the
    device's cache emptied for the ranks afterwards."""
    import torch

    import starcoder_tp.suite.gate as gate
    from starcoder_tp.device import Device

    events, dtypes = [], set()
    monkeypatch.setattr(Device, "torch_device", lambda self, rank: events.append(("device", self.device_id + rank))
                        or torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda where=None: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    real_mm, real_clock = torch.mm, gate.time.perf_counter
    monkeypatch.setattr(torch, "mm", lambda a, b: dtypes.add(a.dtype) or real_mm(a, b))
    monkeypatch.setattr(gate.time, "perf_counter", lambda: events.append("clock") or real_clock())
    monkeypatch.setattr(gate, "DEVICE_COPY_BYTES", 4 << 20)
    monkeypatch.setattr(gate, "DEVICE_MATMUL_SIZE", 64)
    figures = gate.measure_calibration(samples=2, device=Device("cuda", 3), dtype="bfloat16")

    assert events[0] == ("device", 3) and events[-1] == "empty_cache", events
    clocks = [i for i, e in enumerate(events) if e == "clock"]
    assert len(clocks) == 2 * 2 * (1 + 3 + 3)  # two samples: a warm-up, three copies, three matmuls; start + end
    assert all(events[i - 1] == "sync" for i in clocks), events
    assert dtypes == {torch.bfloat16}
    assert all(v > 0 for v in figures.values()) and set(figures) == {"calib_bandwidth_gbs", "calib_matmul_gflops"}


def row(case=CASE, world_size=2, dtype="float32", first=(10.0, 10.1, 9.9, 10.0), decode=((2.0, 2.0),) * 4, bw=20.0,
        runtime_mode="eager", model_shape=SHAPE, machine=MACHINE, side="", kernels=""):
    result = CaseResult(case)
    result.kernels = kernels
    for f, d in zip(first, decode):
        result.add_round(f, [d[0]] * (case.seq_out - 1), (case.batch, case.seq_out), [1 << 20])
    return result_row(result, world_size=world_size, dtype=dtype, device="cpu", model="m", model_shape=model_shape,
                      runtime_mode=runtime_mode, commit="c",
                      calibration={"calib_bandwidth_gbs": bw, "calib_matmul_gflops": 50.0}, fingerprint=machine, side=side)


def test_baseline_file_edge_cases(tmp_path):
    path = write_baseline([row(), row(Case(4, 32, 32))], tmp_path / "base.csv")
    baseline = Baseline.load(path, world_size=2, dtype="float32", device="cpu", runtime_mode="eager", model_shape=SHAPE, fingerprint=MACHINE)
    thresholds = {"first_token": 0.1, "decode": 0.1}
    assert baseline.compare(Case(16, 32, 32), row(Case(16, 32, 32)), thresholds, 0.05) is None  # a new case
    same = baseline.compare(CASE, row(), thresholds, 0.05)
    assert [v.kind for v in same] == ["ok", "ok"]
    slow = baseline.compare(CASE, row(decode=((3.0, 3.0), (3.1, 3.1), (3.05, 3.05), (3.0, 3.0))), {"decode": 0.1}, 0.05)
    assert [(v.metric, v.kind) for v in slow] == [("decode", "regression")]
    # --perf-normalize: the same slowdown on a machine with 2/3 of the bandwidth is no regression.
    slower_machine = row(decode=((3.0, 3.0), (3.1, 3.1), (3.05, 3.05), (3.0, 3.0)), bw=20.0 * 2 / 3)
    assert baseline.compare(CASE, slower_machine, {"decode": 0.1}, 0.05, normalize=True)[0].kind == "ok"
    with pytest.raises(ValueError, match="measured at world size 2, float32, cpu, runtime mode 'eager'; this run is "
                                         "world size 4, float32"):
        Baseline.load(path, world_size=4, dtype="float32", device="cpu", runtime_mode="eager", model_shape=SHAPE, fingerprint=MACHINE)
    with pytest.raises(ValueError, match="world size 2, float32, cpu, runtime mode 'eager'; this run is world size 2, "
                                         "bfloat16"):
        Baseline.load(path, world_size=2, dtype="bfloat16", device="cpu", runtime_mode="eager", model_shape=SHAPE, fingerprint=MACHINE)
    # An eager baseline must not gate a --compile run (nor one with --no-prepack), and vice versa.
    with pytest.raises(ValueError, match="runtime mode 'eager'; this run is world size 2, float32, cpu, runtime mode "
                                         "'compiled' \\(--compile, --kernels and --no-prepack set the mode\\)"):
        Baseline.load(path, world_size=2, dtype="float32", device="cpu", runtime_mode="compiled", model_shape=SHAPE, fingerprint=MACHINE)
    with pytest.raises(ValueError, match="runtime mode 'eager-no-prepack'"):
        Baseline.load(path, world_size=2, dtype="float32", device="cpu", runtime_mode="eager-no-prepack", model_shape=SHAPE, fingerprint=MACHINE)
    # A baseline of another model (whatever its name): refused, naming both shapes.
    with pytest.raises(ValueError, match="measured on a model of shape L4-E256-H8-KV1-I1024-V6144; this run's model "
                                         "\\(--model-dir\\) is L8-E1024-H16-KV1-I4096-V49152"):
        Baseline.load(path, world_size=2, dtype="float32", device="cpu", runtime_mode="eager",
                      model_shape="L8-E1024-H16-KV1-I4096-V49152", fingerprint=MACHINE)
    # A baseline from before the mode was recorded: refused, not guessed.
    lines = path.read_text().splitlines()
    at = lines[0].split(",").index("runtime_mode")
    (tmp_path / "old.csv").write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != at)
                                                for line in lines) + "\n")
    with pytest.raises(ValueError, match="written before the model's dimensions and the runtime mode were recorded"):
        Baseline.load(tmp_path / "old.csv", world_size=2, dtype="float32", device="cpu", runtime_mode="eager", model_shape=SHAPE, fingerprint=MACHINE)
    with pytest.raises(FileNotFoundError, match="no such file"):
        Baseline.load(tmp_path / "none.csv", world_size=2, dtype="float32", device="cpu", runtime_mode="eager", model_shape=SHAPE, fingerprint=MACHINE)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a results CSV of this suite"):
        Baseline.load(tmp_path / "other.csv", world_size=2, dtype="float32", device="cpu", runtime_mode="eager", model_shape=SHAPE, fingerprint=MACHINE)
    one_round = write_baseline([row(first=(10.0,), decode=((2.0, 2.0),))], tmp_path / "one.csv")
    with pytest.raises(ValueError, match="has 1 round\\(s\\); a baseline needs >= 4"):
        Baseline.load(one_round, world_size=2, dtype="float32", device="cpu", runtime_mode="eager", model_shape=SHAPE, fingerprint=MACHINE)


def test_a_baseline_of_another_machine_is_refused_naming_both_unless_normalised(tmp_path):
    path = write_baseline([row(), row(Case(4, 32, 32))], tmp_path / "base.csv")
    zen5 = {**MACHINE, "cpu_model": "AMD EPYC 9B45", "cpu_isa": "avx avx2 avx512_bf16 avx512f fma sse4_2"}
    load = dict(world_size=2, dtype="float32", device="cpu", runtime_mode="eager", model_shape=SHAPE)
    with pytest.raises(ValueError) as err:
        Baseline.load(path, **load, fingerprint=zen5)
    message = str(err.value)
    assert "was measured on another machine: AMD EPYC 7B13, 2 cores" in message
    assert "this run is on AMD EPYC 9B45, 2 cores" in message
    assert "CPU instruction sets differ: only this machine has avx512_bf16 avx512f" in message
    assert "--perf-compare-ref" in message and "--perf-normalize" in message
    for other, named in [({"threads_per_rank": "2"}, "threads_per_rank '1' (baseline) vs '2' (this run)"),
                         ({"torch_version": "2.14.0+cpu"}, "torch_version '2.13.0+cpu' (baseline) vs '2.14.0+cpu'"),
                         ({"cores": "4"}, "cores '2' (baseline) vs '4' (this run)"),
                         # the same name with the family and model that fingerprints carry now
                         ({"cpu_model": "AMD EPYC 7B13 (family 25 model 1)"},
                          "saved before fingerprints named the CPU's family and model: save a new baseline")]:
        with pytest.raises(ValueError, match=re.escape(named)):
            Baseline.load(path, **load, fingerprint={**MACHINE, **other})
    normalised = Baseline.load(path, **load, fingerprint=zen5, normalize=True)
    assert any("avx512_bf16" in d for d in normalised.other_machine)
    assert not Baseline.load(path, **load, fingerprint=MACHINE).other_machine
    # A file from before the machine was recorded is refused, not trusted.
    lines = path.read_text().splitlines()
    at = lines[0].split(",").index("cpu_model")
    (tmp_path / "old.csv").write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != at)
                                                for line in lines) + "\n")
    with pytest.raises(ValueError, match="written before the machine was recorded"):
        Baseline.load(tmp_path / "old.csv", **load, fingerprint=MACHINE)
    # Side B of an A/B run is another commit's code: never read as this code's baseline.
    mixed = write_baseline([row(side="A"), row(Case(4, 32, 32), side="B")], tmp_path / "ab.csv")
    assert set(Baseline.load(mixed, **load, fingerprint=MACHINE).rows) == {CASE}


PLAN = ("auto (cached, batch 1, weighed for 32 prompt rows + 31 steps): 1024x256:float32 plain/plain/plain; "
        "256x1024:float32 onednn/onednn/unpack")


def test_a_verdict_names_the_shapes_whose_kernels_differ_from_the_baselines(tmp_path):
    """A plan measured again can lay a weight out otherwise; a regression report says so, shape by shape."""
    path = write_baseline([row(kernels=PLAN)], tmp_path / "base.csv")
    baseline = Baseline.load(path, world_size=2, dtype="float32", device="cpu", runtime_mode="eager", model_shape=SHAPE,
                             fingerprint=MACHINE)
    other = PLAN.replace("(cached", "(measured").replace("onednn/onednn/unpack", "mkl_packed/mkl_packed/mkl_packed")
    slow = baseline.compare(CASE, row(decode=((3.0, 3.0),) * 4, kernels=other), {"decode": 0.1}, 0.05)
    assert slow[0].kind == "regression"
    assert slow[0].message().endswith("regression; the kernels differ from the baseline's: "
                                      "256x1024:float32 onednn/onednn/unpack -> mkl_packed/mkl_packed/mkl_packed")
    # Only where the plan came from differs (measured, not cached): the same kernels, nothing said.
    same = baseline.compare(CASE, row(decode=((3.0, 3.0),) * 4, kernels=PLAN.replace("(cached", "(measured")),
                            {"decode": 0.1}, 0.05)
    assert same[0].kind == "regression" and same[0].kernels_change == "" and "kernels" not in same[0].message()
    assert kernels_difference(float("nan"), PLAN) == "", "a baseline from before the column: nothing to compare"
    assert kernels_difference(PLAN, "compiled") == f"{PLAN} -> compiled"
    assert kernels_difference(PLAN, PLAN.rsplit("; ", 1)[0]) == "256x1024:float32 onednn/onednn/unpack -> -"
