"""Each linear weight's kernel, chosen by timing the candidates on the machine at hand.

Which kernel is fastest for a weight depends on the CPU (vector width, bf16 arithmetic, AMX),
the library versions, the threads and the rows: on an AVX2 EPYC, MKL's `F.linear` won the
prefill and oneDNN's packed layout the decode from batch 4; on AVX-512/AMX Xeons and Zen 5
the figures differ by up to 2x the other way (benchmarks/RESULTS.md). So nothing here is a rule
of the form "this ISA -> that kernel": for each distinct (N, K, dtype) and decode batch the
candidates are timed on copies of the weight, by every rank at once (as they run), and the ranks
take the slowest rank's time of each.

A weight has one layout at a time (two would double the model's memory). Measured alone, the
decode step, which runs once per generated token, chooses it; the prefill then takes the fastest
of the kernels that layout can run. Given a request's shape (`weigh`: its prompt rows and decode
steps), the layout is the one whose request costs least in all (of near ties, the one least behind
in its slower phase: `choose`). A layout a little slower per step can win a short request by a
faster prefill (MKL's packed sgemm against F.linear at batch 1, fp32: RESULTS.md).

- `plain`:  F.linear on the plain [N, K] weight (MKL sgemm in fp32; aten's own GEMM in bf16).
- `onednn`: oneDNN's blocked layout, packed for the batch's rows; at prefill shapes it runs
            as it is (`onednn`) or is unpacked for the call (`unpack`: F.linear).
- `onednn_wide`: oneDNN's blocked layout packed for layouts.WIDE_ROWS rows at smaller decode
            batches (for one row oneDNN lays a weight out otherwise), run as it is at every row
            count (on the EPYC Zen 5 it ran fp32's one-row decode and prefill faster than gemv did).
- `mkl_packed`: fp32 only: MKL's packed sgemm layout (cblas_sgemm_pack, via `mkl::_mkl_linear`),
            packed for the batch's rows, run as it is at every row count. It cannot be read back:
            the plain weight comes from the part on disk when the layout changes
            (Linear.plain_source), so only weights with a source take it (3% more memory: RESULTS.md).
- `fp32`:   bf16 weights computed in fp32, a block of rows at a time (linear.fp32_linear): for
            CPUs whose bf16 GEMM is slow. Prefill from the plain layout: `plain`, `fp32` or
            `onednn_plain` (oneDNN's GEMM given the plain weight: it lays each block out as it
            goes, and ran fp32 prefills at oneDNN's packed speed, twice MKL's, on the EPYC Zen 5).
- `gemv`:   fp32, decode at one row only: BLAS's sgemv on the plain weight (gemv.py), where
            torch's one-row GEMMs fall short of the memory's speed. Prefill as `plain`.
- `panels`: fp32 and bf16 where the CPU has AVX2 and FMA (AVX-512's kernels where it has them),
            every decode batch: our own GEMM on the weight in panels of 16 output columns
            (panels.py). Prefill: itself.
- `rowdot`: fp32 and bf16, decode at one row only: our one-row kernel on the plain weight (rowdot.c,
            built at first use by the machine's C compiler, else not a candidate). Prefill as `plain`.

Prefill kernels are timed at SHORT_ROWS and PREFILL_ROWS rows (unpacking a weight costs the same
for 2 rows as for 2000); calls below SPLIT_ROWS rows take the short winner, larger ones the long one.

How the candidates are timed: kernel_timing.py. Plans are cached on disk per machine and what
else they depend on (plan_key): only the first run on a machine measures.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import gemv, panel_asks, panels, rowdot
from .activations import TANH_GELU
from .cpu import cpu_cores, cpu_model, isa_flags
from .decode_attention import DECODE_FORM
from .files import cache_dir, write_atomic
from .kernel_timing import (DECODE_MIN_CALLS, decode_calls, decode_copies, decode_rows, decode_set_bytes,
                            prefill_calls, side_by_side, suspect_shapes, time_ms)
from .layouts import WIDE_ROWS, pack, pack_mkl
from .malloc import THP_ENV

KERNEL_MODES = ("auto", "plain", "onednn", "onednn_wide", "mkl_packed", "fp32", "gemv", "rowdot", "panels")  # --kernels: measure, or one kernel for every weight
# The kernels each decode layout can run at prefill shapes.
PREFILL_KERNELS = {"plain": ("plain", "fp32", "onednn_plain"), "fp32": ("fp32", "plain", "onednn_plain"),
                   "onednn": ("onednn", "unpack"), "onednn_wide": ("onednn_wide",), "mkl_packed": ("mkl_packed",),
                   "gemv": ("plain", "fp32", "onednn_plain"), "rowdot": ("plain", "fp32", "onednn_plain"),
                   "panels": ("panels",)}
SHORT_ROWS = 64  # rows of the short-prompt prefill timing
PREFILL_ROWS = 512  # rows of the long prefill timing (batch x prompt tokens of a typical case)
SPLIT_ROWS = round(math.sqrt(SHORT_ROWS * PREFILL_ROWS))  # calls of fewer rows take the short winner
# Requests whose costs are this close are not told apart: a candidate's timings differ by 3-6%
# from one measured plan to the next (RESULTS.md, "Decode candidates timed from memory").
TIE_FRACTION = 0.02
# A prefill timing is taken again (`traded`) where the layouts a weight would take run it more than this much
# slower than its fastest kernel: the layout then trades its prefill against its step, and one timing decided
# it. On the EPYC Zen 4, one plan of 2048x1024 fp32 (GPTBigCode's MLP at world size 2, batch 16) read panels'
# 512-row prefill 10% behind oneDNN's, where the three other plans of that shape read it 1-4% ahead and 40
# interleaved pairs 3-4%: its 16 x 512 requests took oneDNN's layout and ran op by op, the step 1.2-1.3x panels'
# fused one (RESULTS.md, "A prefill timing that traded the step away"). Plans there differ by 3-6%.
TRADE_FRACTION = 0.05
PLAN_VERSION = 29  # part of the cache key: a change in what is measured invalidates old plans (29: panels on AVX2)
# Every shape's timings travel across ranks in these fixed slots (inf: not a candidate there),
# so that ranks on CPUs with different candidates still reduce tensors of one size.
DECODE_SLOTS = ("plain", "onednn", "fp32", "mkl_packed", "gemv", "onednn_wide", "rowdot", "panels")
PREFILL_SLOTS = ("plain", "fp32", "onednn", "unpack", "mkl_packed", "onednn_plain", "onednn_wide", "panels")


@dataclass(frozen=True)
class Choice:
    """One weight shape's kernels for one decode batch: `decode` is also the weight's layout."""

    decode: str
    prefill: str  # from SPLIT_ROWS rows on
    short: str | None = None  # above the decode rows and below SPLIT_ROWS (None: as `prefill`)
    decode_ms: dict[str, float] | None = None  # the timings it was chosen from (None: not measured)
    short_ms: dict[str, float] | None = None
    prefill_ms: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.short is None:
            object.__setattr__(self, "short", self.prefill)
        runnable = PREFILL_KERNELS.get(self.decode, ())
        if self.prefill not in runnable or self.short not in runnable:
            raise ValueError(f"kernel choice {self.decode}/{self.short}/{self.prefill}: the {self.decode!r} layout "
                             f"runs {list(runnable)} at prefill shapes")


def key_of(n: int, k: int, dtype: torch.dtype) -> str:
    """A plan's key for an [N, K] weight of `dtype` ("NxK:dtype"), laid out or not."""
    return f"{n}x{k}:{str(dtype).removeprefix('torch.')}"


def shape_key(weight: torch.Tensor) -> str:
    return key_of(*weight.shape, weight.dtype)


def key_dtype(key: str) -> torch.dtype:
    """The dtype a key_of names."""
    return getattr(torch, key.rpartition(":")[2])


def decode_candidates(weight: torch.Tensor, rows: int = 1) -> tuple[str, ...]:
    """The decode kernels this weight can take here at decode batches of `rows` rows: the packed
    layouts only on CPU where the library packs the dtype, BLAS's sgemv for fp32 at one row,
    rowdot.c for fp32 and bf16 at one row where it was built, our panels where the CPU runs them."""
    if weight.device.type != "cpu":
        return ("plain",)
    kinds = ["plain"]
    if pack(weight[:1], 1) is not None:
        kinds.append("onednn")
        if rows < WIDE_ROWS:  # (from WIDE_ROWS on, `onednn` is packed for as many)
            kinds.append("onednn_wide")
    if pack_mkl(weight[:1], 1) is not None:
        kinds.append("mkl_packed")
    kinds += ["fp32"] if weight.dtype == torch.bfloat16 else []
    kinds += ["gemv"] if rows == 1 and gemv.supports(weight) else []
    kinds += ["rowdot"] if rows == 1 and rowdot.supports(weight) else []
    # At one row its product is a stream through the weight like rowdot's, gemv's and onednn_wide's;
    # it brings its layout's prefill, the fastest at 128 and 512 rows on the EPYC Zen 5. The lm_head
    # (no prompt rows) too: on Zen 5 its one-row streams ran alike (38-39 GB/s), on Zen 4 panels read
    # it at 30 GB/s and oneDNN at 19 (RESULTS.md, "The lm_head at one row on Zen 4").
    return tuple(kinds + (["panels"] if panels.supports(weight) else []))


def fixed_choice(mode: str, weight: torch.Tensor, rows: int = 1) -> Choice:
    """`--kernels plain|onednn|fp32|...`: that kernel where the weight can take it at decode
    batches of `rows` rows, else plain (`gemv`, `rowdot`: at one row, prefilling as plain; `panels`: the lm_head too)."""
    decode = mode if mode in decode_candidates(weight, rows) else "plain"
    return Choice(decode, "plain" if decode in ("gemv", "rowdot") else decode)


def choose(decode_ms: dict[str, float], prefill_ms: dict[str, float], short_ms: dict[str, float] | None = None,
           prompt_rows: int | None = None, steps: int | None = None) -> Choice:
    """The fastest decode layout, then the fastest prefill kernels (long, short) that layout runs.
    With a request's `prompt_rows` and decode `steps`, the layout whose request costs least: its
    prefill (the short or the long timing, whichever that many rows take, scaled by rows) plus
    `steps` decode steps; of layouts within TIE_FRACTION of the least (totals that close are not
    told apart), the one whose slower phase is least behind that phase's fastest tied layout (with no
    steps, the prefill alone): the first token and the step are both waits a user sees, and a tie on
    the total can hide a step 20% slower behind a prefill 2% faster (RESULTS.md, "The tie on a
    request broken by the phase further behind")."""
    if not decode_ms:
        raise ValueError("choose: no decode timings")
    short_ms = prefill_ms if short_ms is None else short_ms

    def fastest(layout: str, ms: dict[str, float]) -> str:
        runnable = [k for k in PREFILL_KERNELS[layout] if k in ms]
        return min(runnable, key=ms.__getitem__) if runnable else PREFILL_KERNELS[layout][0]

    def prefill_of(layout: str) -> float:
        ms, rows = (short_ms, SHORT_ROWS) if prompt_rows < SPLIT_ROWS else (prefill_ms, PREFILL_ROWS)
        kernel = fastest(layout, ms)  # no prefill timings (the lm_head): its decode kernel, timed at decode
        return ms[kernel] * prompt_rows / rows if kernel in ms else decode_ms[layout]

    def request_ms(layout: str) -> float:
        return prefill_of(layout) + steps * decode_ms[layout]

    if prompt_rows is None or steps is None:
        decode = min(decode_ms, key=decode_ms.__getitem__)
    else:
        if prompt_rows < 1 or steps < 0:
            raise ValueError(f"choose: a request of {prompt_rows} prompt rows and {steps} decode steps")
        least = min(request_ms(layout) for layout in decode_ms)
        tied = [layout for layout in decode_ms if request_ms(layout) <= least * (1 + TIE_FRACTION)]
        phases = [prefill_of] + ([decode_ms.__getitem__] if steps else [])  # (no steps: the prefill alone)
        bests = [min(phase(layout) for layout in tied) for phase in phases]

        def behind(layout: str) -> tuple[float, float]:  # the phase furthest behind the tied ones' best, the total
            return max(phase(layout) / best if best > 0 else 1.0 if phase(layout) == 0 else math.inf
                       for phase, best in zip(phases, bests)), request_ms(layout)  # (0 ms: a lone candidate)

        decode = min(tied, key=behind)
    return Choice(decode, fastest(decode, prefill_ms), fastest(decode, short_ms), dict(decode_ms), dict(short_ms),
                  dict(prefill_ms))


def traded(decode_ms: dict[str, float], prefill_ms: dict[str, float]) -> bool:
    """Whether a weight's prefill timing at one row count (`prefill_ms`) can trade its layout against its step:
    the layouts it would take, its fastest decode's and panels' (the fused step's: fusion_choice), run that
    prefill more than TRADE_FRACTION slower than its fastest kernel. The timings' keys are DECODE_SLOTS' and
    PREFILL_SLOTS' names."""
    if not decode_ms or not prefill_ms:
        return False
    layouts = {min(decode_ms, key=decode_ms.__getitem__)} | ({"panels"} & decode_ms.keys())
    theirs = [prefill_ms[kernel] for layout in layouts for kernel in PREFILL_KERNELS[layout] if kernel in prefill_ms]
    return bool(theirs) and min(theirs) > (1 + TRADE_FRACTION) * min(prefill_ms.values())


def weigh(choice: Choice, prompt_rows: int, steps: int) -> Choice:
    """`choice` chosen again for a request of `prompt_rows` prompt rows (batch x prompt length)
    and `steps` decode steps, from its own timings (a choice without them stays as it is)."""
    if not choice.decode_ms:
        return choice
    return choose(choice.decode_ms, choice.prefill_ms or {}, choice.short_ms, prompt_rows, steps)


def plan_key(weights: Mapping[str, torch.Tensor], rows: int, world_size: int,
             activated: dict[str, str] | None = None, step_bytes: int = 0) -> dict:
    """What a measured plan depends on: it is reused only where all of it is the same."""
    onednn = torch.backends.mkldnn.version() if hasattr(torch.backends.mkldnn, "version") else None
    return {"version": PLAN_VERSION, "cpu_model": cpu_model(), "cpu_isa": isa_flags(), "cores": cpu_cores(),
            "torch": torch.__version__, "onednn": str(onednn), "threads": torch.get_num_threads(),
            "world_size": world_size, "rows": rows, "shapes": sorted(weights),
            "activated": dict(sorted((activated or {}).items())),
            "decode_set_mib": round(min(step_bytes, decode_set_bytes()) / 2**20),
            # The page size of torch's large blocks (malloc.enable_huge_pages): the EPYC Zen 5 timed F.linear
            # at 6.0 ms (4 KiB) and 0.20 ms (2 MiB) on a 1024x1024 weight at one row (RESULTS.md).
            "huge_pages": os.environ.get(THP_ENV, "") == "1",
            # Whether the split form runs, not from what size: at its crossover both forms cost
            # alike, and a size measured again from one process to the next is not a new plan.
            "tanh_gelu": "fused" if TANH_GELU.split_from is None else "split",
            "rowdot": rowdot.path()}  # built or not, and the instruction set it runs


def plan_path(key: dict):  # (the cache file of a plan_key)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir("kernels", f"{digest}.json")


def load_plan(key: dict) -> dict[str, Choice] | None:
    """The cached plan of exactly this key, or None (absent, unreadable, or another key)."""
    try:
        stored = json.loads(plan_path(key).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(stored, dict) or stored.get("key") != key or not isinstance(stored.get("plan"), dict)
            or sorted(stored["plan"]) != key["shapes"]):
        return None
    try:
        return {shape: Choice(**choice) for shape, choice in stored["plan"].items()}
    except (TypeError, ValueError):
        return None


def save_plan(key: dict, plan: dict[str, Choice]) -> None:
    """Cache the plan; a cache that cannot be written costs a measurement next time, nothing more."""
    try:
        write_atomic(plan_path(key), json.dumps({"key": key, "plan": {s: asdict(c) for s, c in plan.items()}},
                                                indent=1, sort_keys=True))
    except OSError as err:
        print(f"[kernels] could not cache the plan in {plan_path(key)}: {err}", file=sys.stderr)


def _slots(ms: dict[str, float], slots: tuple[str, ...]) -> list[float]:
    return [ms.get(name, math.inf) for name in slots]


def _unslot(values: list[float], slots: tuple[str, ...]) -> dict[str, float]:
    return {name: v for name, v in zip(slots, values) if math.isfinite(v)}


def measure(weights: Mapping[str, torch.Tensor], rows: int, slowest: Callable[[torch.Tensor], torch.Tensor],
            prefill: set[str], on_progress: Callable[[], None] = lambda: None,
            activated: dict[str, str] | None = None, step_bytes: int = 0) -> dict[str, Choice]:
    """Time every candidate of every weight, at prefill shapes too for those in `prefill`, with
    the activation `activated` names for a shape (the MLP's first linear; a shape it shares with
    another layer is timed with it), the decode candidates over as many copies as a decode step
    reads `step_bytes` (decode_copies; 0: one copy), a large weight's on its first rows (decode_rows);
    `slowest` reduces a float64 tensor to its maximum over the ranks. Every rank must call this in
    step with the same shapes (checked first). Where suspect_shapes names a shape (one of its candidates
    far below its own speed on the other shapes), or `traded` a prefill of it, that part of it is timed again,
    each candidate keeping its faster figure."""
    activated = activated or {}
    panel_asks.reset()  # the candidates are timed alone, none asking ahead or into L2
    digest = int(hashlib.sha256(json.dumps([sorted(weights), sorted(prefill), sorted(activated.items())]
                                           ).encode()).hexdigest()[:8], 16)
    seen = slowest(torch.tensor([digest, -digest], dtype=torch.float64)).tolist()
    if seen != [digest, -digest]:
        raise RuntimeError(f"kernel measurement: the ranks hold different weight shapes (this rank: {sorted(weights)})")

    def shape_slots(shape: str, parts=(0, 1, 2)) -> list[float]:  # its parts (decode, short, long prefill) in slots
        weight, activation = weights[shape], activated.get(shape)
        kinds, values = decode_candidates(weight, rows), [math.inf] * len(DECODE_SLOTS)
        if 0 in parts:  # a large weight's first rows; the MLP's first linear whole (its GELU's form: the output's size)
            timed = weight if activation else weight[:decode_rows(*weight.shape, weight.element_size())]
            scale, size = weight.shape[0] / timed.shape[0], timed.numel() * timed.element_size()
            copies = decode_copies(size, step_bytes) if len(kinds) > 1 else 1  # (a lone candidate is not timed)
            calls = decode_calls(timed, rows, kinds, activation, copies, on_progress)
            ms = time_ms(calls, on_progress, math.ceil(DECODE_MIN_CALLS * scale))  # a round: the whole's bytes at least
            values = _slots({kind: value * scale for kind, value in ms.items()}, DECODE_SLOTS)
            del calls  # (the calls, and the copies they hold, go before the next ones are made)
        prefilled = shape in prefill and not {1, 2}.isdisjoint(parts)
        plain = side_by_side(weight, 1, on_progress)[0] if prefilled else None  # (one for both row counts)
        for part, prefill_rows in ((1, SHORT_ROWS), (2, PREFILL_ROWS)):
            if shape not in prefill or part not in parts:
                values += [math.inf] * len(PREFILL_SLOTS)
                continue
            calls = prefill_calls(weight, rows, kinds, prefill_rows, activation, plain)
            values += _slots(time_ms(calls, on_progress), PREFILL_SLOTS)
            del calls
        return values

    def timings_of(values: list[float]) -> tuple[dict[str, float], ...]:  # (decode, short, long)
        cut = (0, len(DECODE_SLOTS), len(DECODE_SLOTS) + len(PREFILL_SLOTS), len(values))
        return tuple(_unslot(values[a:b], slots) for a, b, slots in zip(cut, cut[1:], (DECODE_SLOTS, PREFILL_SLOTS,
                                                                                        PREFILL_SLOTS)))

    shapes, width = sorted(weights), len(DECODE_SLOTS) + 2 * len(PREFILL_SLOTS)
    flat = slowest(torch.tensor([v for shape in shapes for v in shape_slots(shape)], dtype=torch.float64)).tolist()
    timings = {shape: timings_of(flat[i * width:(i + 1) * width]) for i, shape in enumerate(shapes)}
    # The reduced timings: the same shapes on every rank, which time them again in step.
    sizes = {shape: w.numel() * w.element_size() for shape, w in weights.items()}
    # A prefill kernel counts where it could be its layout's figure; each decode candidate is one.
    groups = {s: [PREFILL_KERNELS[layout] for layout in t[0]] for s, t in timings.items()}
    again: dict[str, set[int]] = {}  # shape: the parts of it timed again (0 decode, 1 short, 2 long prefill)
    for part in range(3):
        for shape in suspect_shapes({s: t[part] for s, t in timings.items()}, sizes, groups if part else None):
            again.setdefault(shape, set()).add(part)
    for shape, (decode, *prefills) in timings.items():  # (the first decode timings: a suspect's come after)
        for part, ms in enumerate(prefills, start=1):
            if traded(decode, ms):
                again.setdefault(shape, set()).add(part)
    if again:
        retimed = slowest(torch.tensor([v for shape in sorted(again) for v in shape_slots(shape, again[shape])],
                                       dtype=torch.float64)).tolist()
        for i, shape in enumerate(sorted(again)):
            seconds = timings_of(retimed[i * width:(i + 1) * width])
            timings[shape] = tuple({kind: min(ms, second.get(kind, ms)) for kind, ms in first.items()}
                                   for first, second in zip(timings[shape], seconds))
    return {shape: choose(decode, long, short) for shape, (decode, short, long) in timings.items()}


def cached_or_measured(weights: Mapping[str, torch.Tensor], rows: int, tp, prefill: set[str], activated: dict[str, str],
                       on_progress: Callable[[], None] = lambda: None,
                       step_bytes: int = 0) -> tuple[dict[str, Choice], str]:
    """This machine's cached plan for exactly these weights, rows and decode step bytes ("cached"),
    or, where any rank lacks it, the plan every rank measures in step and caches ("measured"); tp:
    a comm.TPGroup (its max_ reduces across ranks)."""
    key = plan_key(weights, rows, tp.world_size, activated, step_bytes)
    plan = load_plan(key)
    # Every rank measures if any lacks the plan: the timings are reduced across ranks.
    missing = tp.max_(torch.tensor([0.0 if plan is not None else 1.0], dtype=torch.float64))
    if plan is not None and not missing.item():
        return plan, "cached"
    plan = measure(weights, rows, tp.max_, prefill, on_progress=on_progress, activated=activated, step_bytes=step_bytes)
    save_plan(key, plan)
    return plan, "measured"


def describe(plan: dict[str, Choice]) -> str:
    """One line: each shape's kernels, decode/short prefill/long prefill, and the tanh GELU's and
    the causal prefill's forms where this process measured them (calibrate_forms)."""
    items = [f"{shape} {c.decode}/{c.short}/{c.prefill}" for shape, c in sorted(plan.items())]
    if TANH_GELU.calibrated:
        items.append(f"gelu:tanh {'fused' if TANH_GELU.split_from is None else f'split>={TANH_GELU.split_from}'}")
    if DECODE_FORM.calibrated:
        items.append(f"attention:decode {'ours' if DECODE_FORM.ours else 'sdpa'}")
    from .attention import PREFILL_FORM
    if PREFILL_FORM.calibrated:
        items.append(f"attention:{'mqa' if PREFILL_FORM.kv_heads == 1 else 'gqa'} {PREFILL_FORM.describe()}")
    return "; ".join(items)
