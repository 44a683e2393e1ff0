"""Whether a decode step runs its layers fused where the kernel plan alone would not: timed on the step.

fused_step.c runs a decode step's layers in one call where every layer's linear is laid out in panels
(fused_step.why_not). The plan times each weight shape's kernels alone (kernels.measure), and what fusion
saves, the interpreter and torch's dispatch between a step's few hundred ops, lies in no one shape's timing.
So a shape whose own kernel timed a little faster than panels once, or whose panels' timing a disturbed
moment slowed, left the whole step op by op: on the EPYC Zen 4 the GPTBigCode bench model's fp32 plan took
rowdot for its 1024x4096 weights (0.58 ms against panels' 0.65 in that measurement, 0.47-0.53 in the
other plans cached there), and its batch-1 decode step ran 19.47 ms op by op against 17.33 ms fused
(RESULTS.md, "The plan's kernels against a fused step").

Where only such shapes stand in the way (each timed with panels too), the step is timed both ways, the
plan as chosen and those shapes in panels, fused: in turn, every rank at once, the slowest rank's time,
cached per machine, model, plan and batch like the panels' asks. A request then takes the way whose cost
is least: its prefill's estimate from the plan's timings (those shapes' prefill kernels differ) plus its
steps at the measured step time. A model whose step is too slow to time within BUDGET_S keeps its plan:
judged first from the plan's own timings of its weights, so that a large model runs no step to find out.
"""
from __future__ import annotations

import math
import statistics
import time
import weakref

import torch

from . import fused_step, panel_asks
from .kernels import PREFILL_ROWS, SHORT_ROWS, SPLIT_ROWS, Choice, choose
from .panel_asks import decode_step, first_step_s, machine_key, read_record, record_path, weights_s, write_record

WAYS = ("plan", "fused")  # the plan as chosen, op by op; its blocking shapes in panels, the layers fused
ORDER = ("plan", "fused", "fused", "plan")  # each way's rounds, in this order (the machine's speed drifts)
STEPS = 2  # timed steps a round, after one untimed (it inherits the other way's caches)
BUDGET_S = 2.0  # at most this long in timed and warm-up steps (the blocking shapes' layouts come on top)
VERSION = 1  # part of the cache key: a change in what is measured invalidates old timings

# This process's step timings, per model, batch and plan: what `applied` weighs a request with.
_TIMED: dict[tuple, dict[str, float] | None] = {}


def _plan_key(plan: dict[str, Choice]) -> str:
    return ";".join(f"{shape}={choice.decode}" for shape, choice in sorted(plan.items()))


def blocking(model, plan: dict[str, Choice]) -> list[str]:
    """The shapes of `model`'s layers whose decode kernel in `plan` is not panels, where every one was
    timed with panels too (measured plans only): laid out in panels instead, the layers may fuse."""
    shapes = sorted({linear.shape_key() for linear in fused_step.linears(model)})
    shapes = [shape for shape in shapes if plan[shape].decode != "panels"]
    timed = all(plan[shape].decode_ms and "panels" in plan[shape].decode_ms for shape in shapes)
    return shapes if timed else []


def in_panels(choice: Choice, request: tuple[int, int] | None) -> Choice:
    """`choice` with its decode layout panels, its prefill kernels the fastest panels runs (for `request`)."""
    decode_ms = {"panels": choice.decode_ms["panels"]}
    return choose(decode_ms, choice.prefill_ms or {}, choice.short_ms, *(request or (None, None)))


def prefill_ms(choice: Choice, prompt_rows: int) -> float:
    """A prefill of `prompt_rows` rows through one weight of `choice`, estimated from its own timings
    (kernels.choose's estimate): the short or the long timing, whichever that many rows take, by rows."""
    short = prompt_rows < SPLIT_ROWS
    ms, rows, kernel = (choice.short_ms, SHORT_ROWS, choice.short) if short else (
        choice.prefill_ms, PREFILL_ROWS, choice.prefill)
    if ms and kernel in ms:
        return ms[kernel] * prompt_rows / rows
    return choice.decode_ms[choice.decode] if choice.decode_ms and choice.decode in choice.decode_ms else 0.0


def _memo_key(model, batch: int, plan: dict[str, Choice]) -> tuple:
    return id(model), batch, torch.get_num_threads(), _plan_key(plan)


def applied(model, plan: dict[str, Choice], batch: int, request: tuple[int, int] | None) -> dict[str, Choice]:
    """`plan` as `model` lays it out at `batch` rows for `request`: with its blocking shapes in panels where
    this process timed the fused step faster, by the request's cost; else as it is."""
    timed = _TIMED.get(_memo_key(model, batch, plan))
    shapes = blocking(model, plan) if timed else []
    if not shapes:
        return plan
    fused = {**plan, **{shape: in_panels(plan[shape], request) for shape in shapes}}
    return fused if _way(model, plan, fused, shapes, timed, request) == "fused" else plan


def _way(model, plan: dict[str, Choice], fused: dict[str, Choice], shapes: list[str], step_ms: dict[str, float],
         request: tuple[int, int] | None) -> str:
    """The way whose request costs least: the blocking shapes' prefill (each weight of those shapes) plus
    the request's steps at the measured step times (no request: the step alone)."""
    if request is None:
        return min(WAYS, key=lambda way: (step_ms[way], way != "plan"))
    prompt_rows, steps = request
    counts = {shape: 0 for shape in shapes}
    for linear in fused_step.linears(model):
        if linear.shape_key() in counts:
            counts[linear.shape_key()] += 1
    costs = {way: steps * step_ms[way] + sum(count * prefill_ms(chosen[shape], prompt_rows)
                                             for shape, count in counts.items())
             for way, chosen in (("plan", plan), ("fused", fused))}
    return min(WAYS, key=lambda way: (costs[way], way != "plan"))


def settle(model, batch: int) -> None:
    """Time `model`'s decode step at `batch` rows both ways (or take this machine's cached timings) where its
    plan is measured and only its blocking shapes keep its layers from fusing, then lay out the way its
    request costs least. Every rank calls it in step, after the KV cache is allocated (the timed steps write
    one cache slot in each sequence); whether it times is agreed on across ranks."""
    if model.kernel_mode != "auto":
        return
    weighed = model.weighed_plan
    memo = _memo_key(model, batch, weighed)
    shapes = blocking(model, weighed)
    if memo not in _TIMED:
        if model.kernel_plan != weighed:  # (another thread count's choice: the same on every rank, as the plan is)
            model.lay_out(weighed, batch)
        reason = fused_step.why_not(model)
        candidate = bool(shapes) and reason is not None and reason.startswith("a linear's decode kernel")
        key = {"version": VERSION, "batch": batch, "plan": _plan_key(weighed), "order": list(ORDER),
               "steps": STEPS, **machine_key(model)}
        path = record_path("fusion", key)
        stored = read_record(path, key) if candidate else None
        cached = stored.get("step_ms") if stored else None
        if not (isinstance(cached, dict) and all(type(cached.get(way)) is float and math.isfinite(cached[way])
                                                 and cached[way] > 0 for way in WAYS)):
            cached = None
        # Every rank times if any lacks the timings (they are reduced across ranks); none if one has no candidate.
        lacking, unfit = model.tp.max_(torch.tensor([cached is None, not candidate], dtype=torch.float64)).tolist()
        if unfit:
            _TIMED[memo] = None
        elif lacking:
            with torch.inference_mode():
                _TIMED[memo] = _measured(model, batch, weighed, shapes)
            if _TIMED[memo] is not None:
                write_record(path, {"key": key, "step_ms": _TIMED[memo]}, "fusion_choice")
        else:
            _TIMED[memo] = cached
        weakref.finalize(model, _TIMED.pop, memo, None)
    plan = applied(model, weighed, batch, model.kernel_request)
    if plan != model.kernel_plan:
        model.lay_out(plan, batch)


def _measured(model, batch: int, plan: dict[str, Choice], shapes: list[str]) -> dict[str, float] | None:
    """The decode step's ms at `batch` rows each way (the median of its rounds, each the mean of STEPS steps,
    the slowest rank's), or None where a step is too slow to time each way twice within BUDGET_S or the
    blocking shapes in panels do not fuse after all. Leaves `plan` laid out, and the panels' asks at their
    defaults (panel_asks.settle sets them again after)."""
    fused = {**plan, **{shape: in_panels(plan[shape], model.kernel_request) for shape in shapes}}
    layouts = {"plan": plan, "fused": fused}
    panel_asks.reset()  # (both ways timed alike, whatever another batch or plan settled)
    if weights_s(model, plan) * len(ORDER) * (STEPS + 1) > BUDGET_S:  # (the slowest rank's: all decide alike)
        return None  # (a large model: no step run to find out)
    step = decode_step(model, batch)
    if first_step_s(model, step) * len(ORDER) * (STEPS + 1) > BUDGET_S:
        return None
    samples: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        for way in ORDER:
            if model.kernel_plan != layouts[way]:
                model.lay_out(layouts[way], batch)
                apart = torch.tensor([way == "fused" and model.fused_layers() is None], dtype=torch.float64)
                if model.tp.max_(apart).item():
                    return None  # (something else keeps them apart, on some rank)
            step()  # (untimed: the first after a layout runs cold)
            start = time.perf_counter()
            for _ in range(STEPS):
                step()
            samples[way].append((time.perf_counter() - start) * 1e3 / STEPS)
            model._tick()
    finally:
        if model.kernel_plan != plan:
            model.lay_out(plan, batch)
    local = [statistics.median(samples[way]) for way in WAYS]
    return dict(zip(WAYS, model.tp.max_(torch.tensor(local, dtype=torch.float64)).tolist()))


def describe(model) -> str:
    """'; panels for fusion: SHAPES (step ms fused F, plan P)' where `model`'s layout took them for it (its
    place in the plan's line), else ''."""
    if model.kernel_mode != "auto" or model.kernel_plan == model.weighed_plan or model.kernel_rows is None:
        return ""
    timed = _TIMED.get(_memo_key(model, model.kernel_rows, model.weighed_plan))
    ms = f" (step ms fused {timed['fused']:.2f}, plan {timed['plan']:.2f})" if timed else ""
    return f"; panels for fusion: {','.join(blocking(model, model.weighed_plan))}{ms}"
