"""What `--kernels auto` chooses on this machine, from which timings, and how long choosing takes.

For each dtype and decode batch, a world-size-1 model (one thread, as one rank of the suite)
measures its plan from scratch (an empty plan cache), as the first run on a new machine does;
the table gives every weight shape's candidate timings (ms per call, the slowest rank's median:
decode at the batch's rows, prefill at kernels.SHORT_ROWS and PREFILL_ROWS rows; a candidate
pruned after its probe call shows that call's time), the choice by the decode step alone (a call
without a request), and the choice weighed for the perf suite's request at that batch (`--request`
prompt tokens and new tokens per sequence: the layouts a case of that shape runs, kernels.weigh).

Run: python benchmarks/kernel_plan.py [--model bench|embedded|DIR] [--dtypes float32,bfloat16]
     [--batches 1,4,16] [--request 128,32]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from starcoder_tp import kernels
from starcoder_tp.comm import TPGroup
from starcoder_tp.cpu import cpuinfo, isa_flags
from starcoder_tp.files import CACHE_ENV, EMBEDDED_MODEL_DIR
from starcoder_tp.model import load_model
from starcoder_tp.shard import ensure_shards
from starcoder_tp.testing.build_models import build_bench


def _ms(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(timings.items(), key=lambda kv: kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench, embedded or a checkpoint dir. Default: %(default)r")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--request", default="128,32", help="prompt tokens,new tokens. Default: %(default)r")
    args = parser.parse_args()
    model_dir = {"bench": lambda: str(build_bench()), "embedded": lambda: str(EMBEDDED_MODEL_DIR)}.get(
        args.model, lambda: args.model)()
    seq_in, seq_out = (int(v) for v in args.request.split(","))
    torch.set_num_threads(1)
    print(f"Machine: {cpuinfo()[0]}; {isa_flags()}; torch {torch.__version__}, one thread. Model: {model_dir}\n")
    for dtype in args.dtypes.split(","):
        shards = ensure_shards(model_dir, 1, dtype, log=lambda m: None)
        model = load_model(shards, TPGroup(0, 1), torch.device("cpu"), kernels="plain")
        for batch in (int(b) for b in args.batches.split(",")):
            with tempfile.TemporaryDirectory() as empty_cache:
                saved = os.environ.get(CACHE_ENV)
                os.environ[CACHE_ENV] = empty_cache  # a first run on this machine: nothing cached
                try:
                    started = time.perf_counter()
                    with torch.inference_mode():
                        model.use_kernels("auto", batch)
                    took = time.perf_counter() - started
                finally:
                    if saved is None:
                        os.environ.pop(CACHE_ENV)
                    else:
                        os.environ[CACHE_ENV] = saved
            print(f"{dtype}, batch {batch}: plan measured in {took:.2f} s\n")
            print("| weight | decode ms (batch rows) | short prefill ms (64 rows) | long prefill ms (512 rows) | "
                  f"choice (decode / short / long) | weighed for in={seq_in}, out={seq_out} |\n|---|---|---|---|---|---|")
            for shape, c in sorted(model.kernel_plan.items()):
                w = kernels.weigh(c, batch * seq_in, seq_out - 1)
                print(f"| {shape} | {_ms(c.decode_ms)} | {_ms(c.short_ms) or '-'} | {_ms(c.prefill_ms) or '-'} | "
                      f"{c.decode} / {c.short} / {c.prefill} | {w.decode} / {w.short} / {w.prefill} |")
            print()


if __name__ == "__main__":
    main()
