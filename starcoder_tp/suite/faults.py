"""Test-only faults injected into generation: a slower step, as a slower kernel would make it.
The gate's tests prove with it that a slowdown is caught; the fault tests hold a request open
with it for as long as they need, whatever the machine's speed."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..generate import StepHooks


def spin(ms: float) -> None:
    """Busy-wait, as a slower kernel would: a sleep lets the core idle, and the step after it
    then runs measurably slower (a cold core), which leaked a prefill injection into the decode
    metric."""
    deadline = time.perf_counter() + ms / 1e3
    while time.perf_counter() < deadline:
        pass


@dataclass(frozen=True)
class BusyWait(StepHooks):
    """A busy-wait in every step, before its last collective, so that every rank's step holds
    it once (after it, a rank held up there was counted again in the next step of the others):
    `*_ms` milliseconds, plus `*_fraction` of the time the step's forward took on this rank. A
    fraction is a slowdown whatever the machine's load: a fixed delay sized from an earlier run is
    a smaller slowdown once the load rises (a gate test's "+50%" read +8.5% in CI)."""

    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    prefill_fraction: float = 0.0
    decode_fraction: float = 0.0
    _began: list = field(default_factory=list, init=False, compare=False, repr=False)  # [step start] on this rank

    def __post_init__(self) -> None:
        amounts = (self.prefill_ms, self.decode_ms, self.prefill_fraction, self.decode_fraction)
        if not all(math.isfinite(v) and v >= 0 for v in amounts):
            raise ValueError(f"injected delays must be finite and >= 0, got {self.prefill_ms} ms, {self.decode_ms} ms, "
                             f"fractions {self.prefill_fraction}, {self.decode_fraction}")

    def __bool__(self) -> bool:
        return bool(self.prefill_ms or self.decode_ms or self.prefill_fraction or self.decode_fraction)

    def step_begin(self, step: int) -> None:
        self._began[:] = [time.perf_counter()]

    def before_pick(self, step: int) -> None:
        ms, fraction = (self.prefill_ms, self.prefill_fraction) if step == 0 else (self.decode_ms, self.decode_fraction)
        if fraction:
            if not self._began:
                raise RuntimeError(f"BusyWait: step {step} reached before_pick without step_begin")
            if torch.accelerator.is_available():  # (a device's forward ends when its queue does)
                torch.accelerator.synchronize()
            ms += fraction * (time.perf_counter() - self._began[0]) * 1e3
        if ms:
            spin(ms)


def hang_here() -> None:
    """Never return: a hung rank, as a test makes one (its stack names this function)."""
    while True:
        pass


@dataclass(frozen=True)
class HangOn(StepHooks):
    """Rank `rank` (torch.distributed's) hangs at its first decode step, busy, never reaching the
    step's collectives: the others time out waiting on it."""

    rank: int = 1

    def before_pick(self, step: int) -> None:
        import torch.distributed as dist

        if step >= 1 and dist.is_initialized() and dist.get_rank() == self.rank:
            hang_here()
