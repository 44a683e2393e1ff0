"""Gating on latency regressions against a stored baseline, without crying wolf.

A case regresses on a metric only when BOTH hold (asv's rule, per metric):
- its median over R rounds is beyond baseline × (1 + threshold), and
- its rounds are significantly slower than the baseline's rounds (one-sided Mann-Whitney U,
  p < alpha), so one noisy round cannot fail a build.
A case that fails is measured once more before it is declared a regression (the test does that).
Improvements beyond the threshold are reported too: a stale baseline is worth knowing.

With `normalize`, latencies are first scaled by the machine-speed calibration stored with both
runs (memory bandwidth for decode, matmul throughput for the first token), so that a baseline
taken on another machine of the same kind stays meaningful.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..device import Device
from ..files import atomic_path
from .machine import FINGERPRINT_COLUMNS, describe, fingerprint_differences
from .perf import Case
from .report import CASE_COLUMNS, COLUMNS, latest, read_results

METRICS = {"first_token": "first_token_ms_rounds", "decode": "decode_ms_rounds"}
CALIBRATION_OF = {"first_token": "calib_matmul_gflops", "decode": "calib_bandwidth_gbs"}
MIN_ROUNDS = 4  # exact Mann-Whitney, 3 vs 3 rounds: p >= 0.05 however far apart; 4 vs 4: down to 0.014


def measure_calibration(samples: int = 3, device: Device = Device("cpu"), dtype: str = "float32") -> dict[str, float]:
    """The speed of what runs the ranks: memory-copy bandwidth (GB/s, read + write) and matmul
    throughput (GFLOP/s). On CPU, one thread and fp32 matmuls; on an accelerator its own memory
    and matmuls in the run's dtype (`dtype`), the device synchronised before every clock read
    (the CPU's figures say nothing about a GPU's time, and a GPU's fp32 and bf16 rates differ
    between kinds by different factors).

    Each figure is the median over `samples` fresh allocations of the best of three runs, after
    a warm-up: single runs on these machines vary by 10-20% with placement and clock state.
    """
    if device.kind != "cpu":
        return _measure_device(samples, device, getattr(torch, dtype))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    copies, matmuls = [], []
    try:
        for _ in range(samples):
            src = torch.ones(32 << 20)  # 128 MB: far beyond the caches
            dst = torch.empty_like(src)
            a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
            dst.copy_(src), torch.mm(a, b)  # warm-up: page faults, kernel selection
            copies.append(min(_timed(lambda: dst.copy_(src)) for _ in range(3)))
            matmuls.append(min(_timed(lambda: torch.mm(a, b)) for _ in range(3)))
    finally:
        torch.set_num_threads(threads)
    return {"calib_bandwidth_gbs": 2 * (32 << 20) * 4 / statistics.median(copies) / 1e9,  # read + write
            "calib_matmul_gflops": 2 * 1024 ** 3 / statistics.median(matmuls) / 1e9}


# On an accelerator: 512 MiB copied (beyond the L2: the H200's is 60 MB, a 910B's 192 MB) and
# 4096-square matmuls, a few milliseconds each on a data-centre GPU.
DEVICE_COPY_BYTES = 512 << 20
DEVICE_MATMUL_SIZE = 4096


def _measure_device(samples: int, device: Device, dtype: torch.dtype) -> dict[str, float]:
    module = getattr(torch, device.kind)  # torch.cuda, or torch.npu (Device imported torch_npu)
    where = device.torch_device(0)  # the first rank's device: the ranks run on devices of one kind

    def timed(fn) -> float:
        module.synchronize(where)
        started = time.perf_counter()
        fn()
        module.synchronize(where)
        return time.perf_counter() - started

    copies, matmuls = [], []
    size = DEVICE_MATMUL_SIZE
    try:
        for _ in range(samples):
            src = torch.ones(DEVICE_COPY_BYTES // 4, device=where)
            dst = torch.empty_like(src)
            a = torch.randn(size, size, device=where).to(dtype)  # random: zeros run faster than real data
            b = torch.randn(size, size, device=where).to(dtype)
            timed(lambda: (dst.copy_(src), torch.mm(a, b)))  # warm-up: kernel selection, handles
            copies.append(min(timed(lambda: dst.copy_(src)) for _ in range(3)))
            matmuls.append(min(timed(lambda: torch.mm(a, b)) for _ in range(3)))
            del src, dst, a, b
    finally:
        module.empty_cache()  # the ranks get the memory back
    return {"calib_bandwidth_gbs": 2 * DEVICE_COPY_BYTES / statistics.median(copies) / 1e9,
            "calib_matmul_gflops": 2 * size ** 3 / statistics.median(matmuls) / 1e9}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def mann_whitney_p(now: list[float], baseline: list[float], alternative: str) -> float:
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(now, baseline, alternative=alternative).pvalue)


@dataclass(frozen=True)
class Verdict:
    case: Case
    metric: str
    kind: str  # "regression", "improvement", "ok"
    baseline_ms: float
    now_ms: float
    threshold: float
    p_value: float | None
    kernels_change: str = ""  # how the case's kernel plan differs from the baseline's (kernels_difference)

    @property
    def ratio(self) -> float:
        return self.now_ms / self.baseline_ms

    @property
    def inconclusive(self) -> bool:
        """Beyond the threshold by its median, but not significantly (too few or too noisy rounds)."""
        return self.kind == "ok" and self.p_value is not None

    def message(self) -> str:
        p = "" if self.p_value is None else f", Mann-Whitney p={self.p_value:.3g}"
        change = f"; the kernels differ from the baseline's: {self.kernels_change}" if self.kernels_change else ""
        return (f"{self.case.id} {self.metric}: baseline {self.baseline_ms:.3f} ms, now {self.now_ms:.3f} ms, "
                f"ratio {self.ratio:.3f} (threshold {self.threshold:.0%}{p}): {self.kind}{change}")


def kernels_difference(baseline: object, now: object) -> str:
    """How a case's kernel plan (the results' `kernels` column: TPCausalLM.kernels_summary) differs
    from the baseline's, shape by shape ("" where the same, or not recorded in either). The
    runtime mode is the same on both sides (Baseline.load), but a measured plan is not: a plan
    measured again (a cleared cache, a new torch) can lay a weight out otherwise where candidates
    are close, and a latency change may come from that rather than from the code."""
    if not isinstance(baseline, str) or not isinstance(now, str) or not baseline or not now:
        return ""  # a CSV from before the column, or a case without a plan

    def by_shape(summary: str) -> dict[str, str]:
        plan = summary.partition("): ")[2]  # after "auto (cached, batch 1, weighed for ...): "
        return dict(item.rsplit(" ", 1) for item in plan.split("; ") if " " in item)

    theirs, ours = by_shape(baseline), by_shape(now)
    if not theirs or not ours:  # a summary without shapes ("compiled", a plan not chosen yet)
        return "" if baseline.split(" (")[0] == now.split(" (")[0] else f"{baseline} -> {now}"
    return "; ".join(f"{shape} {theirs.get(shape, '-')} -> {ours.get(shape, '-')}"
                     for shape in sorted(set(theirs) | set(ours)) if theirs.get(shape) != ours.get(shape))


def compare_metric(case: Case, metric: str, now: list[float], baseline: list[float], threshold: float,
                   alpha: float, scale: float = 1.0) -> Verdict:
    """`scale` multiplies the current figures (machine-speed normalisation); medians compared."""
    now = [t * scale for t in now]
    now_med, base_med = statistics.median(now), statistics.median(baseline)
    ratio = now_med / base_med
    if ratio > 1 + threshold:
        p = mann_whitney_p(now, baseline, "greater")
        return Verdict(case, metric, "regression" if p < alpha else "ok", base_med, now_med, threshold, p)
    if ratio < 1 - threshold:
        p = mann_whitney_p(now, baseline, "less")
        return Verdict(case, metric, "improvement" if p < alpha else "ok", base_med, now_med, threshold, p)
    return Verdict(case, metric, "ok", base_med, now_med, threshold, None)


def _rounds(text: str) -> list[float]:
    return [float(x) for x in text.split(";") if x]


@dataclass
class Baseline:
    path: Path
    rows: dict[Case, dict]  # the last row of each case
    other_machine: list[str] = field(default_factory=list)  # how its machine differs (only with normalize)

    @classmethod
    def load(cls, path: str | Path, *, world_size: int, dtype: str, device: str, runtime_mode: str,
             model_shape: str, fingerprint: dict[str, str], normalize: bool = False) -> "Baseline":
        """The baseline's rows, refused unless measured like this run: same model dimensions
        (ModelConfig.shape_id), world size, dtype, device and runtime mode (eager,
        eager-no-prepack, eager-kernels-K, compiled), >= MIN_ROUNDS rounds, and the same machine
        (machine.machine_fingerprint) unless `normalize` (then `other_machine` says how it differs)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--perf-baseline {path}: no such file")
        df = read_results(path)
        missing = [c for c in ("first_token_ms_rounds", "decode_ms_rounds", "world_size", "dtype") if c not in df]
        if missing:
            raise ValueError(f"--perf-baseline {path}: not a results CSV of this suite (no column {missing[0]!r})")
        unrecorded = [c for c in ("model_shape", "runtime_mode") if c not in df]
        if unrecorded:
            raise ValueError(f"--perf-baseline {path}: written before the model's dimensions and the runtime mode "
                             f"were recorded (no column {unrecorded[0]!r}), so it may gate one model or mode with "
                             "another's figures: take a new baseline with --perf-save-baseline")
        if FINGERPRINT_COLUMNS[0] not in df:
            raise ValueError(f"--perf-baseline {path}: written before the machine was recorded with each row (no "
                             f"column {FINGERPRINT_COLUMNS[0]!r}), so nothing says it was measured on this machine: "
                             "take a new baseline here with --perf-save-baseline, or compare commits in one "
                             "sitting with --perf-compare-ref")
        if "side" in df:
            df = df[df.side != "B"]  # side B of an A/B run is another commit
        if df.empty:
            raise ValueError(f"--perf-baseline {path}: holds no measured case")
        other_shapes = df[df.model_shape != model_shape]
        if not other_shapes.empty:
            raise ValueError(f"--perf-baseline {path} was measured on a model of shape "
                             f"{other_shapes.model_shape.iloc[0]}; this run's model (--model-dir) is {model_shape}: "
                             "compare like with like (or take a new baseline with --perf-save-baseline)")
        ours = (world_size, dtype, device, runtime_mode)
        for theirs in df[["world_size", "dtype", "device", "runtime_mode"]].drop_duplicates().itertuples(index=False):
            theirs = (int(theirs[0]), *theirs[1:])
            if theirs != ours:
                raise ValueError(
                    f"--perf-baseline {path} was measured at world size {theirs[0]}, {theirs[1]}, {theirs[2]}, "
                    f"runtime mode {theirs[3]!r}; this run is world size {world_size}, {dtype}, {device}, runtime "
                    f"mode {runtime_mode!r} (--compile, --kernels and --no-prepack set the mode): compare like with like "
                    "(or take a new baseline with --perf-save-baseline)")
        few = df[df.rounds.astype(int) < MIN_ROUNDS]
        if not few.empty:
            row = few.iloc[0]
            raise ValueError(f"--perf-baseline {path}: case bs{row['Batch']}-in{row['Input_seq_len']}-out"
                             f"{row['Output_seq_len']} has {row['rounds']} round(s); a baseline needs >= "
                             f"{MIN_ROUNDS} (take it with --perf-rounds {MIN_ROUNDS} or more)")
        machines = df[list(FINGERPRINT_COLUMNS)].drop_duplicates()
        if len(machines) > 1:
            a, b = machines.iloc[0].to_dict(), machines.iloc[-1].to_dict()
            raise ValueError(f"--perf-baseline {path} mixes rows of several machines ({describe(a)} and "
                             f"{describe(b)}): take it again on one")
        theirs = machines.iloc[0].to_dict()
        differences = fingerprint_differences(theirs, fingerprint)
        if differences and not normalize:
            raise ValueError(
                f"--perf-baseline {path} was measured on another machine: {describe(theirs)}; this run is on "
                f"{describe(fingerprint)} ({'; '.join(differences)}). A stored baseline gates a machine against "
                "itself: compare two commits on this machine in one sitting with --perf-compare-ref REF, take a "
                "baseline here with --perf-save-baseline, or give --perf-normalize to compare the two machines in "
                "calibrated units")
        by_case = {Case(int(r["Batch"]), int(r["Input_seq_len"]), int(r["Output_seq_len"])): r
                   for r in latest(df.astype({c: int for c in CASE_COLUMNS})).to_dict("records")}
        return cls(path, by_case, differences)

    def compare(self, case: Case, row: dict, thresholds: dict[str, float], alpha: float,
                normalize: bool = False) -> list[Verdict] | None:
        """Verdicts for each gated metric of a freshly measured row; None if the case is new."""
        base = self.rows.get(case)
        if base is None:
            return None
        verdicts = []
        for metric, threshold in thresholds.items():
            column = METRICS[metric]
            scale = 1.0
            if normalize:
                calib = CALIBRATION_OF[metric]
                scale = float(row[calib]) / float(base[calib])
            verdicts.append(compare_metric(case, metric, _rounds(row[column]), _rounds(base[column]), threshold,
                                           alpha, scale))
        change = kernels_difference(base.get("kernels"), row.get("kernels"))
        return [dataclasses.replace(v, kernels_change=change) for v in verdicts] if change else verdicts


def write_baseline(rows: list[dict], path: str | Path) -> Path:
    """This session's rows as a baseline file, written atomically."""
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False, lineterminator="\n")
    return Path(path)


def write_comparison_png(verdicts: list, path: str | Path) -> Path:
    """The ratio per case and metric (now / baseline, or A / B), with the threshold drawn:
    red = regression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({v.metric for v in verdicts})
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 0.5 * len(verdicts) + 3), 3 * len(metrics)),
                             squeeze=False)
    colors = {"regression": "tab:red", "improvement": "tab:green", "ok": "tab:blue"}
    for ax, metric in zip(axes[:, 0], metrics):
        chosen = sorted((v for v in verdicts if v.metric == metric), key=lambda v: v.case)
        ax.bar(range(len(chosen)), [v.ratio for v in chosen], color=[colors[v.kind] for v in chosen])
        ax.axhline(1.0, color="black", linewidth=0.8)
        if chosen:
            ax.axhline(1 + chosen[0].threshold, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(chosen)), [v.case.id for v in chosen], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("ratio")
        ax.set_title(f"{metric} (median over rounds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return Path(path)


def describe_thresholds(thresholds: dict[str, float]) -> str:
    """{'first_token': 0.1, 'decode': 0.15} -> 'first_token 10%, decode 15%' (as --perf-max-regression takes them)."""
    return ", ".join(f"{metric} {value:.4g}%" for metric, value in ((m, v * 100) for m, v in thresholds.items()))


def summary_lines(baseline: Baseline, verdicts: list[Verdict], new_cases: list[Case], thresholds: dict[str, float],
                  alpha: float, normalize: bool) -> list[str]:
    """The terminal report of a gated run: regressions, improvements, the undecided, the ungated."""
    lines = [f"regression gate against {baseline.path} (thresholds {describe_thresholds(thresholds)}, alpha {alpha}"
             f"{', machine-speed normalised' if normalize else ''}):"]
    if baseline.other_machine:
        lines.append("  the baseline is from ANOTHER machine (compared in calibrated units, --perf-normalize): "
                     + "; ".join(baseline.other_machine))
    for kind in ("regression", "improvement"):
        found = [v for v in verdicts if v.kind == kind]
        lines.append(f"  {len(found)} {kind}(s)" + (":" if found else ""))
        lines.extend("    " + v.message() for v in found)
    unsure = [v for v in verdicts if v.inconclusive]
    if unsure:
        lines.append(f"  {len(unsure)} beyond the threshold but not significant at alpha {alpha} (not failed; more "
                     "--perf-rounds give the test more power):")
        lines.extend("    " + v.message() for v in unsure)
    if new_cases:
        lines.append(f"  not in the baseline (not gated): {', '.join(c.id for c in new_cases)}")
    return lines
