"""How the panels kernel asks for its weight ahead: chosen on the model's own decode step.

At batch 1 a decode step streams every weight once, hundreds of MiB, past caches of a few MiB.
Read the plain way (the hardware's prefetcher), the weights evict what the rest of the step uses
(the interpreter, torch's dispatch, the activations, the KV cache), and the few hundred small ops
between the linears then wait on memory: in the bench-size model's bf16 step on the EPYC Zen 4
they took 1.7 ms, against 0.7 ms with the kernels replaced by no-ops. Asked for ahead with
non-temporal hints instead (panels.c, ONE_ROW), the weights pass without evicting it: there the
step ran 2-6% faster asking 2-4 KiB ahead, although the kernel alone reads up to 13% slower so,
and up to 6% slower asking 6 KiB ahead (RESULTS.md, "Non-temporal asks at one row").

At batches of several rows each block of rows asks for the next block of panels as it runs
(panels.c, PREFETCH_STEP), into L1 or into L2. On the Zen 4 asking into L2 made the bench-size
models' batch-16 decode steps 6-8% shorter, batch 4 3-9% (neither interval clear of 1); panels were
not measured so on the EPYC Zen 5, where the same hint made the decode attention's asks slower
(RESULTS.md, "Panels' block asks into L2, chosen on the step"). The setting holds for every call of
several rows until the next request settles it, the prefill's at that batch too (untimed: its panels
are compute-bound, and on the Zen 4 its first tokens did not move).

Either is a property of the CPU (its prefetchers, its miss buffers, its caches' ways) and shows in
the step, not in the kernel: so it is timed on the step itself, the candidates in turn, every rank
at once, the slowest rank's time taken, and cached per machine, model and batch like the kernel
plan. A model whose step is too slow to time twice within BUDGET_S keeps the defaults (nothing
ahead, into L1): its weights' time dwarfs what the choice moves. Where the plan's own timings of its
weights say so already, no step is run to find out (a large model's takes seconds, at every start).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from . import rowdot
from .decode_attention import DECODE_FORM
from .cpu import cpu_cores, cpu_model, isa_flags
from .files import cache_dir, write_atomic
from .malloc import THP_ENV

if TYPE_CHECKING:
    from .kernels import Choice  # (kernels.py uses this module)


class Knob(NamedTuple):
    """One of the asks' settings: its name (in the plan's line and the cache file), its candidates
    (the first the default, the hardware alone: 0 in both), how a value reads in the plan's line."""
    name: str
    candidates: tuple[int, ...]
    label: Callable[[int], str]


ROW = Knob("row-ahead", (0, 2048, 3072, 4096), str)  # batch 1: bytes ahead, non-temporal
BLOCK = Knob("block-asks", (0, 1), lambda l2: "L2" if l2 else "L1")  # more rows: the next block into L1 or L2
ROUNDS = 4  # each candidate's steps, in turn with the others' (the machine's speed drifts)
STEPS = 2  # timed steps a round, after one untimed (it inherits the previous candidate's caches)
BUDGET_S = 1.0  # at most this long measuring: a model whose step is slower is dominated by its weights
MARGIN = 0.02  # a candidate is taken only if its step is this much faster than the default
VERSION = 2  # part of the cache key: a change in what is measured invalidates old choices


def knob_for(batch: int) -> Knob:
    """The setting a decode step of `batch` rows runs: one row's distance, or several rows' blocks."""
    return ROW if batch == 1 else BLOCK


class Asks:
    """The process's choices as panels.c runs them (`bytes` ahead at one row, `l2` for blocks of rows),
    and how the one in force was reached."""

    def __init__(self) -> None:
        self.bytes, self.l2 = 0, 0
        self.knob: Knob | None = None  # the one a model's decode set, with `chosen`: how
        self.chosen = ""
        self.settled_for: tuple | None = None  # (a weak reference to the model, its plan, threads, batch)

    def settled(self, model, plan: str, batch: int) -> bool:
        return (self.settled_for is not None and self.settled_for[0]() is model
                and self.settled_for[1:] == (plan, torch.get_num_threads(), batch))


ASKS = Asks()


def set_bytes(ahead: int) -> None:
    """Make the library's one-row calls ask `ahead` bytes ahead (0: nothing)."""
    if ahead < 0 or ahead % 64:
        raise ValueError(f"panel_asks: {ahead} bytes is not a non-negative multiple of 64")
    lib, _ = rowdot.library()
    if lib is not None:
        lib.panels_row_ahead(ahead)
    ASKS.bytes = ahead


def set_l2(l2: int) -> None:
    """Make the library's blocks of rows ask for the next block into L2 (1) or into L1 (0)."""
    if type(l2) is not int or l2 not in BLOCK.candidates:
        raise ValueError(f"panel_asks: block asks {l2!r} is neither 0 (into L1) nor 1 (into L2)")
    lib, _ = rowdot.library()
    if lib is not None:
        lib.panels_block_asks(l2)
    ASKS.l2 = l2


def _apply(knob: Knob, value: int) -> None:
    (set_bytes if knob is ROW else set_l2)(value)


def reset() -> None:
    """The defaults until a model settles again (kernels.measure: the plan's candidates are timed alone,
    none of them asking ahead or into L2)."""
    set_bytes(0)
    set_l2(0)
    ASKS.knob, ASKS.chosen, ASKS.settled_for = None, "", None


def choose(step_ms: dict[int, float]) -> int:
    """The candidate whose step was fastest, where it beats the default (0) by MARGIN; else 0."""
    best = min(step_ms, key=lambda value: (step_ms[value], value))
    return best if step_ms[best] < step_ms[0] * (1 - MARGIN) else 0


def measure(step: Callable[[], object], slowest: Callable[[torch.Tensor], torch.Tensor],
            on_progress: Callable[[], None] = lambda: None, rounds: int = ROUNDS,
            knob: Knob = ROW) -> dict[int, float]:
    """Each of `knob`'s candidates' step time (ms; the median of its rounds, each round's the mean of
    STEPS steps, the slowest rank's), the candidates run in turn, in a rotated order each round. Every
    rank calls it in step (`step` runs the model's collectives)."""
    values = knob.candidates
    samples: dict[int, list[float]] = {value: [] for value in values}
    try:
        for r in range(rounds):
            for value in values[r % len(values):] + values[:r % len(values)]:
                _apply(knob, value)
                step()  # (untimed: it starts from the caches the previous candidate left)
                start = time.perf_counter()
                for _ in range(STEPS):
                    step()
                samples[value].append((time.perf_counter() - start) * 1e3 / STEPS)
                on_progress()
    finally:
        _apply(knob, 0)
    local = [statistics.median(samples[value]) for value in values]
    return dict(zip(values, slowest(torch.tensor(local, dtype=torch.float64)).tolist()))


def machine_key(model) -> dict:
    """What a choice timed on `model`'s step holds for: this machine, torch, threads and ranks, our
    kernels' build, the model's shape and dtype, whether its layers ran fused (fused_step.py), and the
    decode attention's form (decode_attention.DECODE_FORM)."""
    config = model.config
    return {"cpu_model": cpu_model(), "cpu_isa": isa_flags(), "cores": cpu_cores(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "world_size": model.tp.world_size,
            "kernels": rowdot.path(), "huge_pages": os.environ.get(THP_ENV, "") == "1",
            "model": [config.model_type, config.n_layer, config.n_embd, config.n_head, config.n_inner,
                      str(model.transformer.ln_f.weight.dtype)],
            "fused": bool(getattr(model, "fused", None)),
            "decode_attention": "ours" if DECODE_FORM.ours else "sdpa"}  # (inside a fused step, or between its calls)


def _key(model, plan: str, knob: Knob, batch: int) -> dict:
    return {"version": VERSION, "knob": knob.name, "candidates": list(knob.candidates), "margin": MARGIN,
            "batch": batch, "plan": plan, **machine_key(model)}


def record_path(name: str, key: dict) -> Path:
    """The cache file of a choice named `name` for exactly `key` (its digest in the name)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir("forms", f"{name}-{digest}.json")


def read_record(path: Path, key: dict) -> dict | None:
    """The record cached in `path` for exactly `key`, or None (none, another key's, unreadable)."""
    try:
        stored = json.loads(path.read_text())
        return stored if isinstance(stored, dict) and stored.get("key") == key else None
    except (OSError, ValueError):
        return None


def write_record(path: Path, record: dict, who: str) -> None:
    """Cache `record` (with its "key") in `path`, atomically; a failure is reported, not raised."""
    try:
        write_atomic(path, json.dumps(record, indent=1, sort_keys=True))
    except OSError as err:
        print(f"[{who}] could not cache the choice in {path}: {err}", file=sys.stderr)


def settle(model, batch: int) -> None:
    """Set the panels' asks for `model`'s decode at `batch` rows (knob_for): measured (or this machine's
    cached choice) where its plan is measured (`auto`) and a linear runs panels; the defaults otherwise.
    Every rank calls it in step, after the KV cache is allocated: the timed steps write one cache slot
    in each sequence, which a request writes before it reads. Whether a collective runs depends on the
    mode and the (plan, batch) last settled for, which the ranks share (a plan is measured by all of
    them together, or read from the cache file a machine's ranks share); whether a rank can ask (panels
    in its plan, the library built) is agreed on in that collective."""
    if model.kernel_mode != "auto":
        reset()
        return
    knob = knob_for(batch)
    panels = sorted(name for name, choice in model.kernel_plan.items() if choice.decode == "panels")
    plan = ";".join(panels)
    if ASKS.settled(model, plan, batch):
        return  # (setup_cache runs before every request)
    reset()  # (the other knob's choice does not carry over to this batch)
    key = _key(model, plan, knob, batch)
    path = record_path(knob.name, key)
    stored = read_record(path, key)
    cached = (stored.get("value"), str(stored.get("how"))) if stored else None
    if cached and (type(cached[0]) is not int or cached[0] not in knob.candidates):
        cached = None  # (not a candidate of ours: measured again)
    # (the asks are AVX-512's kernels' own: panels_avx2.c's leave the stream to the hardware's prefetcher)
    wide = "avx512bf16" if model.transformer.ln_f.weight.dtype == torch.bfloat16 else "avx512"
    usable = bool(panels) and rowdot.library()[0] is not None and rowdot.runs_at_least(wide)
    # Every rank measures if any lacks it (the timings are reduced across ranks); none if one cannot ask.
    lacking, unusable = model.tp.max_(torch.tensor([cached is None, not usable], dtype=torch.float64)).tolist()
    if unusable:
        value, how, cached = 0, "", None
    elif lacking:
        cached = None
        with torch.inference_mode():
            value, how = _measured(model, batch)
        if how.startswith("step ms"):  # (not a step too slow to time once, perhaps cold: timed again next time)
            write_record(path, {"key": key, "value": value, "how": how}, "panel_asks")
    else:
        value, how = cached
    _apply(knob, value)
    ASKS.knob, ASKS.chosen = (knob, f"{'cached' if cached else 'measured'}: {how}") if how else (None, "")
    ASKS.settled_for = (weakref.ref(model), plan, torch.get_num_threads(), batch)


def decode_step(model, batch: int) -> Callable[[], None]:
    """One decode step of `model` at `batch` rows, to time: unmasked, as a batch of equal prompts decodes
    (a padded batch's masked steps run op by op, untimed), some way into a sequence, one cache slot
    written in each (what a request reads, it writes first)."""
    ids = torch.zeros((batch, 1), dtype=torch.long, device=model.transformer.ln_f.weight.device)
    slot = min(model.cache_len - 1, 128)
    position = torch.full((batch, 1), slot, dtype=torch.long, device=ids.device)

    def step() -> None:
        model(ids, position, slot)

    return step


def first_step_s(model, step: Callable[[], None]) -> float:
    """One warm `step`'s seconds, the slowest rank's (the first after a layout or a new cache runs cold)."""
    step()
    start = time.perf_counter()
    step()
    return model.tp.max_(torch.tensor([time.perf_counter() - start], dtype=torch.float64)).item()


def weights_s(model, plan: dict[str, Choice]) -> float:
    """A decode step's linears by `plan`'s own timings (each weight its decode kernel's, from memory), in
    seconds: the least a step takes, known without running one (0 for weights without timings); the
    slowest rank's (ranks on other nodes may read plans measured apart), so that every rank decides alike.
    Every rank calls it in step."""
    from .linear import Linear
    keys = [module.shape_key() for module in model.modules() if isinstance(module, Linear)]
    if model.config.tie_word_embeddings:
        keys.append(model.transformer.wte.shape_key())
    chosen = [plan[key] for key in keys if key in plan]
    local = sum(c.decode_ms[c.decode] for c in chosen if c.decode_ms and c.decode in c.decode_ms) / 1e3
    return model.tp.max_(torch.tensor([local], dtype=torch.float64)).item()


def _measured(model, batch: int = 1) -> tuple[int, str]:
    """(the candidate of knob_for(batch) that `model`'s step at `batch` rows ran fastest with, how it was
    chosen)."""
    knob = knob_for(batch)
    least = weights_s(model, model.kernel_plan)  # (a large model's step is not run to find out it is too slow)
    if least * len(knob.candidates) * (STEPS + 1) * 2 > BUDGET_S:
        return 0, f"not timed, the plan's weights take {least * 1e3:.0f} ms a step"
    step = decode_step(model, batch)
    one = first_step_s(model, step)
    rounds = min(ROUNDS, int(BUDGET_S / (one * len(knob.candidates) * (STEPS + 1))))
    if rounds < 2:  # (one round's step each: noise, not a choice)
        return 0, f"not timed, a step took {one * 1e3:.0f} ms"
    step_ms = measure(step, model.tp.max_, model._tick, rounds, knob)
    return choose(step_ms), "step ms " + ", ".join(f"{knob.label(v)}: {ms:.2f}" for v, ms in step_ms.items())


def describe() -> str:
    """'; row-ahead N' or '; block-asks L1|L2' where a model's decode set it (its place in the plan's
    line), else ''."""
    knob = ASKS.knob
    return "" if knob is None else f"; {knob.name} {knob.label(ASKS.bytes if knob is ROW else ASKS.l2)}"
