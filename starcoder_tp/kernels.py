"""Each linear weight's kernel, chosen by timing the candidates on the machine at hand.

Which kernel is fastest for a weight depends on the CPU (vector width, bf16 arithmetic, AMX),
the library versions, the threads and the rows: on an AVX2 EPYC, MKL's `F.linear` won the
prefill and oneDNN's packed layout the decode from batch 4; on AVX-512/AMX Xeons and Zen 5
the figures differ by up to 2x the other way (benchmarks/RESULTS.md). So nothing here is a rule
of the form "this ISA -> that kernel": for each distinct (N, K, dtype) and decode batch the
candidates are timed on the weight itself, by every rank at once (as they run), and the ranks
take the slowest rank's time of each.

A weight has one layout at a time (two would double the model's memory): the decode step,
which runs once per generated token, chooses it. The prefill then takes the fastest of the
kernels that layout can run.

- `plain`:  F.linear on the plain [N, K] weight (MKL sgemm in fp32; aten's own GEMM in bf16).
- `onednn`: oneDNN's blocked layout, packed for the batch's rows; at prefill shapes it runs
            as it is (`onednn`) or is unpacked for the call (`unpack`: F.linear).
- `fp32`:   bf16 weights computed in fp32, a block of rows at a time (linear.fp32_linear): for
            CPUs whose bf16 GEMM is slow. Prefill from the plain layout: `plain` or `fp32`.

Plans are cached on disk per machine (CPU model and ISA, cores), torch/oneDNN version, threads,
world size, dtype, shapes and batch, so that only the first run on a machine measures.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from .cpu import cpu_cores, cpuinfo, isa_flags
from .files import cache_dir, write_atomic

KERNEL_MODES = ("auto", "plain", "onednn", "fp32")  # --kernels: measure, or one kernel for every weight
# The kernels each decode layout can run at prefill shapes.
PREFILL_KERNELS = {"plain": ("plain", "fp32"), "fp32": ("fp32", "plain"), "onednn": ("onednn", "unpack")}
PREFILL_ROWS = 512  # rows of the prefill timing (batch x prompt tokens of a typical case)
ROUNDS = 3  # alternating rounds per candidate (A B C, C B A, A B C): drift hits all alike
ROUND_MIN_S = 0.004  # each candidate runs at least this long per round, and at least MIN_CALLS calls
MIN_CALLS = 2
PLAN_VERSION = 1  # part of the cache key: a change in what is measured invalidates old plans


@dataclass(frozen=True)
class Choice:
    """One weight shape's kernels for one decode batch: `decode` is also the weight's layout."""

    decode: str
    prefill: str
    decode_ms: dict[str, float] | None = None  # the timings it was chosen from (None: not measured)
    prefill_ms: dict[str, float] | None = None

    def __post_init__(self) -> None:
        assert self.decode in PREFILL_KERNELS and self.prefill in PREFILL_KERNELS[self.decode], self


def shape_key(weight: torch.Tensor) -> str:
    n, k = weight.shape
    return f"{n}x{k}:{str(weight.dtype).removeprefix('torch.')}"


def decode_candidates(weight: torch.Tensor) -> tuple[str, ...]:
    """The layouts this weight can take here: oneDNN only on CPU where it packs the dtype."""
    if weight.device.type != "cpu":
        return ("plain",)
    kinds = ["plain"]
    if pack(weight[:1], 1) is not None:
        kinds.append("onednn")
    if weight.dtype == torch.bfloat16:
        kinds.append("fp32")
    return tuple(kinds)


def fixed_choice(mode: str, weight: torch.Tensor) -> Choice:
    """`--kernels plain|onednn|fp32`: that kernel where the weight can take it, else plain."""
    decode = mode if mode in decode_candidates(weight) else "plain"
    return Choice(decode, decode)


def choose(decode_ms: dict[str, float], prefill_ms: dict[str, float]) -> Choice:
    """The fastest decode layout, then the fastest prefill kernel that layout can run."""
    if not decode_ms:
        raise ValueError("choose: no decode timings")
    decode = min(decode_ms, key=decode_ms.__getitem__)
    runnable = [k for k in PREFILL_KERNELS[decode] if k in prefill_ms]
    prefill = min(runnable, key=prefill_ms.__getitem__) if runnable else decode
    return Choice(decode, prefill, dict(decode_ms), dict(prefill_ms))


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """`weight` [N, K] in oneDNN's layout for `rows` rows, or None where oneDNN cannot take it."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    with torch.inference_mode(False), torch.no_grad():  # packed weights outlive inference mode
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw ..."
            return None


def time_ms(calls: dict[str, Callable[[], object]], on_progress: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median milliseconds per call of each candidate, over ROUNDS rounds in alternating order."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        calls[name]()  # the first call allocates, and oneDNN builds its primitive
    for round_ in range(ROUNDS):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            call, spent, count = calls[name], 0.0, 0
            while count < MIN_CALLS or spent < ROUND_MIN_S:
                started = time.perf_counter()
                call()
                elapsed = time.perf_counter() - started
                samples[name].append(elapsed)
                spent, count = spent + elapsed, count + 1
            on_progress()
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def candidate_calls(weight: torch.Tensor, rows: int, kinds: Iterable[str]) -> tuple[dict, dict]:
    """Callables timing each decode candidate at `rows` rows and each prefill kernel at PREFILL_ROWS."""
    from .linear import fp32_linear, packed_linear  # linear.py uses this module

    k = weight.shape[1]
    x_decode = torch.randn(rows, k).to(weight.dtype)
    x_prefill = torch.randn(max(rows + 1, PREFILL_ROWS), k).to(weight.dtype)
    decode, prefill = {}, {}
    for kind in kinds:
        if kind == "onednn":
            packed = pack(weight, rows)
            decode[kind] = lambda p=packed: packed_linear(x_decode, p, None)
            prefill["onednn"] = lambda p=packed: packed_linear(x_prefill, p, None)
            prefill["unpack"] = lambda p=packed: torch.nn.functional.linear(x_prefill, p.to_dense())
        elif kind == "fp32":
            decode[kind] = lambda: fp32_linear(x_decode, weight, None)
            prefill[kind] = lambda: fp32_linear(x_prefill, weight, None)
        else:
            decode[kind] = lambda: torch.nn.functional.linear(x_decode, weight)
            prefill[kind] = lambda: torch.nn.functional.linear(x_prefill, weight)
    return decode, prefill


def plan_key(weights: dict[str, torch.Tensor], rows: int, world_size: int) -> dict:
    """What a measured plan depends on: it is reused only where all of it is the same."""
    model, _ = cpuinfo()
    onednn = torch.backends.mkldnn.version() if hasattr(torch.backends.mkldnn, "version") else None
    return {"version": PLAN_VERSION, "cpu_model": model, "cpu_isa": isa_flags(), "cores": cpu_cores(),
            "torch": torch.__version__, "onednn": str(onednn), "threads": torch.get_num_threads(),
            "world_size": world_size, "rows": rows, "shapes": sorted(weights)}


def plan_path(key: dict):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir("kernels", f"{digest}.json")


def load_plan(key: dict) -> dict[str, Choice] | None:
    """The cached plan of exactly this key, or None (absent, unreadable, or another key)."""
    try:
        stored = json.loads(plan_path(key).read_text())
    except (OSError, ValueError):
        return None
    if stored.get("key") != key:
        return None
    try:
        return {shape: Choice(**choice) for shape, choice in stored["plan"].items()}
    except (KeyError, TypeError, AssertionError):
        return None


def save_plan(key: dict, plan: dict[str, Choice]) -> None:
    write_atomic(plan_path(key), json.dumps({"key": key, "plan": {s: asdict(c) for s, c in plan.items()}},
                                            indent=1, sort_keys=True))


def measure(weights: dict[str, torch.Tensor], rows: int, slowest: Callable[[torch.Tensor], torch.Tensor],
            prefill: set[str], on_progress: Callable[[], None] = lambda: None) -> dict[str, Choice]:
    """Time every candidate of every weight, at prefill shapes too for those in `prefill`;
    `slowest` reduces a float64 tensor of timings to its maximum over the ranks (every rank must
    call this with the same shapes, in step)."""
    timings: list[tuple[str, dict, dict]] = []
    for shape in sorted(weights):
        weight = weights[shape]
        decode_calls, prefill_calls = candidate_calls(weight, rows, decode_candidates(weight))
        prefill_ms = time_ms(prefill_calls, on_progress) if shape in prefill else {}
        timings.append((shape, time_ms(decode_calls, on_progress), prefill_ms))
    flat = torch.tensor([v for _, d, p in timings for v in (*d.values(), *p.values())], dtype=torch.float64)
    flat = slowest(flat).tolist()
    plan, i = {}, 0
    for shape, decode_ms, prefill_ms in timings:
        decode_ms = dict(zip(decode_ms, flat[i:i + len(decode_ms)]))
        i += len(decode_ms)
        prefill_ms = dict(zip(prefill_ms, flat[i:i + len(prefill_ms)]))
        i += len(prefill_ms)
        plan[shape] = choose(decode_ms, prefill_ms)
    return plan


def describe(plan: dict[str, Choice]) -> str:
    """One line: each shape's decode/prefill kernel."""
    return "; ".join(f"{shape} {c.decode}/{c.prefill}" for shape, c in sorted(plan.items()))
