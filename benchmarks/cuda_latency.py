"""The first accelerator run, as one script: parity with transformers on the device, the nccl
backend at world size 1, and StarCoder-15.5B-shaped latency against transformers.

- parity: our world size 1 against transformers `generate`, both on the device, on the embedded
  and the bench-size model, 64 new tokens: fp32 tokens identical, bf16 under vLLM's top-5 rule.
- nccl (cuda) / hccl (npu): a process group of one initialised, an all-reduce and a barrier.
  World size 2 needs two devices (nccl refuses two ranks on one), so TP=2 stays unmeasured here.
- latency: StarCoder 15.5B's width (n_embd 6144, 48 heads, MQA, vocabulary 49152, 8192
  positions, MLP 24576) with --layers of its 40 layers, random weights in bf16, written once
  into the cache as a Hugging Face checkpoint. Cases batch 1 and 16 x in 128 and 1024 x out 64:
  first token and decode ms (median step) for transformers `generate`, ours eager and ours
  `--compile` (CUDA graphs at world size 1), measured round-robin per case. Bounds: decode =
  the bytes of a step (weights + KV cache) at the measured device-to-device copy bandwidth;
  prefill = its FLOPs at the measured bf16 GEMM peak.

--device cpu --scale small runs every step at toy size, to try the script where no accelerator is.
Run: python benchmarks/cuda_latency.py --device cuda [--write]    (benchmarks/device_check.sh runs it)
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from speed import decode_bytes, matmul_params, prefill_flops, write_results  # benchmarks/ is on the path
from starcoder_tp.config import ModelConfig
from starcoder_tp.device import Device
from starcoder_tp.files import EMBEDDED_MODEL_DIR, cache_dir, write_atomic
from starcoder_tp.shard import ensure_shards
from starcoder_tp.suite.perf import Case, CaseResult, PerfOptions, PerfRunner, make_prompts
from starcoder_tp.testing.build_models import build_bench
from starcoder_tp.testing.compare import check_topk_close
from starcoder_tp.testing.runners import HFRunner, TPRunner

# StarCoder 15.5B (bigcode/starcoder config.json) and a toy of the same family for --scale small.
SHAPES = {
    "full": dict(n_embd=6144, n_head=48, n_inner=24576, vocab_size=49152, n_positions=8192, full_layers=40),
    "small": dict(n_embd=256, n_head=8, n_inner=1024, vocab_size=6144, n_positions=2048, full_layers=4),
}
DEFAULT_CASES = {"full": "1:128:64,16:128:64,1:1024:64,16:1024:64", "small": "1:32:8,4:32:8,1:128:8,4:128:8"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return min(times)


def device_limits(device: torch.device, scale: str) -> dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + written) and the bf16 GEMM peak (TFLOP/s) of the device."""
    n = (1 << 30) if scale == "full" else (64 << 20)  # bytes copied
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * n / best_seconds(lambda: dst.copy_(src), device) / 1e9
    del src, dst
    size = 8192 if scale == "full" else 1024
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    gemm_tflops = 2 * size ** 3 / best_seconds(lambda: a @ b, device) / 1e12
    return {"copy_gbs": copy_gbs, "gemm_bf16_tflops": gemm_tflops}


def check_backend(device: Device) -> str:
    """A process group of one on the device's backend: init, all-reduce, barrier, destroy."""
    import torch.distributed as dist

    torch_device = device.bind(0)
    store = dist.HashStore()
    dist.init_process_group(device.backend, store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        t = torch.ones(4, device=torch_device)
        dist.all_reduce(t)
        dist.barrier()
        sync(torch_device)
        if t.tolist() != [1.0] * 4:
            raise RuntimeError(f"{device.backend} all-reduce over one rank changed the tensor: {t.tolist()}")
    finally:
        dist.destroy_process_group()
    return f"{device.backend}: a group of 1 initialised, all-reduce and barrier ok"


def parity(device: Device, model_dirs: dict[str, str]) -> list[str]:
    """Our world size 1 against transformers on the device; a line per model and dtype, 'FAIL' on a mismatch."""
    lines = []
    for name, model_dir in model_dirs.items():
        vocab = ModelConfig.from_dir(model_dir).vocab_size
        prompts = make_prompts(Case(4, 24, 64), vocab)
        prompts = [p[: 24 - 4 * i] for i, p in enumerate(prompts)]  # ragged: the left-padded path too
        for dtype in ("float32", "bfloat16"):
            try:
                reference = HFRunner(model_dir, dtype, str(device.torch_device(0))).generate_greedy(prompts, 64, topk=5)
                runner = TPRunner(ensure_shards(model_dir, 1, dtype, log=lambda m: None), 1, device)
                try:
                    ours = runner.generate_greedy(prompts, 64, topk=5)
                finally:
                    runner.close()
                if dtype == "float32":
                    same = sum(a == b for r, o in zip(reference.output_ids, ours.output_ids) for a, b in zip(r, o))
                    total = sum(len(r) for r in reference.output_ids)
                    verdict = "ok" if reference.output_ids == ours.output_ids else "FAIL"
                    lines.append(f"{name} float32: {same}/{total} tokens identical to transformers: {verdict}")
                else:
                    firsts = check_topk_close(outputs_0=reference, outputs_1=ours, name_0="transformers", name_1="ours")
                    lines.append(f"{name} bfloat16: top-5 rule holds; identical prefix per prompt {firsts} of 64: ok")
            except Exception as err:  # a failure is a finding: report it and go on to the next
                lines.append(f"{name} {dtype}: FAIL {type(err).__name__}: {str(err).splitlines()[0][:300]}")
                traceback.print_exc()
    return lines


def build_checkpoint(scale: str, layers: int, device: torch.device) -> Path:
    """The 15.5B-shaped checkpoint with `layers` layers, random bf16 weights; written once (atomically)."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    shape = SHAPES[scale]
    out = cache_dir() / "models" / f"starcoder-15b-shaped-{scale}-L{layers}-bf16"
    if (out / "config.json").is_file():
        return out
    config = GPTBigCodeConfig(n_embd=shape["n_embd"], n_head=shape["n_head"], n_inner=shape["n_inner"],
                              vocab_size=shape["vocab_size"], n_positions=shape["n_positions"], n_layer=layers,
                              multi_query=True, activation_function="gelu_pytorch_tanh",
                              bos_token_id=0, eos_token_id=0, dtype="bfloat16")
    torch.manual_seed(0)
    started = time.perf_counter()
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # random init on the device: seconds, not minutes on the host
            model = GPTBigCodeForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="2GB")
    del model
    tmp.rename(out)
    print(f"[cuda_latency] wrote {out} in {time.perf_counter() - started:.0f}s", flush=True)
    return out


class TransformersTimer:
    """transformers `generate` on the device; each forward's end stamped after a synchronisation."""

    def __init__(self, model_dir: Path, device: torch.device, vocab: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval()
        self.device, self.vocab = device, vocab

    def run_round(self, case: Case) -> tuple[float, list[float]]:
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []
        device = self.device

        class Clock(LogitsProcessor):
            def __call__(self, input_ids, scores):
                sync(device)
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor(make_prompts(case, self.vocab), device=device)
        with torch.inference_mode():
            sync(device)
            started = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=case.seq_out,
                                      min_new_tokens=case.seq_out, do_sample=False,
                                      logits_processor=LogitsProcessorList([Clock()]))
        if tuple(out.shape) != (case.batch, case.seq_in + case.seq_out):
            raise RuntimeError(f"transformers {case.id}: output shape {tuple(out.shape)}")
        return (stamps[0] - started) * 1e3, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def latency(device: Device, model_dir: Path, cases: list[Case], rounds: int, limits: dict) -> list[dict]:
    config = ModelConfig.from_dir(model_dir)
    torch_device = device.torch_device(0)
    hf = TransformersTimer(model_dir, torch_device, config.vocab_size)

    def options(compile: bool) -> PerfOptions:
        return PerfOptions(model_dir=str(model_dir), device=device.kind, world_size=1, dtype="bfloat16",
                           batch_sizes=tuple(sorted({c.batch for c in cases})),
                           seq_in=tuple(sorted({c.seq_in for c in cases})),
                           seq_out=tuple(sorted({c.seq_out for c in cases})), rounds=rounds,
                           compile=compile, timeout_s=600.0)

    ours = {name: PerfRunner(options(compile), log=lambda m: None).start()
            for name, compile in (("eager", False), ("compiled", True))}
    rows = []
    try:
        for case in cases:
            hf.run_round(case)  # warm-up
            results = {name: CaseResult(case) for name in ours}
            for runner in ours.values():
                runner.warm_up(case)
            firsts, steps = [], []
            for _ in range(rounds):
                first, decode = hf.run_round(case)
                firsts.append(first)
                steps.extend(decode)
                for name, runner in ours.items():
                    runner.run_round(case, results[name])
            row = {"case": case.id, "transformers": (statistics.median(firsts), statistics.median(steps))}
            for name, result in results.items():
                row[name] = (result.first_token_ms, result.decode_ms_percentile(50))
            row["decode_bound_ms"] = decode_bytes(config, case, "bfloat16", 1) / (limits["copy_gbs"] * 1e9) * 1e3
            row["prefill_bound_ms"] = prefill_flops(config, case) / (limits["gemm_bf16_tflops"] * 1e12) * 1e3
            print(f"[cuda_latency] {json.dumps(row)}", flush=True)
            rows.append(row)
    finally:
        for runner in ours.values():
            runner.close()
    return rows


def section(gpu: str, scale: str, layers: int, limits: dict, backend: str, parity_lines: list[str],
            rows: list[dict], config: ModelConfig, wall_s: float) -> str:
    import transformers

    full_layers = SHAPES[scale]["full_layers"]
    weights_gb = (matmul_params(config) + (config.vocab_size + config.n_positions) * config.n_embd) * 2 / 1e9
    lines = [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
             f"`benchmarks/cuda_latency.py` in {wall_s:.0f} s. Device: {gpu}; torch {torch.__version__}, "
             f"transformers {transformers.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}.",
             "",
             f"Limits: device-to-device copy {limits['copy_gbs']:.0f} GB/s (bytes read + written), "
             f"bf16 GEMM {limits['gemm_bf16_tflops']:.1f} TFLOP/s (square, best of 5).", "",
             f"Backend: {backend}. World size 2 needs two devices: TP=2 on this device kind is unmeasured.", "",
             "Parity, world size 1 on the device against transformers on the device, 4 ragged prompts, 64 new tokens:", ""]
    lines += [f"- {line}" for line in parity_lines]
    lines += ["", f"Latency: StarCoder 15.5B's width ({config.shape_id}), {layers} of its {full_layers} layers "
              f"(scaled: layers only; {weights_gb:.1f} GB of bf16 weights, the lm_head tied to the embedding), random "
              "weights, world size 1, bf16, median over rounds; ms first token / decode step. Per layer: the time "
              f"divided by {layers} (the embedding and lm_head included once). Bounds: decode = weights + KV "
              "bytes of a step at the copy bandwidth, prefill = FLOPs at the GEMM peak.", "",
              "| case | transformers | ours eager | ours --compile | decode bound | prefill bound | "
              "per layer: eager first / decode | decode efficiency (bound / eager, compiled) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf, eager, compiled = r["transformers"], r["eager"], r["compiled"]
        lines.append(f"| {r['case']} | {hf[0]:.1f} / {hf[1]:.2f} | {eager[0]:.1f} / {eager[1]:.2f} | "
                     f"{compiled[0]:.1f} / {compiled[1]:.2f} | {r['decode_bound_ms']:.2f} | "
                     f"{r['prefill_bound_ms']:.1f} | {eager[0] / layers:.2f} / {eager[1] / layers:.3f} | "
                     f"{r['decode_bound_ms'] / eager[1]:.0%}, {r['decode_bound_ms'] / compiled[1]:.0%} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "npu", "cpu"], help="Default: %(default)r")
    parser.add_argument("--scale", choices=list(SHAPES), default=None,
                        help="full: StarCoder 15.5B's width; small: a toy (to try the script). Default: full, "
                             "small on cpu")
    parser.add_argument("--layers", type=int, default=None, help="layers of the latency model. Default: 8 (full), 2 (small)")
    parser.add_argument("--cases", default=None, help="batch:seq_in:seq_out,... Default: the issue's four (full)")
    parser.add_argument("--rounds", type=int, default=3, help="Default: %(default)r")
    parser.add_argument("--skip", default="", help="comma-separated parts not to run: parity,backend,latency")
    parser.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    parser.add_argument("--json-out", type=Path, default=None, help="also write every figure as JSON here")
    args = parser.parse_args()
    scale = args.scale or ("small" if args.device == "cpu" else "full")
    layers = args.layers or (8 if scale == "full" else 2)
    if layers < 1 or layers > SHAPES[scale]["full_layers"]:
        raise SystemExit(f"--layers {layers}: must be 1..{SHAPES[scale]['full_layers']}")
    cases = [Case(*map(int, item.split(":"))) for item in (args.cases or DEFAULT_CASES[scale]).split(",")]
    skip = set(filter(None, args.skip.split(",")))
    device = Device(args.device)
    device.check_available(1)
    torch_device = device.bind(0)
    gpu = torch.cuda.get_device_name(torch_device) if device.kind == "cuda" else f"{device.kind} ({platform.processor() or platform.machine()})"
    started = time.perf_counter()
    limits = device_limits(torch_device, scale)
    print(f"[cuda_latency] {gpu}: {json.dumps(limits)}", flush=True)
    backend = "not checked" if "backend" in skip else check_backend(device)
    print(f"[cuda_latency] {backend}", flush=True)
    parity_lines = [] if "parity" in skip else parity(device, {"embedded": str(EMBEDDED_MODEL_DIR),
                                                                "bench-size": str(build_bench())})
    for line in parity_lines:
        print(f"[cuda_latency] parity: {line}", flush=True)
    model_dir = build_checkpoint(scale, layers, torch_device)
    rows = [] if "latency" in skip else latency(device, model_dir, cases, args.rounds, limits)
    text = section(gpu, scale, layers, limits, backend, parity_lines, rows, ModelConfig.from_dir(model_dir),
                   time.perf_counter() - started)
    title = f"{device.kind}: StarCoder-15.5B-shaped latency and parity" + ("" if scale == "full" else " (toy size)")
    print(f"\n## {title}\n\n{text}")
    if args.json_out:
        write_atomic(args.json_out, json.dumps({"device": gpu, "limits": limits, "backend": backend,
                                                "parity": parity_lines, "rows": rows}, indent=1))
    if args.write:
        write_results(title, f"## {title}\n\n{text}")
    return 1 if any("FAIL" in line for line in parity_lines) else 0


if __name__ == "__main__":
    sys.exit(main())
