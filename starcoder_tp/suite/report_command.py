"""`python -m starcoder_tp report DIR [DIR2]`: the tables and heatmaps of earlier runs, re-rendered
from their results CSVs; given two result folders, their cases side by side as ratios."""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..files import atomic_path
from .report import CASE_COLUMNS, CSV_GLOB, frame, latest, read_results, summary_lines, write_heatmaps

# What makes two rows comparable: the same measurement of the same model, besides the case.
CONFIG_COLUMNS = ["model", "model_shape", "world_size", "dtype", "device", "runtime_mode"]
FIGURES = {"first_token_time(ms)": "first token ms", "avg_token_time(ms)": "decode ms"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="a results folder (its multibatch_performance_*.csv)")
    parser.add_argument("dir2", type=Path, nargs="?", default=None,
                        help="a second results folder: its cases beside DIR's, as ratios DIR2 / DIR")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the heatmaps and the comparison CSV go. Default: DIR/report (apart from "
                             "the run's own heatmaps)")


def load_runs(directory: Path) -> pd.DataFrame:
    """Every results CSV of a folder, this code's rows only (side B of an A/B run is another commit)."""
    paths = sorted(directory.glob(CSV_GLOB))
    if not directory.is_dir() or not paths:
        raise FileNotFoundError(f"{directory}: no {CSV_GLOB} in it (not a results folder of this suite?)")
    frames = []
    for path in paths:
        df = read_results(path)
        missing = [c for c in CASE_COLUMNS + CONFIG_COLUMNS if c not in df]
        if missing:
            raise ValueError(f"{path}: not a results CSV of this suite (no column {missing[0]!r})")
        frames.append(df.assign(source=path.stem.removeprefix("multibatch_performance_")))
    raw = pd.concat(frames, ignore_index=True)
    df = frame(raw).assign(source=raw["source"])
    return df[df["side"] != "B"]


def compare_runs(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """One row per case measured in both (same model, world size, dtype, device, mode): each
    run's latest figures and the ratios after / before."""
    keys = CONFIG_COLUMNS + CASE_COLUMNS
    columns = keys + list(FIGURES)
    joined = latest(before)[columns].merge(latest(after)[columns], on=keys, suffixes=(" 1", " 2"))
    for figure in FIGURES:
        joined[f"{figure} ratio"] = joined[f"{figure} 2"] / joined[f"{figure} 1"]
    return joined


def comparison_lines(joined: pd.DataFrame, names: tuple[str, str]) -> list[str]:
    lines = [f"{names[1]} / {names[0]}, {len(joined)} case(s) in both:",
             f"  {'config':<40} {'case':<20} {'first 1':>9} {'first 2':>9} {'ratio':>6} "
             f"{'decode 1':>9} {'decode 2':>9} {'ratio':>6}"]
    for _, r in joined.iterrows():
        config = f"{r['model']} ws{r['world_size']} {r['dtype']} {r['device']} {r['runtime_mode']}"
        case = f"bs{r['Batch']}-in{r['Input_seq_len']}-out{r['Output_seq_len']}"
        first, decode = "first_token_time(ms)", "avg_token_time(ms)"
        lines.append(f"  {config:<40} {case:<20} {r[first + ' 1']:>9.3f} {r[first + ' 2']:>9.3f} "
                     f"{r[first + ' ratio']:>6.3f} {r[decode + ' 1']:>9.3f} {r[decode + ' 2']:>9.3f} "
                     f"{r[decode + ' ratio']:>6.3f}")
    return lines


def run(args: argparse.Namespace) -> int:
    out = args.out or args.dir / "report"
    runs = load_runs(args.dir)
    for (source, *config), rows in runs.groupby(["source", "world_size", "dtype", "device", "runtime_mode"]):
        tag = f"{source}_ws{config[0]}_{config[1]}_{config[2]}_{config[3]}"
        print(f"== {args.dir}: {source} (model_device), world size {config[0]}, {config[1]}, {config[2]}, "
              f"{config[3]}, {len(rows)} row(s)")
        for line in summary_lines(rows):
            print("  " + line)
        print("  heatmaps: " + ", ".join(map(str, write_heatmaps(rows, out, tag, 0))))
    if args.dir2 is not None:
        joined = compare_runs(runs, load_runs(args.dir2))
        if joined.empty:
            raise ValueError(f"{args.dir} and {args.dir2} have no case in common measured alike (same model, world "
                             "size, dtype, device and runtime mode)")
        for line in comparison_lines(joined, (str(args.dir), str(args.dir2))):
            print(line)
        with atomic_path(Path(out) / "comparison.csv") as tmp:
            joined.to_csv(tmp, index=False)
        print(f"comparison CSV: {Path(out) / 'comparison.csv'}")
    return 0
