"""Ranks from torchrun's environment instead of the runtime's own worker group."""
import json
import os
import subprocess
import sys
from pathlib import Path

from starcoder_tp.testing.runners import HFRunner

REPO = Path(__file__).resolve().parent.parent


def test_torchrun_two_ranks_match_transformers(embedded_dir, prompts):
    ids_file = Path(os.environ["STARCODER_TP_CACHE"]) / "torchrun_ids.json"
    ids_file.write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "starcoder_tp", "generate", "--model-dir", str(embedded_dir), "--input-ids-file", str(ids_file),
           "--max-new-tokens", "24", "--ignore-eos", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout)  # only rank 0 prints
    assert payload["output_ids"] == HFRunner(embedded_dir).generate_greedy(prompts, 24).output_ids


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_match_the_single_node_run(embedded_dir, prompts, tmp_path):
    """2 nodes × 1 rank: two torchrun processes with --node-rank 0/1, c10d rendezvous on 127.0.0.1."""
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(prompts))
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", "starcoder-tp-test", "-m", "starcoder_tp", "generate", "--model-dir", str(embedded_dir),
               "--input-ids-file", str(ids_file), "--max-new-tokens", "24", "--ignore-eos", "--json", "--rank-timeout", "120"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                      env={**os.environ, "PYTHONPATH": str(REPO)}))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    payloads = [json.loads(out) for out, _ in outputs if out.strip()]
    assert len(payloads) == 1  # only global rank 0 prints
    assert payloads[0]["output_ids"] == HFRunner(embedded_dir).generate_greedy(prompts, 24).output_ids


def test_bench_over_two_torchrun_nodes_on_loopback_writes_one_csv(embedded_dir, tmp_path):
    """`torchrun ... -m starcoder_tp bench`: every rank runs the grid in step, global rank 0
    alone writes the CSV (one row per case, world size from torchrun) and prints the summary."""
    endpoint = f"127.0.0.1:{free_port()}"
    results = tmp_path / "results"
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", "starcoder-tp-bench", "-m", "starcoder_tp", "bench", "--model-dir", str(embedded_dir),
               "--multicase", "1", "--batch-sizes", "1,2", "--seq-in", "16", "--seq-out", "8", "--perf-rounds", "2",
               "--results-dir", str(results), "--rank-timeout", "120"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                      env={**os.environ, "PYTHONPATH": str(REPO)}))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert sum("CSV:" in out for out, _ in outputs) == 1, "only global rank 0 reports"
    csvs = list(results.glob("*.csv"))
    assert len(csvs) == 1, csvs
    import csv

    rows = list(csv.DictReader(open(csvs[0])))
    assert [(r["Batch"], r["Input_seq_len"], r["Output_seq_len"]) for r in rows] == [("1", "16", "8"), ("2", "16", "8")]
    assert {r["world_size"] for r in rows} == {"2"} and {r["rounds"] for r in rows} == {"2"}
    assert all(float(r["first_token_time(ms)"]) > 0 and float(r["avg_token_time(ms)"]) > 0 for r in rows)
    assert all(len(r["peak_memory_mb_per_rank"].split(";")) == 2 for r in rows), rows[0]["peak_memory_mb_per_rank"]
