"""Results of the performance grid: the CSV (appended row by row), the terminal tables and the
heatmaps, all through pandas. The CSV starts with the Ascend guide's columns, so its readers
keep working. `python -m starcoder_tp report DIR [DIR2]` re-renders them from the CSVs of
earlier runs (compare.py puts two runs side by side)."""
from __future__ import annotations

import io
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..files import atomic_path
from .machine import FINGERPRINT_COLUMNS
from .perf import Case, CaseResult

ASCEND_COLUMNS = ["Batch", "Input_seq_len", "Output_seq_len", "TotalTime(s)", "first_token_time(ms)",
                  "avg_token_time(ms)"]
OUR_COLUMNS = ["world_size", "dtype", "device", "model", "model_shape", "runtime_mode", "kernels", "decode_p50_ms",
               "decode_p90_ms", "decode_p99_ms", "tokens_per_s", "peak_memory_mb", "peak_memory_mb_per_rank", "rounds",
               "first_token_ms_rounds", "decode_ms_rounds", "calib_bandwidth_gbs", "calib_matmul_gflops", "side",
               "run_id", *FINGERPRINT_COLUMNS, "git_commit", "timestamp"]
COLUMNS = ASCEND_COLUMNS + OUR_COLUMNS
CASE_COLUMNS = ["Batch", "Input_seq_len", "Output_seq_len"]
NUMERIC_COLUMNS = ["Batch", "Input_seq_len", "Output_seq_len", "TotalTime(s)", "first_token_time(ms)",
                   "avg_token_time(ms)", "world_size", "decode_p50_ms", "decode_p90_ms", "decode_p99_ms", "tokens_per_s",
                   "peak_memory_mb", "rounds"]
CSV_GLOB = "multibatch_performance_*.csv"


def csv_path(results_dir: str | Path, model_name: str, device_id: int) -> Path:
    return Path(results_dir) / f"multibatch_performance_{model_name}_{device_id}.csv"


def git_commit(repo: Path = Path(__file__).resolve().parents[2]) -> str:
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
        "runtime_mode": runtime_mode,  # PerfOptions.runtime_mode: eager, eager-no-prepack, eager-kernels-K or compiled
        "kernels": result.kernels,  # each weight shape's decode/prefill kernel (kernels.py)
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


def frame(rows: Iterable[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows (dicts of strings, as written) as a DataFrame with the figures numeric."""
    df = pd.DataFrame(list(rows) if not isinstance(rows, pd.DataFrame) else rows, columns=COLUMNS)
    numeric = [c for c in NUMERIC_COLUMNS if c in df]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    return df


def read_results(path: str | Path) -> pd.DataFrame:
    """A results CSV as written: every column as text (a commit id of digits stays text)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


class ResultsCSV:
    """Appends one complete line per finished case (flushed and fsynced), so an interrupted run
    keeps every row it measured. A file with other columns is moved aside, never mixed."""

    def __init__(self, path: str | Path, log=print):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            header = list(pd.read_csv(self.path, nrows=0).columns)
            if header != COLUMNS:
                aside = self.path.with_name(f"{self.path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.old.csv")
                os.replace(self.path, aside)
                log(f"[perf] {self.path} had other columns; moved it to {aside}")
        if not self.path.is_file() or not self.path.stat().st_size:
            self._append(pd.DataFrame(columns=COLUMNS), header=True)

    def _append(self, df: pd.DataFrame, header: bool = False) -> None:
        text = io.StringIO()
        df.to_csv(text, header=header, index=False, lineterminator="\n")
        # One write of whole lines in append mode: a crash leaves whole rows only.
        with open(self.path, "a", newline="") as f:
            f.write(text.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: dict) -> None:
        missing = [c for c in COLUMNS if c not in row]
        assert not missing, missing
        self._append(pd.DataFrame([row], columns=COLUMNS))

    def rows(self) -> pd.DataFrame:
        return read_results(self.path)

    def measured_cases(self, *, world_size: int, dtype: str, device: str, model: str,
                       runtime_mode: str) -> set[Case]:
        """Cases already in the file for this configuration (for --perf-resume)."""
        df = frame(self.rows())
        ours = df[(df.world_size == world_size) & (df.dtype == dtype) & (df.device == device) & (df.model == model)
                  & (df.runtime_mode == runtime_mode) & (df.side == "")]
        return {Case(*map(int, key)) for key in ours[CASE_COLUMNS].itertuples(index=False)}


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """The last row of each case (a re-run replaces an earlier one), in case order."""
    return df.drop_duplicates(CASE_COLUMNS, keep="last").sort_values(CASE_COLUMNS)


def summary_lines(rows: Iterable[dict] | pd.DataFrame) -> list[str]:
    """A table per batch size, then the Ascend guide's headline: batch 1, mean over its cases."""
    df = latest(frame(rows)).rename(columns={"first_token_time(ms)": "first", "avg_token_time(ms)": "decode"})
    lines = []
    head = f"{'in':>6} {'out':>6} {'first(ms)':>10} {'dec mean':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'tok/s':>9} {'mem(MB)':>8}"
    for batch, cases in df.groupby("Batch"):
        lines.append(f"batch {batch}:")
        lines.append("  " + head)
        for r in cases.itertuples(index=False):
            lines.append(f"  {r.Input_seq_len:>6} {r.Output_seq_len:>6} {r.first:>10.2f} {r.decode:>9.3f} {r.decode_p50_ms:>8.3f} "
                         f"{r.decode_p90_ms:>8.3f} {r.decode_p99_ms:>8.3f} {r.tokens_per_s:>9.1f} {r.peak_memory_mb:>8.0f}")
    means = df.groupby("Batch").agg(first=("first", "mean"), decode=("decode", "mean"), cases=("Batch", "size"))
    for batch, m in means.iterrows():
        tag = "headline (the Ascend guide's row)" if batch == 1 else "mean"
        lines.append(f"batch {batch} {tag}: first token {m['first']:.2f} ms, per-token decode {m['decode']:.3f} ms "
                     f"(mean over {m['cases']:.0f} case{'s' if m['cases'] != 1 else ''})")
    return lines


def write_heatmaps(rows: Iterable[dict] | pd.DataFrame, results_dir: str | Path, model_name: str,
                   device_id: int) -> list[Path]:
    """One PNG per batch size: first-token ms and decode ms/token over the in x out grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    df = latest(frame(rows))
    written = []
    for batch, cases in df.groupby("Batch"):
        n_in, n_out = cases["Input_seq_len"].nunique(), cases["Output_seq_len"].nunique()
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.4 * n_out * 2, 2 + 0.6 * n_in), squeeze=False)
        for ax, column, title in ((axes[0][0], "first_token_time(ms)", "first token (ms)"),
                                  (axes[0][1], "avg_token_time(ms)", "decode (ms/token)")):
            grid = cases.pivot(index="Input_seq_len", columns="Output_seq_len", values=column)  # in x out
            values = grid.to_numpy(dtype=float)
            image = ax.imshow(values, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(grid.columns)), [str(o) for o in grid.columns])
            ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
            ax.set_xlabel("output tokens")
            ax.set_ylabel("input tokens")
            ax.set_title(f"batch {batch}: {title}")
            middle = np.nanmin(values) + (np.nanmax(values) - np.nanmin(values)) / 2
            for (y, x), value in np.ndenumerate(values):
                if not np.isnan(value):  # dark text on the bright (yellow) end of viridis
                    ax.text(x, y, f"{value:.3g}", ha="center", va="center", fontsize=8,
                            color="black" if value > middle else "white")
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"{model_name}: batch {batch}")
        fig.tight_layout()
        path = Path(results_dir) / f"heatmap_bs{batch}_{model_name}_{device_id}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
