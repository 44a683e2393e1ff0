"""The perf suite end to end, as a user runs it: `pytest tests_perf ...` in a subprocess."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_pytest(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pytest", "tests_perf", "-p", "no:cacheprovider", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_small_grid_writes_csv_json_heatmaps_and_summary(tmp_path):
    proc = run_pytest("--batch-sizes", "1,2", "--seq-in", "16,512", "--seq-out", "6", "--results-dir", tmp_path,
                      "--model-name", "tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout
    with open(tmp_path / "multibatch_performance_tiny_0.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["Batch"], r["Input_seq_len"], r["Output_seq_len"]) for r in rows] == [
        ("1", "16", "6"), ("1", "512", "6"), ("2", "16", "6"), ("2", "512", "6")]
    for batch in ("1", "2"):
        first = {r["Input_seq_len"]: float(r["first_token_time(ms)"]) for r in rows if r["Batch"] == batch}
        assert first["512"] > first["16"], first  # a 32× longer prefill takes longer
    bench = json.loads((tmp_path / "benchmark_tiny_0.json").read_text())
    names = sorted(b["name"] for b in bench["benchmarks"])
    assert names == ["test_latency[bs1-in16-out6]", "test_latency[bs1-in512-out6]",
                     "test_latency[bs2-in16-out6]", "test_latency[bs2-in512-out6]"]
    assert all(b["extra_info"]["first_token_ms"] > 0 and b["extra_info"]["decode_ms_per_token"] > 0
               for b in bench["benchmarks"])
    assert (tmp_path / "heatmap_bs1_tiny_0.png").is_file() and (tmp_path / "heatmap_bs2_tiny_0.png").is_file()
    assert "batch 1 headline (the Ascend guide's row)" in proc.stdout
    assert "set-up: shard" in proc.stdout

    # -k selects by id, and --perf-resume skips what the CSV already holds.
    proc = run_pytest("--batch-sizes", "1,2", "--seq-in", "16,512", "--seq-out", "6", "--results-dir", tmp_path,
                      "--model-name", "tiny", "--perf-resume", "-k", "bs2-")
    assert "2 deselected" in proc.stdout or "4 deselected" in proc.stdout, proc.stdout[-2000:]
    assert len(list(csv.DictReader(open(tmp_path / "multibatch_performance_tiny_0.csv")))) == 4


def test_bad_options_stop_the_run_at_start_up_naming_the_value(tmp_path):
    for args, message in [
        (["--batch-sizes", "1,zero"], "--batch-sizes: 'zero' in '1,zero' is not a whole number"),
        (["--case-pairs", "256-64"], "--case-pairs: '256-64' is not of the form IN:OUT"),
        (["--world-size", "3"], "world size 3 does not divide the number of attention heads n_head=8"),
        (["--seq-in", "4000", "--seq-out", "200"], "exceeds the model's n_positions=4096"),
        (["--perf-rounds", "0"], "--perf-rounds: 0 must be >= 1"),
        (["--model-dir", str(tmp_path / "none")], "does not exist"),
    ]:
        proc = run_pytest(*args, "--results-dir", tmp_path, timeout=120)
        assert proc.returncode == 4, (args, proc.stdout[-1000:], proc.stderr[-1000:])
        assert message in proc.stderr, (args, proc.stderr[-1000:])
    assert not list(tmp_path.glob("*.csv"))
