"""Where a request's set-up went: the seconds each phase of TPCausalLM.setup_cache took (the forms'
calibration, the kernel plan, the weights' lay-out, the cache, the fused step timed against the plan,
the panels' asks), outside the timed steps. A first case that takes long says why in the perf
suite's log and the CLIs' output, rather than only that it did."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

SHOWN_FROM_S = 0.05  # phases shorter than this are left out of the line


@contextmanager
def timed(phases: dict[str, float], name: str, clock: Callable[[], float] = time.perf_counter) -> Iterator[None]:
    """Add the seconds of the block to `phases[name]`, however it ends."""
    started = clock()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + clock() - started


def merged(*all_phases: dict[str, float]) -> dict[str, float]:
    """The phases of several set-ups, each phase's seconds summed, in their first order."""
    out: dict[str, float] = {}
    for phases in all_phases:
        for name, seconds in phases.items():
            out[name] = out.get(name, 0.0) + seconds
    return out


def describe(phases: dict[str, float]) -> str:
    """'8.4 s (forms 1.3, kernel plan 5.6, lay-out 0.6, panels' asks 0.9)'."""
    shown = ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items() if seconds >= SHOWN_FROM_S)
    return f"{sum(phases.values()):.1f} s" + (f" ({shown})" if shown else "")
