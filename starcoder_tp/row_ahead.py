"""How far ahead a one-row panels call asks for its weight: chosen on the model's own decode step.

At batch 1 a decode step streams every weight once, hundreds of MiB, past caches of a few MiB.
Read the plain way (the hardware's prefetcher), the weights evict what the rest of the step uses
(the interpreter, torch's dispatch, the activations, the KV cache), and the few hundred small ops
between the linears then wait on memory: in the bench-size model's bf16 step on the EPYC Zen 4
they took 1.7 ms, against 0.7 ms with the kernels replaced by no-ops. Asked for ahead with
non-temporal hints instead (panels.c, ONE_ROW), the weights pass without evicting it: there the
step ran 2-6% faster asking 2-4 KiB ahead, although the kernel alone reads up to 13% slower so,
and up to 6% slower asking 6 KiB ahead (RESULTS.md, "Non-temporal asks at one row"). How far pays is a
property of the CPU (its prefetchers, its miss buffers, its caches' ways) and shows in the step,
not in the kernel: so the distance is timed on the step itself, the candidates in turn, every rank
at once, the slowest rank's time taken, and cached per machine and model like the kernel plan.
A model whose step is too slow to time twice within BUDGET_S asks for nothing ahead: its weights'
time dwarfs the ops between them.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
import weakref
from typing import Callable

import torch

from . import rowdot
from .cpu import cpu_cores, cpu_model, isa_flags
from .files import cache_dir, write_atomic
from .malloc import THP_ENV

CANDIDATES = (0, 2048, 3072, 4096)  # bytes ahead; 0 asks for nothing (the hardware alone)
ROUNDS = 4  # each candidate's steps, in turn with the others' (the machine's speed drifts)
STEPS = 2  # timed steps a round, after one untimed (it inherits the previous candidate's caches)
BUDGET_S = 1.0  # at most this long measuring: a model whose step is slower is dominated by its weights
MARGIN = 0.02  # a distance is taken only if its step is this much faster than asking for nothing
VERSION = 1  # part of the cache key: a change in what is measured invalidates old choices


class RowAhead:
    """The process's choice: `bytes` as panels.c runs it, and how it was reached."""

    def __init__(self) -> None:
        self.bytes = 0
        self.chosen = ""  # "" until a model's batch-1 decode set it; then how it was chosen
        self.settled_for: tuple | None = None  # (a weak reference to the model, its plan, threads) it is for

    def settled(self, model, plan: str) -> bool:
        return (self.settled_for is not None and self.settled_for[0]() is model
                and self.settled_for[1:] == (plan, torch.get_num_threads()))


ROW_AHEAD = RowAhead()


def set_bytes(ahead: int) -> None:
    """Make the library's one-row calls ask `ahead` bytes ahead (0: nothing)."""
    if ahead < 0 or ahead % 64:
        raise ValueError(f"row_ahead: {ahead} bytes is not a non-negative multiple of 64")
    lib, _ = rowdot.library()
    if lib is not None:
        lib.panels_row_ahead(ahead)
    ROW_AHEAD.bytes = ahead


def reset() -> None:
    """Ask for nothing ahead until a model settles again (kernels.measure: the plan's one-row candidates
    are timed alone, none of them asking ahead)."""
    set_bytes(0)
    ROW_AHEAD.chosen, ROW_AHEAD.settled_for = "", None


def choose(step_ms: dict[int, float]) -> int:
    """The candidate whose step was fastest, where it beats asking for nothing by MARGIN; else 0."""
    best = min(step_ms, key=lambda ahead: (step_ms[ahead], ahead))
    return best if step_ms[best] < step_ms[0] * (1 - MARGIN) else 0


def measure(step: Callable[[], object], slowest: Callable[[torch.Tensor], torch.Tensor],
            on_progress: Callable[[], None] = lambda: None, rounds: int = ROUNDS) -> dict[int, float]:
    """Each candidate's step time (ms; the median of its rounds, each round's the mean of STEPS steps,
    the slowest rank's), the candidates run in turn, in a rotated order each round. Every rank calls it
    in step (`step` runs the model's collectives)."""
    samples: dict[int, list[float]] = {ahead: [] for ahead in CANDIDATES}
    try:
        for r in range(rounds):
            for ahead in CANDIDATES[r % len(CANDIDATES):] + CANDIDATES[:r % len(CANDIDATES)]:
                set_bytes(ahead)
                step()  # (untimed: it starts from the caches the previous candidate left)
                start = time.perf_counter()
                for _ in range(STEPS):
                    step()
                samples[ahead].append((time.perf_counter() - start) * 1e3 / STEPS)
                on_progress()
    finally:
        set_bytes(0)
    local = [statistics.median(samples[ahead]) for ahead in CANDIDATES]
    return dict(zip(CANDIDATES, slowest(torch.tensor(local, dtype=torch.float64)).tolist()))


def _key(model, plan: str) -> dict:
    config = model.config
    return {"version": VERSION, "candidates": list(CANDIDATES), "margin": MARGIN, "cpu_model": cpu_model(),
            "cpu_isa": isa_flags(), "cores": cpu_cores(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "world_size": model.tp.world_size,
            "kernels": rowdot.path(), "huge_pages": os.environ.get(THP_ENV, "") == "1", "plan": plan,
            "model": [config.model_type, config.n_layer, config.n_embd, config.n_head, config.n_inner,
                      str(model.transformer.ln_f.weight.dtype)],
            "fused": bool(getattr(model, "fused", None))}  # the step timed: its layers fused (fused_step.py) or not


def settle(model, batch: int) -> None:
    """Set the one-row asks for `model`'s decode at `batch` rows: measured (or this machine's cached
    choice) where its plan is measured (`auto`), the batch is one row and a linear runs panels;
    nothing ahead otherwise. Every rank calls it in step, after the KV cache is allocated: the
    timed steps write one cache slot, which a request writes before it reads. Whether a collective
    runs depends on the mode, the batch and the plan last settled for, which the ranks share (a plan is
    measured by all of them together, or read from the cache file a machine's ranks share); whether a
    rank can ask ahead (panels in its plan, the library built) is agreed on in that collective."""
    if model.kernel_mode != "auto" or batch != 1:
        reset()
        return
    panels = sorted(name for name, choice in model.kernel_plan.items() if choice.decode == "panels")
    plan = ";".join(panels)
    if ROW_AHEAD.settled(model, plan):
        return  # (setup_cache runs before every request)
    key = _key(model, plan)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir("forms", f"row-ahead-{digest}.json")
    try:
        stored = json.loads(path.read_text())
        cached = (stored["ahead"], str(stored["how"])) if stored.get("key") == key else None
        if cached and (type(cached[0]) is not int or cached[0] not in CANDIDATES):
            cached = None  # (not a distance of ours: measured again)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        cached = None
    usable = bool(panels) and rowdot.library()[0] is not None
    # Every rank measures if any lacks it (the timings are reduced across ranks); none if one cannot ask.
    lacking, unusable = model.tp.max_(torch.tensor([cached is None, not usable], dtype=torch.float64)).tolist()
    if unusable:
        ahead, how, cached = 0, "", None
    elif lacking:
        cached = None
        with torch.inference_mode():
            ahead, how = _measured(model)
        if how.startswith("step ms"):  # (not a step too slow to time once, perhaps cold: timed again next time)
            try:
                write_atomic(path, json.dumps({"key": key, "ahead": ahead, "how": how}, indent=1, sort_keys=True))
            except OSError as err:
                print(f"[row_ahead] could not cache the choice in {path}: {err}", file=sys.stderr)
    else:
        ahead, how = cached
    set_bytes(ahead)
    ROW_AHEAD.chosen = how and f"{ahead} ({'cached' if cached else 'measured'}: {how})"
    ROW_AHEAD.settled_for = (weakref.ref(model), plan, torch.get_num_threads())


def _measured(model) -> tuple[int, str]:
    """(the distance `model`'s batch-1 step ran fastest with, how it was chosen)."""
    ids = torch.zeros((1, 1), dtype=torch.long, device=model.transformer.ln_f.weight.device)
    slot = min(model.cache_len - 1, 128)  # a step some way into a sequence (what a request reads, it writes first)
    position = torch.full((1, 1), slot, dtype=torch.long, device=ids.device)

    def step() -> None:
        model(ids, position, slot)

    step()  # (the first after a layout or a new cache runs cold)
    start = time.perf_counter()
    step()
    one = model.tp.max_(torch.tensor([time.perf_counter() - start], dtype=torch.float64)).item()
    rounds = min(ROUNDS, int(BUDGET_S / (one * len(CANDIDATES) * (STEPS + 1))))
    if rounds < 2:  # (one round's step each: noise, not a choice)
        return 0, f"not timed, a step took {one * 1e3:.0f} ms"
    step_ms = measure(step, model.tp.max_, model._tick, rounds)
    return choose(step_ms), "step ms " + ", ".join(f"{a}: {ms:.2f}" for a, ms in step_ms.items())


def describe() -> str:
    """'; row-ahead N' where a model's batch-1 decode set it (its place in the plan's line), else ''."""
    return f"; row-ahead {ROW_AHEAD.bytes}" if ROW_AHEAD.chosen else ""
