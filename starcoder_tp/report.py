"""Results of the performance grid: the CSV (appended row by row), the terminal summary and
the heatmaps. The CSV starts with the Ascend guide's columns, so its readers keep working."""
from __future__ import annotations

import csv
import io
import os
import statistics
import subprocess
import time
from pathlib import Path

from .machine import FINGERPRINT_COLUMNS
from .perf import Case, CaseResult

ASCEND_COLUMNS = ["Batch", "Input_seq_len", "Output_seq_len", "TotalTime(s)", "first_token_time(ms)",
                  "avg_token_time(ms)"]
OUR_COLUMNS = ["world_size", "dtype", "device", "model", "model_shape", "runtime_mode", "decode_p50_ms",
               "decode_p90_ms", "decode_p99_ms", "tokens_per_s", "peak_memory_mb", "peak_memory_mb_per_rank", "rounds", "first_token_ms_rounds",
               "decode_ms_rounds", "calib_bandwidth_gbs", "calib_matmul_gflops", "side", "run_id",
               *FINGERPRINT_COLUMNS, "git_commit", "timestamp"]
COLUMNS = ASCEND_COLUMNS + OUR_COLUMNS


def csv_path(results_dir: str | Path, model_name: str, device_id: int) -> Path:
    return Path(results_dir) / f"multibatch_performance_{model_name}_{device_id}.csv"


def git_commit(repo: Path = Path(__file__).resolve().parent.parent) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def result_row(result: CaseResult, *, world_size: int, dtype: str, device: str, model: str, model_shape: str,
               runtime_mode: str, commit: str, calibration: dict[str, float] | None = None,
               fingerprint: dict[str, str] | None = None, side: str = "", run_id: str = "") -> dict:
    """One CSV row. `side` is "A" or "B" in an A/B comparison ("" otherwise), `run_id` names the
    session (the two sides of one comparison share it), `fingerprint` is machine.machine_fingerprint."""
    mb = 1 << 20
    return {
        "Batch": result.case.batch,
        "Input_seq_len": result.case.seq_in,
        "Output_seq_len": result.case.seq_out,
        "TotalTime(s)": f"{result.total_s:.6f}",
        "first_token_time(ms)": f"{result.first_token_ms:.4f}",
        "avg_token_time(ms)": f"{result.decode_ms_mean:.4f}",
        "world_size": world_size,
        "dtype": dtype,
        "device": device,
        "model": model,
        "model_shape": model_shape,  # ModelConfig.shape_id: the dimensions, whatever the model's name
        "runtime_mode": runtime_mode,  # PerfOptions.runtime_mode: eager, eager-no-prepack or compiled
        "decode_p50_ms": f"{result.decode_ms_percentile(50):.4f}",
        "decode_p90_ms": f"{result.decode_ms_percentile(90):.4f}",
        "decode_p99_ms": f"{result.decode_ms_percentile(99):.4f}",
        "tokens_per_s": f"{result.tokens_per_s:.3f}",
        "peak_memory_mb": f"{max(result.peak_memory_bytes) / mb:.1f}",
        "peak_memory_mb_per_rank": ";".join(f"{m / mb:.1f}" for m in result.peak_memory_bytes),
        "rounds": result.rounds,
        # Per-round figures, kept so that a later run can test its difference for significance.
        "first_token_ms_rounds": ";".join(f"{t:.4f}" for t in result.first_token_ms_rounds),
        "decode_ms_rounds": ";".join(f"{statistics.fmean(d) if d else 0.0:.4f}" for d in result.decode_ms_rounds),
        # The machine's speed when this row was measured (gate.measure_calibration), for
        # comparisons across machines of one kind (--perf-normalize).
        "calib_bandwidth_gbs": f"{calibration['calib_bandwidth_gbs']:.3f}" if calibration else "",
        "calib_matmul_gflops": f"{calibration['calib_matmul_gflops']:.3f}" if calibration else "",
        "side": side,
        "run_id": run_id,
        **{column: (fingerprint or {}).get(column, "") for column in FINGERPRINT_COLUMNS},
        "git_commit": commit,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class ResultsCSV:
    """Appends one complete line per finished case (flushed and fsynced), so an interrupted run
    keeps every row it measured. A file with other columns is moved aside, never mixed."""

    def __init__(self, path: str | Path, log=print):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != COLUMNS:
                aside = self.path.with_name(f"{self.path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.old.csv")
                os.replace(self.path, aside)
                log(f"[perf] {self.path} had other columns; moved it to {aside}")
        if not self.path.is_file() or not self.path.stat().st_size:
            self._append_line(COLUMNS)

    def _append_line(self, values: list) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        # One write of a whole line in append mode: a crash leaves whole rows only.
        with open(self.path, "a", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: dict) -> None:
        missing = [c for c in COLUMNS if c not in row]
        assert not missing, missing
        self._append_line([row[c] for c in COLUMNS])

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def measured_cases(self, *, world_size: int, dtype: str, device: str, model: str,
                       runtime_mode: str) -> set[Case]:
        """Cases already in the file for this configuration (for --perf-resume)."""
        wanted = (world_size, dtype, device, model, runtime_mode, "")
        return {Case(int(r["Batch"]), int(r["Input_seq_len"]), int(r["Output_seq_len"])) for r in self.rows()
                if (int(r["world_size"]), r["dtype"], r["device"], r["model"], r["runtime_mode"], r["side"]) == wanted}


def summary_lines(rows: list[dict]) -> list[str]:
    """A table per batch size, then the Ascend guide's headline: batch 1, mean over its cases."""
    lines = []
    by_batch: dict[int, list[dict]] = {}
    for row in rows:
        by_batch.setdefault(int(row["Batch"]), []).append(row)
    head = f"{'in':>6} {'out':>6} {'first(ms)':>10} {'dec mean':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'tok/s':>9} {'mem(MB)':>8}"
    for batch in sorted(by_batch):
        lines.append(f"batch {batch}:")
        lines.append("  " + head)
        for r in sorted(by_batch[batch], key=lambda r: (int(r["Input_seq_len"]), int(r["Output_seq_len"]))):
            lines.append(
                f"  {int(r['Input_seq_len']):>6} {int(r['Output_seq_len']):>6} {float(r['first_token_time(ms)']):>10.2f} "
                f"{float(r['avg_token_time(ms)']):>9.3f} {float(r['decode_p50_ms']):>8.3f} {float(r['decode_p90_ms']):>8.3f} "
                f"{float(r['decode_p99_ms']):>8.3f} {float(r['tokens_per_s']):>9.1f} {float(r['peak_memory_mb']):>8.0f}")
    for batch in sorted(by_batch):
        cases = by_batch[batch]
        first = statistics.fmean(float(r["first_token_time(ms)"]) for r in cases)
        decode = statistics.fmean(float(r["avg_token_time(ms)"]) for r in cases)
        tag = "headline (the Ascend guide's row)" if batch == 1 else "mean"
        lines.append(f"batch {batch} {tag}: first token {first:.2f} ms, per-token decode {decode:.3f} ms "
                     f"(mean over {len(cases)} case{'s' if len(cases) != 1 else ''})")
    return lines


def write_heatmaps(rows: list[dict], results_dir: str | Path, model_name: str, device_id: int) -> list[Path]:
    """One PNG per batch size: first-token ms and decode ms/token over the in × out grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    by_batch: dict[int, list[dict]] = {}
    for row in rows:
        by_batch.setdefault(int(row["Batch"]), []).append(row)
    for batch, cases in sorted(by_batch.items()):
        ins = sorted({int(r["Input_seq_len"]) for r in cases})
        outs = sorted({int(r["Output_seq_len"]) for r in cases})
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.4 * len(outs) * 2, 2 + 0.6 * len(ins)), squeeze=False)
        for ax, column, title in ((axes[0][0], "first_token_time(ms)", "first token (ms)"),
                                  (axes[0][1], "avg_token_time(ms)", "decode (ms/token)")):
            grid = np.full((len(ins), len(outs)), np.nan)
            for r in cases:  # the last row of a case wins (a re-run replaces an earlier one)
                grid[ins.index(int(r["Input_seq_len"])), outs.index(int(r["Output_seq_len"]))] = float(r[column])
            image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(outs)), [str(o) for o in outs])
            ax.set_yticks(range(len(ins)), [str(i) for i in ins])
            ax.set_xlabel("output tokens")
            ax.set_ylabel("input tokens")
            ax.set_title(f"batch {batch}: {title}")
            middle = np.nanmin(grid) + (np.nanmax(grid) - np.nanmin(grid)) / 2
            for y in range(len(ins)):
                for x in range(len(outs)):
                    if not np.isnan(grid[y, x]):  # dark text on the bright (yellow) end of viridis
                        ax.text(x, y, f"{grid[y, x]:.3g}", ha="center", va="center", fontsize=8,
                                color="black" if grid[y, x] > middle else "white")
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"{model_name}: batch {batch}")
        fig.tight_layout()
        path = Path(results_dir) / f"heatmap_bs{batch}_{model_name}_{device_id}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written
