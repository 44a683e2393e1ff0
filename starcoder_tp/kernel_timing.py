"""How kernels.py times a weight's candidate kernels: what each timed call runs, and how long.

The MLP's first linear is timed with its activation, as the model runs it: fused into the GEMM
as oneDNN's post-op on the packed layout, a separate pass after the other kernels (in bf16 that
pass cost as much as the GEMM at 2048 rows on an AMX Xeon: RESULTS.md, "Fused activation").

Decode candidates are timed over copies of the weight, so that between two calls on one copy as
many bytes are read as a decode step of the model reads (up to decode_set_bytes()): a large
model's step streams its weights from memory, and timed from the cache the ranking was not the
same, and the timings summed to half to two thirds of the model's real step (decode_copies;
RESULTS.md, "Decode candidates timed from memory"). The candidates' calls are interleaved, one of
each in turn, each over copies of its own: K candidates' copies come to about K / (K - 1) steps'
bytes in all (two: one step's), not a step's for each layout (decode_calls, Rotation). Prefill
candidates run on one copy: their GEMMs reuse each weight block over many rows.

Bounded: one warm call (in a rotation, one on each copy) and one probe call per candidate, then
candidates over PRUNE_FACTOR x the best probe's time, on that call and on a second one, are dropped;
the probe calls are the first of ROUNDS rounds, the rest run ROUNDS - 1 more of at least ROUND_MIN_S
and one call each (decode candidates: DECODE_MIN_CALLS calls; interleaved, a candidate dropped only
where the rest keep a step between two calls on one copy: _interleaved_ms). Where suspect_shapes
names a shape, or kernels.traded a prefill of it, that timing of it is taken once more. A weight
larger than the decode set has its decode candidates timed on its first rows (decode_rows). On the
bench-size model a plan takes 6-9 s per batch size in fp32 and 3-6 s in bf16 on one thread of
the CPUs we measured (RESULTS.md): the prefill calls at 512 rows, then the decode copies (MKL packs
at ~0.8 GB/s, a VM's first touch of memory slower). On StarCoder's shapes the prefill calls at 512
rows dominate, 3-4 calls of each surviving candidate (estimated 10-30 s per batch size on one
thread of a large CPU; once per machine, the plan is cached).
"""
from __future__ import annotations

import functools
import itertools
import math
import statistics
from time import perf_counter
from typing import Callable, Iterable

import torch

from . import malloc
from .cpu import last_level_cache_bytes
from .layouts import ONEDNN_LAYOUTS, PACKERS, pack, pack_mkl

ROUNDS = 3  # alternating rounds per candidate (A B C, C B A, A B C; interleaved decode calls: A B C A B C ...): drift
# hits all alike; the probes are the first
ROUND_MIN_S = 0.004  # each candidate runs at least this long per round (and at least one call)
# A decode candidate runs at least this many calls per round: with one call a round (the lm_head's
# 10-13 ms), its median came from three calls each just after another candidate's, and ranked the
# lm_head's layouts within +-8% either way from one plan to the next, where four a round ranked
# them as the model's own step does, 15-19% apart (RESULTS.md, "Decode calls per round").
DECODE_MIN_CALLS = 4
# Decode candidates rotate over copies of their weight (decode_copies), as many bytes as
# decode_set_bytes: from memory, as a large model's step runs. One thread of the AVX-512 Xeon (its VM
# reports a 480 MiB L3) read a 16 MB weight at 27.4 GB/s rotated over 64 MB, 16.6 over 256 MB,
# 15.5-15.6 over 512 MB and 1 GB; the EPYC Zen 5 (32 MiB L3) at 25.1 over 32 MB, 19.7 over 64 MB, 19.4
# over 128 MB, 18.2 over 512 MB, and over 128 MB its plans chose as over 256 MB, in less than half
# the time: making the copies is most of it (RESULTS.md, "Weights out of the file's mapping"). On
# the EPYC Zen 4 (32 MiB L3) 64 MiB sets chose as 128 MiB ones, the one-row timings alike within
# their noise, and the plan took 1.2-3.2 s less: a VM faults fresh huge pages in at ~1 GB/s (RESULTS.md,
# "Start-up: decode sets of two caches").
DECODE_SET_BYTES = 256 << 20  # at most: it bounds the measurement's extra memory (K >= 3 candidates: ~K / (K - 1) sets)
DECODE_SET_CACHES = 2  # else this many times the last-level cache,
DECODE_SET_MIN_BYTES = 64 << 20  # and at least this
# A weight larger than the decode set has its decode candidates timed on its first rows (decode_rows),
# each round as many calls as streams the whole's bytes, and the times scaled to the whole. Making
# the whole's copy in each candidate's layout took 1.5-2.8 s for the bench-size lm_head on the EPYC
# Zen 4 VM, and the GPTBigCode bench model's fp32 start-up from scratch about 2-2.5 s longer. On
# 16384 of that lm_head's 49152 rows the candidates ran per row up to 17% faster than on the whole
# (the slice partly from the L3, as the other shapes' sets of copies), in the same order but for one
# pair within 5%; on 2688 of a [24576, 6144] weight's rows MKL's packed layout ran 11-56% slower
# than on the whole, most others faster (RESULTS.md, "Start-up: a large weight's decode candidates
# on its first rows"). The MLP's first linear is timed whole: its GELU's form depends on the size.
DECODE_SLICE_MIN_ROWS = 16384
DECODE_SLICE_BLOCK = 64  # rows: whole panels (16) and oneDNN blocks
# A candidate this much slower than the best on its probe call, and again on a second call, is
# not timed further: the rounds tell apart candidates within a few percent (3-6% from one plan to
# the next), and one twice as slow as the best on two calls is not among them. At 512 prefill rows
# in fp32 the EPYC Zen 5 ran plain F.linear, MKL's packed layout and oneDNN's unpacked 2.2-2.4x the
# best's time, and their rounds were ~0.9 s of a 10 s plan (RESULTS.md, "Panels at one row").
PRUNE_FACTOR = 2.0
# A shape's timing is taken again (suspect_shapes) where one of its candidates ran at under this
# fraction of its own median speed over the plan's shapes.
SUSPECT_FRACTION = 0.5


def _timed(call: Callable[[], object]) -> float:
    started = perf_counter()
    call()
    return perf_counter() - started


@torch.no_grad()  # as the model runs: no autograd record (and the split GELU runs only without)
def time_ms(calls: dict[str, Callable[[], object]], on_progress: Callable[[], None] = lambda: None,
            min_calls: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each candidate, over ROUNDS rounds in alternating order: the
    probe calls, one each, then rounds of at least ROUND_MIN_S and `min_calls` calls each; a
    candidate over PRUNE_FACTOR times the best's time on its probe call and on a second one keeps
    the faster of those two times. A Rotation's calls are interleaved instead (_interleaved_ms)."""
    if len(calls) == 1:  # nothing to choose between
        return {name: 0.0 for name in calls}
    if isinstance(calls, Rotation):
        return _interleaved_ms(calls, on_progress, min_calls)
    for call in calls.values():
        call()  # the first call allocates, and oneDNN builds its primitive
        on_progress()
    samples = {name: [_timed(call)] for name, call in calls.items()}  # the probes: the first round
    on_progress()
    best = min(s[0] for s in samples.values())
    for name, call in calls.items():  # (a call slowed once, by an interrupt, is not a verdict)
        if samples[name][0] > PRUNE_FACTOR * best:
            samples[name].append(_timed(call))
            on_progress()
    probes = {name: min(s) for name, s in samples.items()}
    names = [name for name in calls if probes[name] <= PRUNE_FACTOR * best]
    for round_ in range(1, ROUNDS):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            spent, made = 0.0, 0
            while spent < ROUND_MIN_S or made < min_calls:  # at least one call
                elapsed = _timed(calls[name])
                samples[name].append(elapsed)
                spent, made = spent + elapsed, made + 1
                on_progress()  # a rank's heartbeat: one call of a large shape can take seconds
    return {name: (statistics.median(samples[name]) if name in names else probes[name]) * 1e3 for name in calls}


class Rotation(dict):
    """Decode calls, each candidate's on `each` copies of its own, which only calls interleaved,
    one of each candidate in turn, keep `copies` - 1 calls apart on one copy, a decode step's
    bytes (decode_calls): time_ms times them so, never one candidate's calls in a row."""

    def __init__(self, copies: int, each: int):
        super().__init__()
        self.copies, self.each = copies, each

    def keeps_a_step(self, names: Iterable[str]) -> bool:
        """Whether the calls of `names` alone, one of each in turn, still keep `copies` - 1 other
        calls between two on one copy: each goes round its copies in `each` turns."""
        return self.each * len(list(names)) >= self.copies


def _interleaved_ms(calls: Rotation, on_progress: Callable[[], None], min_calls: int) -> dict[str, float]:
    """time_ms's rounds for a Rotation: warm turns over every copy (the first call allocates, and
    oneDNN builds its primitive; and no timed call finds its copy in the caches from its making,
    each candidate's copies made one after the other), a first round of one call each (two, where
    one is over PRUNE_FACTOR times the best's time), then ROUNDS - 1 rounds, each going round
    the candidates, one call of each in turn and always in the same order (a reversed one would
    call the candidate at the turn twice in a row, on one copy where it has one), until every one
    of them has run at least ROUND_MIN_S and `min_calls` calls in it. A candidate over PRUNE_FACTOR
    times the best's time on both first calls is dropped, the slowest first, where the rest keep
    a step's bytes between two calls on one copy (Rotation.keeps_a_step; of two candidates, neither),
    and keeps the faster."""
    names = list(calls)
    for _ in range(calls.each):
        for name in names:
            calls[name]()
        on_progress()
    samples: dict[str, list[float]] = {name: [] for name in names}

    def turn(spent: dict[str, float], made: dict[str, int]) -> None:
        for name in names:
            elapsed = _timed(calls[name])
            samples[name].append(elapsed)
            spent[name], made[name] = spent[name] + elapsed, made[name] + 1
        on_progress()  # a rank's heartbeat

    for round_ in range(ROUNDS):
        spent, made = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        least_s, least_calls = (0.0, 1) if round_ == 0 else (ROUND_MIN_S, min_calls)
        while any(spent[name] < least_s or made[name] < least_calls for name in names):
            turn(spent, made)
        if round_ == 0:
            if max(samples[name][0] for name in names) > PRUNE_FACTOR * min(samples[name][0] for name in names):
                turn(spent, made)  # (a call slowed once, by an interrupt, is not a verdict)
            best = min(min(s) for s in samples.values())
            for name in sorted(names, key=lambda n: -min(samples[n])):
                if min(samples[name]) > PRUNE_FACTOR * best and calls.keeps_a_step(set(names) - {name}):
                    names.remove(name)
    return {name: (statistics.median(s) if name in names else min(s)) * 1e3 for name, s in samples.items()}


def time_across_ranks(calls_by_size: list[dict[str, Callable[[], object]]],
                      slowest: Callable[[torch.Tensor], torch.Tensor],
                      on_progress: Callable[[], None] = lambda: None) -> list[dict[str, float]]:
    """time_ms of each set of calls (the same names in each), every figure the slowest rank's:
    `slowest` reduces a float64 tensor to its maximum over the ranks, so that every rank reads
    the same timings and decides alike. Every rank must call it in step."""
    names = list(calls_by_size[0])
    local = []
    for calls in calls_by_size:
        ms = time_ms(calls, on_progress)  # (a rank's heartbeat, between calls)
        local += [ms[name] for name in names]
    reduced = slowest(torch.tensor(local, dtype=torch.float64)).tolist()
    return [dict(zip(names, reduced[i * len(names):(i + 1) * len(names)])) for i in range(len(calls_by_size))]


@functools.cache
def decode_set_bytes() -> int:
    """The bytes decode candidates rotate over at most: DECODE_SET_CACHES times this machine's
    last-level cache, within DECODE_SET_MIN_BYTES and DECODE_SET_BYTES (DECODE_SET_BYTES where
    the system reports no cache)."""
    cache = last_level_cache_bytes()
    return DECODE_SET_BYTES if cache is None else min(DECODE_SET_BYTES, max(DECODE_SET_MIN_BYTES,
                                                                            DECODE_SET_CACHES * cache))


def decode_rows(n: int, k: int, element_size: int) -> int:
    """How many of an [N, K] weight's first rows its decode candidates are timed on: all of a weight
    that fits in decode_set_bytes(), else as many whole blocks of DECODE_SLICE_BLOCK rows as fit,
    but at least DECODE_SLICE_MIN_ROWS (kernels.measure scales the times to all N rows)."""
    if n * k * element_size <= decode_set_bytes():
        return n
    fit = decode_set_bytes() // (k * element_size) // DECODE_SLICE_BLOCK * DECODE_SLICE_BLOCK
    return min(n, max(DECODE_SLICE_MIN_ROWS, fit))


def decode_copies(weight_bytes: int, step_bytes: int) -> int:
    """How many calls on copies of a weight, each reading the whole, make as many bytes as a decode
    step of the model reads (`step_bytes`), up to decode_set_bytes(): decode_calls keeps that many
    less one between two calls on one copy (one: no copies to go round). A model larger than the cache streams
    its weights from memory at every step; timed on one weight, over and over, a candidate ran
    from the cache instead, and the ranking could differ (RESULTS.md, "Decode candidates timed
    from memory"). A model that fits in the cache is timed in it, as it runs."""
    if weight_bytes <= 0:
        raise ValueError(f"decode_copies: a weight of {weight_bytes} bytes")
    return max(1, math.ceil(min(step_bytes, decode_set_bytes()) / weight_bytes))


def suspect_shapes(ms_by_shape: dict[str, dict[str, float]], weight_bytes: dict[str, int],
                   groups: dict[str, list[tuple[str, ...]]] | None = None) -> list[str]:
    """The shapes to time again, from one kind of timing (decode, or prefill at one row count) of
    every shape: where a candidate ran at under SUSPECT_FRACTION of its own median speed (weight
    bytes per ms: at one row count a call's work is proportional to them) over the shapes it was
    timed at (three at least). A kernel runs the shapes of one model alike to within 2x; a
    disturbance does not: in the seconds after a large process (vLLM) exited, on the EPYC Zen 5 VM,
    the first shape's candidates (the rest not) were timed 2-47x slow, and the plan cached for the
    machine chose MKL's packed layout there, whose prefill runs at half speed (RESULTS.md, "Weights
    out of the file's mapping"). A candidate slow for a reason stays slow when timed again.
    `groups` (shape: kernels of which the fastest is one figure, a decode layout's prefill kernels)
    counts a slow candidate only where, at the fastest it ran any shape, it would be a group's
    fastest: timed again, one that loses even so cannot change the plan (unpacking oneDNN's layout of
    1024x4096 into fresh memory on the EPYC Zen 4 VM, 5-10x its speed elsewhere: RESULTS.md). A kernel
    disturbed on the one shape it runs fastest is not seen so: its figure there stays."""
    speeds: dict[str, dict[str, float]] = {}
    for shape, timings in ms_by_shape.items():
        for kind, ms in timings.items():
            if ms > 0:  # (0: a lone candidate, not timed)
                speeds.setdefault(kind, {})[shape] = weight_bytes[shape] / ms
    suspect = set()
    for kind, by_shape in speeds.items():
        if len(by_shape) < 3:
            continue
        median, fastest = statistics.median(by_shape.values()), max(by_shape.values())
        suspect |= {shape for shape, speed in by_shape.items() if speed < SUSPECT_FRACTION * median and (
            groups is None or _could_lead(kind, weight_bytes[shape] / fastest, ms_by_shape[shape],
                                          groups.get(shape, [(kind,)])))}
    return sorted(suspect)


def _could_lead(kind: str, ms_at_best: float, ms: dict[str, float], groups: list[tuple[str, ...]]) -> bool:
    """Whether `kind`, at `ms_at_best`, would be the fastest of a group it is in (the others at their `ms`)."""
    return any(ms_at_best < min((ms[k] for k in group if k != kind and k in ms), default=math.inf)
               for group in groups if kind in group)


def _activation(activation: str | None) -> tuple[Callable, str, str]:
    from .activations import ACTIVATIONS  # (activations.calibrate uses this module)
    return ACTIVATIONS[activation] if activation else (lambda y: y, "none", "")


def _panels_call(packed: torch.Tensor, x: torch.Tensor, activation: str | None) -> Callable[[], torch.Tensor]:
    """A timed call of panels on `packed`, bound as the model's (Linear._panels), with the activation
    as Linear.forward_activated runs it: on the accumulator where the kernel takes it, else after."""
    from . import panels

    eager, post_op, algorithm = _activation(activation)
    fused = (post_op, algorithm) if activation and panels.fuses(post_op, algorithm) else None
    bound = panels.Bound(packed, None, fused)
    return (lambda: bound(x)) if fused else (lambda: eager(bound(x)))


def side_by_side(tensor: torch.Tensor, count: int, on_progress: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
    """`count` copies of `tensor`, side by side in one block placed as the model's weights are
    (malloc.empty: in huge pages where the rank asked for them, without rounding each copy up to
    whole pages); `on_progress` after each."""
    if count < 1:
        return []
    with torch.no_grad():  # (weights, never differentiated; unbind's views would refuse copy_ under grad mode)
        block = malloc.empty((count, *tensor.shape), tensor.dtype)
        copies = [block[i] for i in range(count)]
        for copy in copies:
            copy.copy_(tensor)
            on_progress()
    return copies


def decode_calls(weight: torch.Tensor, rows: int, kinds: Iterable[str], activation: str | None = None,
                 copies: int = 1, on_progress: Callable[[], None] = lambda: None) -> dict[str, Callable[[], object]]:
    """Callables running each decode candidate at `rows` rows, each call on the next copy of the
    weight in its layout, of the candidate's own. With `copies` (decode_copies) over one, a
    Rotation, timed interleaved: each of K candidates has ceil(copies / (K - 1)) copies (of two,
    ceil(copies / 2)), so that calls of all, or of all but one, one of each in turn, keep at least
    `copies` - 1 calls on other copies between two on one, as when each candidate went round
    `copies` copies and ran its calls in a row, with about K / (K - 1) steps' bytes of copies in
    all (two: one step's) rather than a step's for each layout (RESULTS.md,
    "Start-up: the decode candidates interleaved over one rotation"). `on_progress` after each
    copy made: a rank's heartbeat, as MKL packs only ~0.8 GB/s. With an `activation` (the MLP's
    first linear) each call includes it as the model runs it (Linear.forward_activated): oneDNN's
    post-op on the packed weight, applied after the other kernels."""
    from . import gemv, panels, rowdot
    from .linear import fp32_linear, mkl_linear, packed_linear

    def made(copy: torch.Tensor | None) -> torch.Tensor | None:
        on_progress()
        return copy

    kinds = list(kinds)
    plain_kinds = [kind for kind in kinds if kind in ("plain", "fp32", "gemv", "rowdot")]
    # Each candidate's copies: so many that one turn of all but one keeps a step between two calls on
    # one copy (time_ms may drop a slow candidate: Rotation.keeps_a_step).
    each = max(1, math.ceil(copies / (len(kinds) - 1 if len(kinds) >= 3 else len(kinds))))
    eager, post_op, algorithm = _activation(activation)
    x = torch.randn(rows, weight.shape[1]).to(weight.dtype)
    sizes = weight.new_empty(1).expand(weight.shape)
    # (the weight itself may be the part file's mapping: load_model leaves it there until its lay-out)
    shared = copies == 1  # (no rotation: one plain copy for all the candidates running it)
    plains = side_by_side(weight, min(len(plain_kinds), 1) if shared else each * len(plain_kinds), on_progress)
    next_plain = {kind: itertools.cycle(plains if shared else plains[i * each:(i + 1) * each]).__next__
                  for i, kind in enumerate(plain_kinds)}
    calls = Rotation(copies, each) if copies > 1 else {}  # (else: time_ms's rounds, each candidate's calls in a row)
    for kind in kinds:
        if kind in ONEDNN_LAYOUTS:  # a clone copies oneDNN's packed bytes, faster than reordering the weight again
            first = made(PACKERS[kind](weight, rows))  # (never MKL's: its buffer is not what its tensor describes)
            nxt = itertools.cycle([first] + [made(first.clone()) for _ in range(each - 1)]).__next__
            calls[kind] = lambda n=nxt: packed_linear(x, n(), None, post_op, algorithm)
        elif kind == "mkl_packed":
            nxt = itertools.cycle([made(pack_mkl(weight, rows)) for _ in range(each)]).__next__
            calls[kind] = lambda n=nxt: eager(mkl_linear(x, n(), sizes, None))
        elif kind == "panels":
            first = made(panels.pack(weight, rows))  # (a copy of it, not a permutation of the weight again)
            nxt = itertools.cycle([_panels_call(copy, x, activation)
                                   for copy in [first] + side_by_side(first, each - 1, on_progress)]).__next__
            calls[kind] = lambda n=nxt: n()()
        elif kind == "fp32":
            calls[kind] = lambda n=next_plain[kind]: eager(fp32_linear(x, n(), None))
        elif kind in ("gemv", "rowdot"):
            one_row = (gemv if kind == "gemv" else rowdot).linear
            calls[kind] = lambda n=next_plain[kind], f=one_row: eager(f(x, n(), None))
        else:
            calls[kind] = lambda n=next_plain[kind]: eager(torch.nn.functional.linear(x, n()))
    return calls


def prefill_calls(weight: torch.Tensor, rows: int, kinds: Iterable[str], prefill_rows: int,
                  activation: str | None = None, plain: torch.Tensor | None = None) -> dict[str, Callable[[], object]]:
    """Callables running each prefill kernel the decode layouts `kinds` (packed for `rows` rows)
    can run, at `prefill_rows` rows (at least rows + 1: more than a decode step), with the
    activation as decode_calls. One copy: a prefill's GEMM reuses each weight block over its
    rows. The plain kernels run on `plain`, a copy of `weight` placed as a laid-out plain weight
    (made here if not given), never on `weight` itself: it may be the part file's mapping, in pages
    of 4 KiB (load_model leaves a linear weight there until its lay-out)."""
    from . import panels
    from .linear import fp32_linear, mkl_linear, packed_linear

    eager, post_op, algorithm = _activation(activation)
    linear = torch.nn.functional.linear
    x = torch.randn(max(rows + 1, prefill_rows), weight.shape[1]).to(weight.dtype)
    plain = side_by_side(weight, 1)[0] if plain is None else plain
    calls = {}
    for kind in kinds:
        if kind in ONEDNN_LAYOUTS:
            packed = PACKERS[kind](weight, rows)
            calls[kind] = lambda p=packed: packed_linear(x, p, None, post_op, algorithm)
            if kind == "onednn":  # (kernels.PREFILL_KERNELS: the wide layout is not unpacked)
                calls["unpack"] = lambda p=packed: eager(linear(x, p.to_dense()))
        elif kind == "mkl_packed":
            packed, sizes = pack_mkl(weight, rows), weight.new_empty(1).expand(weight.shape)
            calls[kind] = lambda p=packed: eager(mkl_linear(x, p, sizes, None))
        elif kind == "fp32":
            calls[kind] = lambda: eager(fp32_linear(x, plain, None))
        elif kind == "panels":
            calls[kind] = _panels_call(panels.pack(weight, rows), x, activation)
        else:  # plain, gemv and rowdot (whose prefill is plain's)
            calls["plain"] = lambda: eager(linear(x, plain))
            if pack(weight[:1], 1) is not None:  # oneDNN takes this dtype
                calls["onednn_plain"] = lambda: packed_linear(x, plain, None, post_op, algorithm)
    return calls
