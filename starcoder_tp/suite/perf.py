"""The performance grid: cases, their inputs, one measured case, and the runner that measures
them, shared by the pytest suite (tests_perf/) and `python -m starcoder_tp bench`.

A case is measured exactly as its name says: B sequences of exactly `seq_in` tokens (random
ids from the vocabulary, no padding, no truncation) generating exactly `seq_out` tokens with
EOS ignored; times are read after a device synchronisation and are the slowest rank's.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import log as default_log
from .. import setup_phases
from ..config import ModelConfig
from ..device import Device
from ..group_spec import GroupSpec, oversubscription
from ..malloc import malloc_choice
from ..parallel import RankFailure, WorkerGroup
from ..shard import DTYPES, ensure_shards
from ..torchrun import launched_by_torchrun
from .faults import BusyWait

DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32)
DEFAULT_SEQ_LENS = (32, 64, 128, 256, 512, 1024)  # the Ascend guide's 2^5 .. 2^10
LOGGED_SETUP_S = 0.5  # a warm-up whose set-up took this long says where it went
FIRST_REGULAR_TOKEN = 19  # past StarCoder's special tokens, so that inputs are ordinary text ids


@dataclass(frozen=True, order=True)
class Case:
    batch: int
    seq_in: int
    seq_out: int

    @property
    def id(self) -> str:
        # "-k bs1-" selects batch 1 alone ("-k bs1" would also match bs16).
        return f"bs{self.batch}-in{self.seq_in}-out{self.seq_out}"


def build_cases(batch_sizes, seq_in, seq_out, case_pairs=None) -> list[Case]:
    """The cross product of batch × in × out, or batch × the given (in, out) pairs; sorted by
    batch so that each batch size is warmed up once and then measured in one run."""
    pairs = case_pairs if case_pairs else [(i, o) for i in seq_in for o in seq_out]
    return sorted({Case(b, i, o) for b in batch_sizes for i, o in pairs})


def check_cases(cases: list[Case], config: ModelConfig, max_seq_len: int | None) -> None:
    """Refuse, before any rank starts, a case the model or the cache cannot hold."""
    for case in cases:
        needed = case.seq_in + case.seq_out
        if max_seq_len is not None and needed > max_seq_len:
            raise ValueError(f"case {case.id}: input + output = {needed} tokens exceeds --max-seq-len {max_seq_len}")
        if needed > config.n_positions:
            raise ValueError(f"case {case.id}: input + output = {needed} tokens exceeds the model's "
                             f"n_positions={config.n_positions}")


def make_prompts(case: Case, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Exactly `batch` rows of exactly `seq_in` token ids, the same for every run of the case."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + case.batch * 10_007 + case.seq_in)
    low = FIRST_REGULAR_TOKEN if vocab_size > 2 * FIRST_REGULAR_TOKEN else 0
    return torch.randint(low, vocab_size, (case.batch, case.seq_in), generator=gen).tolist()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class CaseResult:
    """All rounds of one case. Per round: first-token ms and every decode step's ms."""

    case: Case
    first_token_ms_rounds: list[float] = field(default_factory=list)
    decode_ms_rounds: list[list[float]] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)  # per rank, max over rounds
    wall_ms_rounds: list[float] = field(default_factory=list)  # the driver's clock around each whole request
    timed_ms_rounds: list[float] = field(default_factory=list)  # GenerationResult.timed_ms of each round
    kernels: str = ""  # the ranks' kernel plan (TPCausalLM.kernels_summary)

    def add_round(self, first_token_ms: float, decode_ms: list[float], output_shape: tuple, memory: list[int]) -> None:
        expected = (self.case.batch, self.case.seq_out)
        if tuple(output_shape) != expected:
            raise RuntimeError(f"case {self.case.id}: output shape {tuple(output_shape)}, expected {expected}")
        times = [first_token_ms, *decode_ms]
        if len(decode_ms) != self.case.seq_out - 1:
            raise RuntimeError(f"case {self.case.id}: {len(decode_ms)} decode steps timed, expected {self.case.seq_out - 1}")
        bad = [t for t in times if not (math.isfinite(t) and t > 0)]
        if bad:
            raise RuntimeError(f"case {self.case.id}: garbage time {bad[0]!r} ms (non-finite or non-positive)")
        self.first_token_ms_rounds.append(first_token_ms)
        self.decode_ms_rounds.append(list(decode_ms))
        self.peak_memory_bytes = [max(a, b) for a, b in zip(self.peak_memory_bytes, memory)] or list(memory)

    @property
    def rounds(self) -> int:
        return len(self.first_token_ms_rounds)

    def extend(self, more: "CaseResult") -> None:
        """Append the rounds of a later measurement of the same case (a confirmation)."""
        assert more.case == self.case, (more.case, self.case)
        self.first_token_ms_rounds += more.first_token_ms_rounds
        self.decode_ms_rounds += more.decode_ms_rounds
        self.wall_ms_rounds += more.wall_ms_rounds
        self.timed_ms_rounds += more.timed_ms_rounds
        self.peak_memory_bytes = ([max(a, b) for a, b in zip(self.peak_memory_bytes, more.peak_memory_bytes)]
                                  or list(more.peak_memory_bytes))

    @property
    def first_token_ms(self) -> float:
        return statistics.median(self.first_token_ms_rounds)

    @property
    def decode_steps(self) -> list[float]:
        return [t for steps in self.decode_ms_rounds for t in steps]

    @property
    def decode_ms_mean(self) -> float:
        steps = self.decode_steps
        return statistics.fmean(steps) if steps else 0.0

    def decode_ms_percentile(self, q: float) -> float:
        return percentile(self.decode_steps, q) if self.decode_steps else 0.0

    @property
    def total_s(self) -> float:
        totals = [f + sum(d) for f, d in zip(self.first_token_ms_rounds, self.decode_ms_rounds)]
        return statistics.median(totals) / 1e3

    @property
    def tokens_per_s(self) -> float:
        return self.case.batch * self.case.seq_out / self.total_s


@dataclass(frozen=True)
class PerfOptions:
    model_dir: str
    device: str = "cpu"
    device_id: int = 0
    world_size: int = 2
    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seq_in: tuple[int, ...] = DEFAULT_SEQ_LENS
    seq_out: tuple[int, ...] = DEFAULT_SEQ_LENS
    case_pairs: tuple[tuple[int, int], ...] | None = None
    max_seq_len: int | None = None
    rounds: int = 1
    warmup: int = 1
    results_dir: str = "results"
    model_name: str = "starcoder"
    threads_per_rank: int | None = None
    kernels: str = "auto"  # the linear kernels on CPU: kernels.KERNEL_MODES
    compile: bool = False  # decode steps through torch.compile (compiled per case, in its warm-up)
    timeout_s: float = 60.0  # a rank waiting this long on another fails the case, naming it
    inject_prefill_ms: float = 0.0  # test-only (faults.BusyWait): proves that the gate catches a slowdown
    inject_decode_ms: float = 0.0
    inject_prefill_fraction: float = 0.0  # test-only: a busy-wait of this fraction of the step's forward
    inject_decode_fraction: float = 0.0

    def __post_init__(self) -> None:
        self.faults()  # refuses a negative or non-finite delay
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.rounds < 1:
            raise ValueError(f"--perf-rounds must be >= 1, got {self.rounds}")
        if self.warmup < 0:
            raise ValueError(f"--perf-warmup must be >= 0, got {self.warmup}")
        Device(self.device, self.device_id)  # validates both
        ModelConfig.from_dir(self.model_dir).check_world_size(self.world_size)

    def faults(self) -> BusyWait:
        """The injected delays (test-only) as a hook; falsy where there are none."""
        return BusyWait(prefill_ms=self.inject_prefill_ms, decode_ms=self.inject_decode_ms,
                        prefill_fraction=self.inject_prefill_fraction, decode_fraction=self.inject_decode_fraction)

    @property
    def runtime_mode(self) -> str:
        """How the steps ran, recorded with every result: one mode's baseline must not gate another."""
        if self.compile:
            return "compiled"
        return {"auto": "eager", "plain": "eager-no-prepack"}.get(self.kernels, f"eager-kernels-{self.kernels}")

    def check_cases(self) -> None:
        """Refuse the grid's impossible cases, and a device or allocator the ranks could not
        use, before any rank starts (kept apart: a grid that does not fit a model must not block
        an accuracy run on it)."""
        check_cases(self.cases(), self.config, self.max_seq_len)
        malloc_choice()
        if not launched_by_torchrun():  # there each node's ranks check their own devices
            Device(self.device, self.device_id).check_available(self.world_size)

    def cases(self) -> list[Case]:
        return build_cases(self.batch_sizes, self.seq_in, self.seq_out, self.case_pairs)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dir(self.model_dir)


def _pages(ready_info: list[dict]) -> str:
    """The ranks' page size for torch's large blocks, for the set-up line ('' on accelerators)."""
    kinds = sorted({str(info["pages"]) for info in ready_info if info.get("pages")})
    return f"; {', '.join(kinds)}" if kinds else ""


class PerfRunner:
    """Shards once (cached), spawns the ranks once, warms up once per batch size, measures cases."""

    def __init__(self, options: PerfOptions, log: Callable[[str], None] = default_log, group=None,
                 start_group: Callable[[GroupSpec], object] | None = None, name: str = ""):
        """`group`: ranks already running (parallel.TorchrunGroup) instead of a local worker group.
        `start_group`: how to start (and restart) the ranks from their spec; a local WorkerGroup
        by default, serve.RemoteGroup for side B of an A/B comparison. `name` tags the logs."""
        self.options, self.log, self.name = options, log, name
        self.config = options.config
        self.group = group
        self.attached = group is not None
        self.start_group = start_group or (lambda spec: WorkerGroup(spec).start())
        self.warmed: set[int] = set()
        self.kernels_logged = ""  # the last kernel plan logged: printed again when a case changes it
        self.warm_up_setup_s: dict[str, float] = {}  # the last warm-up's set-up phases (setup_phases.py)
        self.setup_times: dict[str, float] = {}

    def start(self, shard_dir: Path | None = None) -> "PerfRunner":
        """Shard (unless `shard_dir` is given: another runner's shards), spawn and load."""
        o = self.options
        o.check_cases()
        if self.attached:
            return self
        t0 = time.perf_counter()
        self.shard_dir = shard_dir or ensure_shards(o.model_dir, o.world_size, o.dtype, log=self.log)
        t1 = time.perf_counter()
        self.spec = GroupSpec(str(self.shard_dir), o.world_size, Device(o.device, o.device_id), o.threads_per_rank,
                              timeout_s=o.timeout_s, kernels=o.kernels, compile=o.compile)
        self.group = self.start_group(self.spec)
        t2 = time.perf_counter()
        self.setup_times = {"shard_s": t1 - t0, "spawn_and_load_s": t2 - t1,
                            "load_s": max(info["load_s"] for info in self.group.ready_info)}
        self.log(f"[perf] {self.name + ': ' if self.name else ''}set-up: shard {t1 - t0:.1f}s (cached when unchanged), "
                 f"spawn + load of {o.world_size} rank(s) {t2 - t1:.1f}s (slowest rank loaded in "
                 f"{self.setup_times['load_s']:.1f}s); allocator "
                 f"{', '.join(sorted({str(info.get('allocator', 'as glibc has it')) for info in self.group.ready_info}))}"
                 + _pages(self.group.ready_info))
        warning = oversubscription(self.spec)
        if warning:
            self.log(f"[perf] warning: {warning}")
        return self

    def warm_up(self, case: Case) -> None:
        """The Ascend guide's warm-up, a short generation once per batch size; then, for every
        case, one untimed prefill of its exact shape. Without the latter, a case's first round
        pays for kernel selection and allocations at the new shape (here 20-40% on the first
        token), and one such outlier in 5 baseline rounds is enough to blind the gate's test."""
        self.warm_up_setup_s = {}
        if self.options.warmup == 0:
            return
        setups = []
        if case.batch not in self.warmed:
            seq_in = min(min(self.options.seq_in), 32)
            for _ in range(self.options.warmup):
                warm, _ = self._generate(case, make_prompts(Case(case.batch, seq_in, 8), self.config.vocab_size, seed=99), 8)
                setups.append(warm.setup_s)
            self.warmed.add(case.batch)
        # Compiled decode steps are compiled for the case's shape here, outside the timed rounds;
        # the cache sized for the whole case, measured kernels are laid out for it (kernels.weigh).
        generation, _ = self._generate(case, make_prompts(case, self.config.vocab_size, seed=98),
                                       min(3, case.seq_out) if self.options.compile else 1,
                                       max_seq_len=self.options.max_seq_len or case.seq_in + case.seq_out)
        self.warm_up_setup_s = setup_phases.merged(*setups, generation.setup_s)
        if sum(self.warm_up_setup_s.values()) >= LOGGED_SETUP_S:
            self.log(f"[perf] {self.name + ': ' if self.name else ''}set-up for {case.id}: "
                     f"{setup_phases.describe(self.warm_up_setup_s)}")
        if generation.kernels != self.kernels_logged:
            self.kernels_logged = generation.kernels
            self.log(f"[perf] {self.name + ': ' if self.name else ''}kernels for {case.id}: {generation.kernels}")

    def run_round(self, case: Case, result: CaseResult) -> None:
        prompts = make_prompts(case, self.config.vocab_size)
        started = time.perf_counter()
        o = self.options
        faults = o.faults()
        generation, memory = self._generate(case, prompts, case.seq_out, ignore_eos=True, max_seq_len=o.max_seq_len,
                                            hooks=(faults,) if faults else ())
        wall_ms = (time.perf_counter() - started) * 1e3
        result.add_round(generation.first_token_ms, generation.decode_ms, tuple(generation.output_ids.shape), memory)
        result.wall_ms_rounds.append(wall_ms)
        result.kernels = generation.kernels
        result.timed_ms_rounds.append(generation.timed_ms)

    def _generate(self, case: Case, prompts: list[list[int]], new_tokens: int, **kwargs):
        if self.group is None:  # the last case lost a rank: start afresh, and warm up again
            assert not self.attached, "ranks that torchrun started cannot be restarted from here"
            self.log(f"[perf] {self.name + ': ' if self.name else ''}restarting the {self.options.world_size} rank(s) "
                     "after the failure")
            self.group = self.start_group(self.spec)
        try:
            return self.group.generate(prompts, new_tokens, **kwargs)
        except RankFailure:
            # This case fails; the group is already torn down, and the next case starts a new one.
            self.log(f"[perf] {self.name + ': ' if self.name else ''}case {case.id} failed: a rank died or hung")
            self.group = None
            self.warmed.clear()
            raise

    def measure(self, case: Case) -> CaseResult:
        self.warm_up(case)
        result = CaseResult(case)
        for _ in range(self.options.rounds):
            self.run_round(case, result)
        return result

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
