"""Where a step's time goes, for the speed targets that are missed: a per-operator profile
(torch.profiler) of one prefill and of decode steps of our runtime at world size 1 on one thread,
each matmul's achieved GFLOP/s against the machine's matmul peak; then, at the decode shapes,
every matmul kernel the libraries offer side by side (is there a faster one we do not use?);
and, with --compile, the torch.compile lever on a static-shape decode step.

- profile: the model as the perf suite runs it (pre-packed weights, no mask without padding).
- kernels, per weight shape [N, K] of the model, M = batch rows, `n_layer` copies of the weight
  rotated so that it comes from memory as in the model, not from the cache: `F.linear` (MKL),
  oneDNN packed for M=1 (what linear.py uses) and for M=batch, MKL's packed sgemm.
- compile (fp32 only): the runtime's `--compile` lever, the fixed-shape decode step (`forward` with a tensor slot
  torch.compile needs) eager and compiled by `compile_decode`, against the eager runtime step,
  with the compile time and a check that all three give the same tokens.

Run: python benchmarks/profile_step.py [--model bench|embedded|DIR] [--batches 1,16] [--compile]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import best_s, machine_limits  # noqa: E402
from speed import cpu_name, write_results  # noqa: E402

from starcoder_tp import gemv, panels, rowdot  # noqa: E402
from starcoder_tp.malloc import as_a_cpu_rank  # noqa: E402
from starcoder_tp.comm import TPGroup  # noqa: E402
from starcoder_tp.device import Device  # noqa: E402
from starcoder_tp.files import EMBEDDED_MODEL_DIR  # noqa: E402
from starcoder_tp.model import TPCausalLM, load_model  # noqa: E402
from starcoder_tp.shard import ensure_shards  # noqa: E402
from starcoder_tp.testing.build_models import build_bench  # noqa: E402
from starcoder_tp.timing import timed_generate  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear")
# Kernels torch's profiler does not see (numpy's BLAS; our rowdot.c and panels.c through ctypes),
# by event name: recorded by profiled_ours.
OURS = {"gemv::sgemv": gemv, "rowdot::rowdot": rowdot, "panels::panels": panels}


@contextlib.contextmanager
def profiled_ours():
    """The calls of OURS's modules (kernels.py's `gemv`, `rowdot` and `panels`) as profiler events
    named by OURS plus the shapes, "[M, K] x [N, K]": torch's profiler records torch's operators
    only, and left them out of the step's matmuls. A call gemv or rowdot pass to F.linear is
    torch's own, which the profiler sees."""
    reals = {name: module.linear for name, module in OURS.items()}

    def recording(name, module, real):
        def recorded(x: torch.Tensor, weight: torch.Tensor, *rest) -> torch.Tensor:
            if module is panels:
                n, k = panels.shape_of(weight)
            elif x.numel() != x.shape[-1] or not module.supports(weight) or x.dtype != weight.dtype:
                return real(x, weight, *rest)
            else:
                n, k = weight.shape
            with record_function(f"{name} [{x.numel() // k}, {k}] x [{n}, {k}]"):
                return real(x, weight, *rest)
        return recorded
    for name, module in OURS.items():
        module.linear = recording(name, module, reals[name])
    try:
        yield
    finally:
        for name, module in OURS.items():
            module.linear = reals[name]


def is_matmul(name: str) -> bool:
    return name in MATMULS or name.startswith(tuple(OURS))


def matmul_flops(name: str, shapes: list) -> float:
    """FLOPs of one call of a matmul operator, from the profiler's input shapes (our kernels' from
    their names)."""
    if name.startswith(tuple(OURS)):
        m, _, n, k = (int(v) for v in re.fullmatch(r".* \[(\d+), (\d+)\] x \[(\d+), (\d+)\]", name).groups())
        return 2.0 * m * n * k
    if name == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
    elif name == "aten::addmm":
        (m, k), (_, n) = shapes[1], shapes[2]
    elif name == "mkl::_mkl_linear":  # x [..., K], MKL's packed buffer [bytes, 1], sizes [N, K]
        m, k, n = math.prod(shapes[0][:-1]), shapes[0][-1], shapes[2][0]
    else:  # x [..., K], weight [N, K]
        m, k, n = math.prod(shapes[0][:-1]), shapes[0][-1], shapes[1][0]
    return 2.0 * m * k * n


def profile_rows(model: TPCausalLM, batch: int, seq_in: int, steps: int, peak: float) -> tuple[list[str], dict]:
    """Markdown rows (operator, shape, ms per step, share, GFLOP/s, % of peak) for the prefill
    and for a decode step, and the totals."""
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq_in), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq_in).expand(batch, seq_in)
    model.setup_cache(batch, seq_in + steps + 8)
    token = ids[:, -1:]

    def decode(i: int) -> None:
        model.pick_greedy(model(token, torch.full((batch, 1), seq_in + i), seq_in + i))

    rows, totals = [], {}
    with torch.inference_mode():
        model(ids, pos, 0)  # warm: kernel selection at these shapes
        for i in range(3):
            decode(i)
        for phase, fn, count in (("prefill", lambda: model.pick_greedy(model(ids, pos, 0)), 1),
                                 ("decode", lambda: [decode(3 + i) for i in range(steps)], steps)):
            with profiled_ours(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                started = time.perf_counter()
                fn()
                wall_ms = (time.perf_counter() - started) * 1e3 / count
            events = prof.key_averages(group_by_input_shape=True)
            total_us = sum(e.self_cpu_time_total for e in events) / count
            mm_us = mm_flops = 0.0
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total):
                us = e.self_cpu_time_total / count
                if us < 0.01 * total_us:
                    continue
                shape = " x ".join(str(list(s)) for s in e.input_shapes if s)
                cells = ["", ""]
                if is_matmul(e.key):
                    flops = matmul_flops(e.key, e.input_shapes) * e.count / count
                    gflops = flops / (us * 1e3)
                    cells = [f"{gflops:.1f}", f"{gflops / peak:.0%}"]
                rows.append(f"| {phase} | `{e.key}` | {shape} | {us / 1e3:.2f} | {us / total_us:.0%} | " + " | ".join(cells) + " |")
            for e in events:
                if is_matmul(e.key):
                    mm_us += e.self_cpu_time_total / count
                    mm_flops += matmul_flops(e.key, e.input_shapes) * e.count / count
            totals[phase] = {"wall_ms": wall_ms, "profiled_ms": total_us / 1e3, "matmul_share": mm_us / total_us,
                             "matmul_gflops": mm_flops / (mm_us * 1e3)}
    return rows, totals


def kernel_rows(model: TPCausalLM, batch: int, dtype: torch.dtype) -> list[str]:
    """Every matmul kernel at hand, at this batch's decode shapes: µs per call and GFLOP/s."""
    c = model.config
    kv = 2 * c.n_kv_head * c.head_dim
    shapes = [(c.n_embd + kv, c.n_embd), (c.n_embd, c.n_embd), (c.n_inner, c.n_embd), (c.n_embd, c.n_inner),
              (c.padded_vocab_size(1), c.n_embd)]
    rows = []
    for n, k in shapes:
        copies = 1 if n == c.padded_vocab_size(1) else c.n_layer
        weights = [torch.randn(n, k).to(dtype) for _ in range(copies)]
        x, bias = torch.randn(batch, k).to(dtype), torch.randn(n).to(dtype)
        kernels = {"F.linear": lambda w: F.linear(x, w, bias)}
        for rows_hint, label in ((1, "oneDNN packed (M=1)"), (batch, f"oneDNN packed (M={batch})")):
            try:
                packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, rows_hint) for w in weights}
            except RuntimeError:
                continue
            kernels[label] = (lambda p: lambda w: torch.ops.mkldnn._linear_pointwise(x, p[id(w)], bias, "none", [], ""))(packed)
        if batch == 1 and gemv.supports(weights[0]):
            kernels["gemv (numpy sgemv)"] = lambda w: gemv.linear(x, w, bias)
        if batch == 1 and rowdot.supports(weights[0]):
            kernels[f"rowdot ({rowdot.path()})"] = lambda w: rowdot.linear(x, w, bias)
        if batch > 1 and panels.supports(weights[0]):
            in_panels = {id(w): panels.pack(w) for w in weights}
            kernels["panels"] = lambda w: panels.linear(x, in_panels[id(w)], bias)
        if dtype == torch.float32 and torch._C.has_mkl:
            packed_mkl = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, batch) for w in weights}
            kernels["MKL packed"] = lambda w: torch.ops.mkl._mkl_linear(x, packed_mkl[id(w)], w, bias, batch)
        cells = []
        for label, kernel in kernels.items():
            us = best_s(lambda: [kernel(w) for w in weights], 7) * 1e6 / copies  # the best of 7: least disturbed
            cells.append(f"{label} {us:.0f} µs ({2 * batch * n * k / (us * 1e3):.1f} GFLOP/s)")
        rows.append(f"| {batch} | [{n} x {k}] | " + "; ".join(cells) + " |")
    return rows


def compile_rows(shard_dir: Path, batches: list[int], seq_in: int, steps: int) -> list[str]:
    """The runtime's `--compile` lever, through `timed_generate` as the runtime runs it: the eager
    step (pre-packed weights), the fixed-shape step (`forward` with a tensor slot) run eagerly (plain weights,
    whole cache masked) and that step compiled by `compile_decode` (inductor, freezing)."""
    rows = []
    for batch in batches:
        prompts = torch.randint(1, 1000, (batch, seq_in), generator=torch.Generator().manual_seed(0)).tolist()
        models = {"runtime": load_model(shard_dir, TPGroup(0, 1), torch.device("cpu")),
                  "static": load_model(shard_dir, TPGroup(0, 1), torch.device("cpu"), kernels="plain"),
                  "compiled": load_model(shard_dir, TPGroup(0, 1), torch.device("cpu"), compile=True)}
        models["static"].compiled_decode = models["static"].forward  # the fixed-shape step, not compiled
        warm_s, decode_ms, ids = {}, {label: [] for label in models}, {}
        for label, model in models.items():
            started = time.perf_counter()
            timed_generate(model, Device("cpu"), prompts, 4)  # warm-up; compiles the compiled one
            warm_s[label] = time.perf_counter() - started
        for _ in range(3):  # round-robin, so that the machine's drift hits all three alike
            for label, model in models.items():
                result = timed_generate(model, Device("cpu"), prompts, steps)
                decode_ms[label] += result.decode_ms
                ids[label] = result.output_ids
        measured = {label: (statistics.median(decode_ms[label]), warm_s[label], ids[label]) for label in models}
        (runtime_ms, runtime_s, runtime_ids), (static_ms, _, static_ids), (comp_ms, comp_s, comp_ids) = (
            measured["runtime"], measured["static"], measured["compiled"])
        same = "yes" if torch.equal(runtime_ids, static_ids) and torch.equal(static_ids, comp_ids) else "NO"
        rows.append(f"| {batch} | {runtime_ms:.2f} | {static_ms:.2f} | {comp_ms:.2f} | {comp_ms / runtime_ms:.2f} | "
                    f"{comp_s - runtime_s:.1f} | {same} |")
        del models
        torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench, embedded or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="Default: %(default)r")
    parser.add_argument("--batches", default="1,16", help="Default: %(default)r")
    parser.add_argument("--seq-in", type=int, default=128, help="Default: %(default)r")
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled. Default: %(default)r")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of a static decode step")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches: {args.batches!r} is not a comma-separated list of positive integers")
    model_dir = {"bench": lambda: str(build_bench()), "embedded": lambda: str(EMBEDDED_MODEL_DIR)}.get(
        args.model, lambda: args.model)()
    as_a_cpu_rank()  # allocator and 2 MiB pages as a rank's, before the first large block
    torch.set_num_threads(1)
    started = time.perf_counter()
    limits = machine_limits([args.dtype], threads=[1])
    torch.set_num_threads(1)
    peak = limits.peak(args.dtype, 1)
    shard_dir = ensure_shards(model_dir, 1, args.dtype)
    model = load_model(shard_dir, TPGroup(0, 1), torch.device("cpu"))
    compile_lines = []
    if args.compile and args.dtype == "float32":
        # First, in a process not yet touched by the profiler, interleaved (see compile_rows).
        print("[profile] --compile: torch.compile of the decode step (compiling takes a while)", flush=True)
        compile_lines = compile_rows(shard_dir, batches, args.seq_in, args.steps)
    profile_lines, kernel_lines, summary = [], [], []
    for batch in batches:
        print(f"[profile] batch {batch}: prefill of {args.seq_in} tokens and {args.steps} decode steps", flush=True)
        rows, totals = profile_rows(model, batch, args.seq_in, args.steps, peak)
        profile_lines += [r.replace("| prefill |", f"| {batch} | prefill |").replace("| decode |", f"| {batch} | decode |")
                          for r in rows]
        for phase, t in totals.items():
            summary.append(f"| {batch} | {phase} | {t['wall_ms']:.1f} | {t['matmul_share']:.0%} | "
                           f"{t['matmul_gflops']:.1f} | {t['matmul_gflops'] / peak:.0%} |")
        print(f"[profile] batch {batch}: matmul kernels at the decode shapes", flush=True)
        kernel_lines += kernel_rows(model, batch, getattr(torch, args.dtype))
    title = {"bench": "bench-size model", "embedded": "embedded model"}.get(args.model, model_dir)
    title = f"profile: {title}, {args.dtype}" + (f", input {args.seq_in}" if args.seq_in != 128 else "")
    c = model.config
    text = "\n".join([
        f"## {title}", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/profile_step.py` in "
        f"{time.perf_counter() - started:.0f} s. Machine: {cpu_name()}, torch {torch.__version__}; one thread. "
        f"Model: `{model_dir}` ({c.n_layer} layers, n_embd {c.n_embd}). Matmul peak = the fastest kernel of "
        f"benchmarks/roofline.py at 2048³, one thread: {peak:.1f} GFLOP/s. {limits.describe()}", "",
        f"Summary (input {args.seq_in}): wall ms of one prefill / one decode step (profiler on), the matmuls' share "
        "of the operator time and their throughput.", "",
        "| batch | phase | ms | matmul share | matmul GFLOP/s | of peak |", "|---|---|---|---|---|---|", *summary, "",
        "Operators above 1% of the time (self time per step):", "",
        "| batch | phase | operator | input shapes | ms | share | GFLOP/s | of peak |", "|---|---|---|---|---|---|---|---|",
        *profile_lines, "",
        "Matmul kernels at the decode shapes (weights rotated over the layers' copies, as the model reads them):", "",
        "| M | weight | kernels |", "|---|---|---|", *kernel_lines, "",
    ] + ([
        "`--compile` (torch.compile, inductor, freezing) of the static-shape decode step, through `timed_generate` "
        "as the runtime runs it, median decode ms: the runtime's eager step (pre-packed weights, attention over the "
        "filled slots), the fixed-shape step run eagerly (plain weights, attention over the whole cache "
        "with a mask) and compiled, 3 generations each, round-robin; the compiled model's extra seconds in its warm-up generation (compiling); and "
        "whether the three gave the same tokens:", "",
        "| batch | runtime eager | static eager | static compiled | compiled/runtime | compile s | same tokens |",
        "|---|---|---|---|---|---|---|", *compile_lines, "",
    ] if compile_lines else []))
    write_results(title, text)
    print(text)


if __name__ == "__main__":
    main()
