"""The suites' options, declared once for the pytest plugin and `python -m starcoder_tp bench`
(starcoder_tp/options.py has the runtime's), and the PerfOptions that either builds from them."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..files import EMBEDDED_MODEL_DIR
from ..options import (COMPILE, DEVICE, DEVICE_ID, DTYPE, KERNELS, MAX_SEQ_LEN, MODEL_DIR, NO_PREPACK, RANK_TIMEOUT,
                       THREADS_PER_RANK, WORLD_SIZE, Option, bounded, int_list, non_negative_int, non_negative_ms, option,
                       positive_int, positive_seconds, kernel_mode)
from .humaneval import TASKS as HUMANEVAL_TASKS
from .stored_reference import LIVE_REFERENCES
from .perf import DEFAULT_BATCH_SIZES, DEFAULT_SEQ_LENS, PerfOptions


def case_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """'256:64,512:512' -> ((256, 64), (512, 512)): the Ascend guide's set_case_pair mode."""
    pairs = []
    for item in str(text).split(","):
        parts = item.strip().split(":")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not of the form IN:OUT (e.g. 256:64)")
        seq_in, seq_out = (int_list(p)[0] for p in parts)
        pairs.append((seq_in, seq_out))
    return tuple(pairs)


def results_dir(text: str) -> str:
    """A folder for the results, made when absent; refused, before anything runs, when it is
    empty (an unset variable: the files would land in the current folder) or not a folder."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: name a folder for the CSV, JSON and plots")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


METRICS = ("first_token", "decode")


def thresholds(text: str) -> dict[str, float]:
    """'first_token=10%,decode=15%' -> {'first_token': 0.10, 'decode': 0.15}."""
    out = {}
    for item in str(text).split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in METRICS:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not METRIC=N% with METRIC one of {', '.join(METRICS)}")
        try:
            number = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number or percentage") from None
        if not (math.isfinite(number) and 0 < number < 10):
            raise argparse.ArgumentTypeError(f"{item.strip()!r} must be > 0% and < 1000%")
        out[name] = number
    return out


def slowdown(text: str) -> float:
    """'50%' -> 0.5: an injected slowdown, a percentage of the step's own time (>= 0)."""
    value = str(text).strip()
    try:
        number = float(value.removesuffix("%")) / 100 if value.endswith("%") else math.nan
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage >= 0% (e.g. 50%)")
    return number


open_fraction = bounded(float, "a number", lambda v: 0 < v < 1, "within (0, 1)")  # a significance level
closed_fraction = bounded(float, "a number", lambda v: 0 <= v <= 1, "within [0, 1]")
non_negative_float = bounded(float, "a number", lambda v: math.isfinite(v) and v >= 0, ">= 0")
def reference_source(text: str) -> str:
    """--accuracy-reference: a live reference's name, or an existing file (checked in full later)."""
    if text in LIVE_REFERENCES or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither {' nor '.join(LIVE_REFERENCES)} nor an existing file "
                                     "(one written by --save-reference)")


top_p_value = bounded(float, "a number", lambda v: 0 < v <= 1, "within (0, 1]")


def _csv(values) -> str:
    return ",".join(map(str, values))


GRID = (
    option("--batch-sizes", type=int_list, default=None,
           help=f"comma-separated. Default: {_csv(DEFAULT_BATCH_SIZES)} (bench --multicase 0: its --batch)"),
    option("--seq-in", type=int_list, default=None,
           help=f"input lengths, comma-separated. Default: {_csv(DEFAULT_SEQ_LENS)} (bench --multicase 0: 128)"),
    option("--seq-out", type=int_list, default=None,
           help=f"output lengths, comma-separated. Default: {_csv(DEFAULT_SEQ_LENS)} (bench --multicase 0: 128)"),
    option("--case-pairs", type=case_pairs, default=None,
           help="IN:OUT pairs instead of the in x out product, e.g. 256:64,256:256,512:512,1024:1024 (the Ascend "
                "guide's set_case_pair mode). Default: %(default)r"),
    MAX_SEQ_LEN,
    option("--perf-rounds", type=positive_int, default=1, help="measured generations per case. Default: %(default)r"),
    option("--perf-warmup", type=non_negative_int, default=1,
           help="warm-up generations per batch size. Default: %(default)r"),
    option("--results-dir", type=results_dir, default="results", help="Default: %(default)r"),
    option("--model-name", default="starcoder", help="suffix of the result files. Default: %(default)r"),
)

# Gating on latency regressions: against another commit in the same session, or a stored baseline.
COMPARE = (
    option("--perf-compare-ref", default=None, metavar="GITREF",
           help="A/B in one session: measure every case on this code (A) and on GITREF's code (B, a second worker "
                "group on the same shards), rounds interleaved, and fail cases whose paired A/B ratio regressed "
                "(e.g. origin/main; needs --perf-rounds >= 6). Default: %(default)r"),
    option("--perf-max-regression", type=thresholds, default="first_token=10%,decode=10%",
           help="per-metric thresholds on the median. Default: %(default)r"),
    option("--perf-alpha", type=open_fraction, default=0.05,
           help="significance level of the gate's test (Wilcoxon on paired rounds with --perf-compare-ref, "
                "Mann-Whitney against a baseline). Default: %(default)r"),
)
BASELINE = (
    option("--perf-baseline", default=None,
           help="a results CSV of an earlier run on this machine (--perf-save-baseline): fail cases that regressed. "
                "Default: %(default)r"),
    option("--perf-save-baseline", default=None, help="write this run's rows to this CSV. Default: %(default)r"),
    option("--perf-normalize", action="store_true", default=False,
           help="compare against a baseline from another machine, in machine-speed-calibrated units (refused "
                "otherwise). Default: %(default)r"),
    option("--perf-resume", action="store_true", default=False,
           help="skip cases already in the results CSV for this model, world size, dtype, device and runtime mode. "
                "Default: %(default)r"),
)
INJECT = (
    option("--inject-decode-delay-ms", type=non_negative_ms, default=0.0,
           help="test-only: a busy-wait of this long in every decode step (side A only in an A/B comparison). "
                "Default: %(default)r"),
    option("--inject-prefill-delay-ms", type=non_negative_ms, default=0.0,
           help="test-only: a busy-wait of this long in the prefill (side A only). Default: %(default)r"),
    option("--inject-decode-slowdown", type=slowdown, default=0.0,
           help="test-only: a busy-wait in every decode step of this percentage of the step's own forward time "
                "(e.g. 50%%; side A only): a slowdown whatever the machine's load. Default: none"),
    option("--inject-prefill-slowdown", type=slowdown, default=0.0,
           help="test-only: the same in the prefill (side A only). Default: none"),
)
ACCURACY = (
    option("--humaneval-limit", type=positive_int, default=None, help="the first N problems only. Default: all 164"),
    option("--humaneval-tasks", default=None,
           help="comma-separated task ids, e.g. HumanEval/0,HumanEval/7. Default: all"),
    option("--humaneval-max-new-tokens", type=positive_int, default=320, help="Default: %(default)r"),
    option("--humaneval-batch-size", type=positive_int, default=8, help="prompts per generation batch. Default: %(default)r"),
    option("--humaneval-timeout", type=positive_seconds, default=3.0, help="seconds per program. Default: %(default)r"),
    option("--humaneval-workers", type=positive_int, default=2, help="sandboxed execution processes. Default: %(default)r"),
    option("--humaneval-memory-mb", type=positive_int, default=1024,
           help="address-space limit of the executed code. Default: %(default)r"),
    option("--humaneval-task", choices=list(HUMANEVAL_TASKS), default="humaneval-unstripped",
           help="bigcode-evaluation-harness's task: 'humaneval' strips the prompt (the harness's default), "
                "'humaneval-unstripped' keeps it as given. Default: %(default)r"),
    option("--humaneval-samples", type=positive_int, default=1,
           help="completions per problem; pass@k is reported for every k up to it (needs --temperature > 0 "
                "when above 1; the leaderboard's setting is 50 at temperature 0.2, top_p 0.95). Default: %(default)r"),
    option("--temperature", type=non_negative_float, default=0.0,
           help="sampling temperature; 0 is greedy decoding. Default: %(default)r"),
    option("--top-p", type=top_p_value, default=1.0, help="nucleus sampling's top_p, in (0, 1]. Default: %(default)r"),
    option("--seed", type=non_negative_int, default=0,
           help="the sampled run's seed; each sample's stream derives from it, the task and the sample's index, so "
                "that batches and world sizes draw the same. Default: %(default)r"),
    option("--accuracy-reference", type=reference_source, default="transformers",
           help="the single-device reference: 'transformers' (its generate), 'tp1' (this runtime at world size 1), "
                "or a file written by --save-reference, made where the whole model fits; that file must be of the "
                "same model, dtype, task, samples, sampling, seed and max tokens. Default: %(default)r"),
    option("--save-reference", default=None, metavar="PATH",
           help="store the reference's completions, token ids, top-5 logprobs and verdicts in PATH (gzip when it "
                "ends in .gz), for --accuracy-reference PATH elsewhere. Default: not stored"),
    option("--pass-at-1-tolerance", type=closed_fraction, default=0.02,
           help="allowed |pass@1(tp) - pass@1(reference)| and share of tasks whose verdicts differ, in bf16/fp16 "
                "(fp32 must be equal). Default: %(default)r"),
)

RUN = (MODEL_DIR, WORLD_SIZE, DTYPE, DEVICE, DEVICE_ID, THREADS_PER_RANK, KERNELS, NO_PREPACK, COMPILE, RANK_TIMEOUT)
PYTEST_OPTIONS: tuple[Option, ...] = RUN + GRID + COMPARE + BASELINE + INJECT + ACCURACY
BENCH_OPTIONS: tuple[Option, ...] = RUN + GRID + COMPARE + INJECT


def perf_options(ns, world_size: int | None = None) -> PerfOptions:
    """The perf grid's options from parsed ones (pytest's config.option or bench's namespace):
    the defaults resolved, the model and the cases checked. `world_size`: torchrun's."""
    return PerfOptions(
        model_dir=ns.model_dir or str(EMBEDDED_MODEL_DIR), device=ns.device, device_id=ns.device_id,
        world_size=world_size or ns.world_size or 2, dtype=ns.dtype,
        batch_sizes=ns.batch_sizes or DEFAULT_BATCH_SIZES, seq_in=ns.seq_in or DEFAULT_SEQ_LENS,
        seq_out=ns.seq_out or DEFAULT_SEQ_LENS, case_pairs=ns.case_pairs, max_seq_len=ns.max_seq_len,
        rounds=ns.perf_rounds, warmup=ns.perf_warmup, results_dir=ns.results_dir, model_name=ns.model_name,
        threads_per_rank=ns.threads_per_rank, kernels=kernel_mode(ns), compile=ns.compile,
        timeout_s=ns.rank_timeout, inject_prefill_ms=ns.inject_prefill_delay_ms,
        inject_decode_ms=ns.inject_decode_delay_ms, inject_prefill_fraction=ns.inject_prefill_slowdown,
        inject_decode_fraction=ns.inject_decode_slowdown)
