"""The perf suite end to end, as a user runs it: `pytest tests_perf ...` in a subprocess."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_pytest(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "pytest", "tests_perf", "-p", "no:cacheprovider", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_small_grid_writes_csv_json_heatmaps_and_summary(tmp_path):
    proc = run_pytest("--batch-sizes", "1,2", "--seq-in", "16,1024", "--seq-out", "6", "--perf-rounds", "3",
                      "--results-dir", tmp_path, "--model-name", "tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout
    with open(tmp_path / "multibatch_performance_tiny_0.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["Batch"], r["Input_seq_len"], r["Output_seq_len"]) for r in rows] == [
        ("1", "16", "6"), ("1", "1024", "6"), ("2", "16", "6"), ("2", "1024", "6")]
    assert all(r["rounds"] == "3" and len(r["first_token_ms_rounds"].split(";")) == 3 for r in rows)
    for batch in ("1", "2"):
        # The first-token clock covers the prefill: 64x the tokens (and more than 64x the
        # attention work) take longer, by a margin no machine's noise reaches (medians of 3).
        first = {r["Input_seq_len"]: float(r["first_token_time(ms)"]) for r in rows if r["Batch"] == batch}
        assert first["1024"] > first["16"], first
    bench = json.loads((tmp_path / "benchmark_tiny_0.json").read_text())
    names = sorted(b["name"] for b in bench["benchmarks"])
    assert names == ["test_latency[bs1-in1024-out6]", "test_latency[bs1-in16-out6]",
                     "test_latency[bs2-in1024-out6]", "test_latency[bs2-in16-out6]"]
    assert all(b["extra_info"]["first_token_ms"] > 0 and b["extra_info"]["decode_ms_per_token"] > 0
               and b["stats"]["rounds"] == 3 for b in bench["benchmarks"])
    assert (tmp_path / "heatmap_bs1_tiny_0.png").is_file() and (tmp_path / "heatmap_bs2_tiny_0.png").is_file()
    assert all(r["cpu_model"] and r["cores"] and r["torch_version"] and r["side"] == "" for r in rows)
    assert "batch 1 headline (the Ascend guide's row)" in proc.stdout
    assert "set-up: shard" in proc.stdout

    # -k selects by id, and --perf-resume skips what the CSV already holds: a complete grid is a success.
    proc = run_pytest("--batch-sizes", "1,2", "--seq-in", "16,1024", "--seq-out", "6", "--results-dir", tmp_path,
                      "--model-name", "tiny", "--perf-resume", "-k", "bs2-")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "4 deselected" in proc.stdout and "4 of 4 case(s) already measured" in proc.stdout, proc.stdout[-2000:]
    assert len(list(csv.DictReader(open(tmp_path / "multibatch_performance_tiny_0.csv")))) == 4
    # Resumed with new cases: the JSON keeps the earlier cases next to the new ones, as the CSV does.
    proc = run_pytest("--batch-sizes", "1", "--seq-in", "16,32", "--seq-out", "6", "--results-dir", tmp_path,
                      "--model-name", "tiny", "--perf-resume")
    assert proc.returncode == 0 and "1 of 2 case(s) already measured" in proc.stdout, proc.stdout[-2000:]
    bench = json.loads((tmp_path / "benchmark_tiny_0.json").read_text())
    assert sorted(b["name"] for b in bench["benchmarks"]) == [
        "test_latency[bs1-in1024-out6]", "test_latency[bs1-in16-out6]", "test_latency[bs1-in32-out6]",
        "test_latency[bs2-in1024-out6]", "test_latency[bs2-in16-out6]"]
    assert len(list(csv.DictReader(open(tmp_path / "multibatch_performance_tiny_0.csv")))) == 5


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


def test_a_results_dir_that_is_a_file_or_empty_is_refused_at_start_up(tmp_path):
    (tmp_path / "a_file").write_text("kept")
    for value, message in [(tmp_path / "a_file", f"'{tmp_path / 'a_file'}' exists and is not a folder"),
                           ("", "'' is empty")]:
        proc = run_pytest("--results-dir", value, timeout=120)
        assert proc.returncode == 4, (value, proc.stdout[-1000:], proc.stderr[-1000:])
        assert f"argument --results-dir: {message}" in proc.stderr, proc.stderr[-1000:]
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "a_file").read_text() == "kept" and not list(REPO.glob("*.csv"))


def test_a_device_or_allocator_the_ranks_cannot_use_stops_the_run_at_start_up(tmp_path):
    """Found at collection, in one line, not once per case when each case's ranks fail to start."""
    import torch

    if torch.cuda.is_available():
        device, message = ["--device", "cuda", "--device-id", "64"], "needs devices 64..65"
    else:
        device, message = ["--device", "cuda"], "--device cuda: no cuda device is available on this machine"
    for args, env, message in [(device, {}, message),
                               ([], {"STARCODER_TP_MALLOC": "bogus"}, "STARCODER_TP_MALLOC='bogus': expected one of")]:
        proc = run_pytest(*args, "--batch-sizes", "1", "--results-dir", tmp_path, timeout=120, env=env)
        assert proc.returncode == 4, (args, env, proc.stdout[-1000:], proc.stderr[-1000:])
        assert message in proc.stderr and "Traceback" not in proc.stdout + proc.stderr, (args, env, proc.stderr[-1000:])
    assert not list(tmp_path.glob("*.csv"))


def test_benchmark_json_goes_where_benchmark_json_says(tmp_path):
    proc = run_pytest("--batch-sizes", "1", "--seq-in", "8", "--seq-out", "4", "--results-dir", tmp_path / "r",
                      "--benchmark-json", tmp_path / "elsewhere.json")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((tmp_path / "elsewhere.json").read_text())["benchmarks"][0]["name"] == "test_latency[bs1-in8-out4]"
    assert not (tmp_path / "r" / "benchmark_starcoder_0.json").exists()
    assert f"pytest-benchmark JSON: {tmp_path / 'elsewhere.json'}" in proc.stdout


def test_ctrl_c_tears_the_ranks_down_and_keeps_the_rows(tmp_path, reap):
    """Ctrl-C as soon as two rows are written: the third case, 300 decode steps of >= 20 ms each
    by construction, is then starting or running on any machine."""
    import signal
    import time

    import psutil

    proc = reap(subprocess.Popen([sys.executable, "-m", "pytest", "tests_perf", "-p", "no:cacheprovider",
                                  "--batch-sizes", "1", "--seq-in", "16", "--seq-out", "4,8,300",
                                  # no warm-up: the third case goes straight into its measured rounds
                                  "--perf-warmup", "0", "--perf-rounds", "2",
                                  "--inject-decode-delay-ms", "20", "--results-dir", str(tmp_path)],
                                 cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 # A test run started in the background of a script inherits SIGINT
                                 # ignored, and Python keeps it so: give pytest a terminal's Ctrl-C.
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
    csv_file = tmp_path / "multibatch_performance_starcoder_0.csv"
    deadline = time.monotonic() + 120
    while not csv_file.is_file() or len(csv_file.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, "two rows never came"
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2, "the ranks should be running"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    output, _ = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in output, output[-2000:]
    assert "3 passed" not in output, output[-2000:]  # the interrupt came before the grid ended
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"ranks left running after Ctrl-C: {alive}"
    rows = list(csv.DictReader(open(csv_file)))
    assert len(rows) == 2 and all(float(r["first_token_time(ms)"]) > 0 for r in rows)
    # The finished cases' JSON and summary are written, without a traceback from the interrupted one.
    assert "Traceback" not in output and "starcoder-tp performance" in output, output[-3000:]
    bench = json.loads((tmp_path / "benchmark_starcoder_0.json").read_text())
    assert [b["name"] for b in bench["benchmarks"]] == ["test_latency[bs1-in16-out4]", "test_latency[bs1-in16-out8]"]


def test_a_benchmark_interrupted_before_its_first_round_is_left_out():
    """pytest-benchmark fails on a benchmark of no round (min() of nothing) and then writes no JSON."""
    from types import SimpleNamespace

    from starcoder_tp.suite.pytest_plugin import drop_unmeasured_benchmarks

    done, interrupted = SimpleNamespace(stats=[70.9]), SimpleNamespace(stats=[])  # Stats is falsy without data
    session = SimpleNamespace(benchmarks=[done, interrupted])
    drop_unmeasured_benchmarks(session)
    assert session.benchmarks == [done]
    drop_unmeasured_benchmarks(None)  # no pytest-benchmark session: nothing to do
