"""What `--kernels auto` chooses on this machine, from which timings, and how long choosing takes.

For each dtype and decode batch, a world-size-1 model (one thread, as one rank of the suite)
measures its plan from scratch (an empty plan cache), as the first run on a new machine does;
the table gives every weight shape's candidate timings (ms per call, the slowest rank's median:
decode at the batch's rows, prefill at kernels.SHORT_ROWS and PREFILL_ROWS rows; a candidate
pruned after its probe calls shows the faster of the two), the choice by the decode step alone (a call
without a request), and the choice weighed for the perf suite's request at that batch (`--request`
prompt tokens and new tokens per sequence: the layouts a case of that shape runs, kernels.weigh).

Two checks of what the decode timings stand for (kernel_timing.decode_copies):
- (last) the read speed of one thread's `F.linear` at one row on a 16 MB fp32 weight, rotated over
  copies of 16 MB to 1 GB: where it stops falling, the weights come from memory, and
  DECODE_SET_BYTES should be at least that;
- the model laid out for the request, its linears' decode timings summed (each in its layout)
  against the model's real decode step (the median of 3 generations of `--request` new tokens
  less a one-token generation, per step): what the timings leave out is attention, norms and
  the greedy pick, so the sum should be somewhat below the step, not far below it.

Run: python benchmarks/kernel_plan.py [--model bench|embedded|DIR] [--dtypes float32,bfloat16]
     [--batches 1,4,16] [--request 128,32]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from starcoder_tp import kernels
from starcoder_tp.malloc import as_a_cpu_rank
from starcoder_tp.comm import TPGroup
from starcoder_tp.cpu import cpu_kind, isa_flags
from starcoder_tp.files import EMBEDDED_MODEL_DIR, cache_at
from starcoder_tp.generate import generate
from starcoder_tp.linear import Linear
from starcoder_tp.model import load_model
from starcoder_tp.shard import ensure_shards
from starcoder_tp.testing.build_models import build_bench


def _ms(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(timings.items(), key=lambda kv: kv[1]))


def _read_gbs(shape: str, ms: float) -> str:
    """The weight's bytes over a call's milliseconds: the read speed a decode call reached."""
    dims, dtype = shape.split(":")
    n, k = (int(v) for v in dims.split("x"))
    return f"{n * k * getattr(torch, dtype).itemsize / ms / 1e6:.1f}"


def rotation_sweep() -> str:
    """GB/s of F.linear at one row on a 16 MB fp32 weight, rotated over copies of 16 MB to 1 GB."""
    x, weights, cells = torch.randn(1, 1024), [torch.randn(4096, 1024) for _ in range(64)], []
    for copies in (1, 2, 4, 8, 16, 32, 64):
        for w in weights[:copies]:
            torch.nn.functional.linear(x, w)
        per_call = []
        for _ in range(max(3, 256 // copies)):
            started = time.perf_counter()
            for w in weights[:copies]:
                torch.nn.functional.linear(x, w)
            per_call.append((time.perf_counter() - started) / copies)
        cells.append(f"{copies * 16} MB: {4096 * 1024 * 4 / statistics.median(per_call) / 1e9:.1f}")
    return "; ".join(cells)


def summed_against_real(model, batch: int, seq_in: int, seq_out: int) -> tuple[float, float]:
    """The laid-out linears' decode timings summed, and the model's real decode step (ms)."""
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(seq_in)] for i in range(batch)]
    with torch.inference_mode():
        generate(model, prompts, seq_out)  # lays the weights out for the request, warms up
        plan = model.kernel_plan
        shapes = [m.shape_key() for m in model.modules() if isinstance(m, Linear)]
        if model.config.tie_word_embeddings:
            shapes.append(model.transformer.wte.shape_key())
        summed = sum(plan[s].decode_ms[plan[s].decode] for s in shapes)
        steps = []
        for _ in range(3):
            started = time.perf_counter()
            generate(model, prompts, 1)
            one = time.perf_counter() - started
            started = time.perf_counter()
            generate(model, prompts, seq_out)
            steps.append((time.perf_counter() - started - one) / (seq_out - 1) * 1e3)
    return summed, statistics.median(steps)


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
    as_a_cpu_rank()  # allocator and 2 MiB pages as a rank's, before the first large block
    torch.set_num_threads(1)
    print(f"Machine: {cpu_kind()}; {isa_flags()}; torch {torch.__version__}, one thread. Model: {model_dir}\n")
    for dtype in args.dtypes.split(","):
        shards = ensure_shards(model_dir, 1, dtype, log=lambda m: None)
        model = load_model(shards, TPGroup(0, 1), torch.device("cpu"), kernels="plain")
        for batch in (int(b) for b in args.batches.split(",")):
            with tempfile.TemporaryDirectory() as empty_cache, cache_at(empty_cache):  # a first run here
                started = time.perf_counter()
                with torch.inference_mode():
                    model.use_kernels("auto", batch)
                took = time.perf_counter() - started
            print(f"{dtype}, batch {batch}: plan measured in {took:.2f} s\n")
            print("| weight | decode ms (batch rows) | fastest decode GB/s | short prefill ms (64 rows) | "
                  f"long prefill ms (512 rows) | choice (decode / short / long) | weighed for in={seq_in}, "
                  f"out={seq_out} |\n|---|---|---|---|---|---|---|")
            for shape, c in sorted(model.kernel_plan.items()):
                w = kernels.weigh(c, batch * seq_in, seq_out - 1)
                print(f"| {shape} | {_ms(c.decode_ms)} | {_read_gbs(shape, min(c.decode_ms.values()))} | "
                      f"{_ms(c.short_ms) or '-'} | {_ms(c.prefill_ms) or '-'} | "
                      f"{c.decode} / {c.short} / {c.prefill} | {w.decode} / {w.short} / {w.prefill} |")
            summed, real = summed_against_real(model, batch, seq_in, seq_out)
            print(f"\nLaid out for in={seq_in}, out={seq_out}: the linears' decode timings summed {summed:.2f} ms, "
                  f"the model's decode step {real:.2f} ms ({summed / real:.0%}).\n")
    # Last: run before the model, its 1 GB of freed tensors left the model's decode step that
    # followed 15% slower in the same process (fp32, batch 1; the cause was not found).
    print(f"F.linear, one row, 16 MB fp32 weight rotated over (GB/s): {rotation_sweep()}")


if __name__ == "__main__":
    main()
