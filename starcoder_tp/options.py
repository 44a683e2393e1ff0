"""Command-line options, declared once: the CLI's subcommands and the pytest plugin register the
same declarations (argparse's `add_argument` and pytest's `addoption` take the same keywords),
so that an option has one name, one parser and one default everywhere. A parser raises
argparse.ArgumentTypeError naming the bad value; argparse and pytest then stop with it before
any rank is spawned."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .device import DEVICE_KINDS
from .kernels import KERNEL_MODES
from .shard import DTYPES


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def option(*flags: str, **kwargs: Any) -> Option:
    return Option(flags, kwargs)


def add_options(add: Callable[..., Any], options: Iterable[Option]) -> None:
    """`add`: an argparse parser's (or group's) add_argument, or a pytest group's addoption."""
    for o in options:
        add(*o.flags, **o.kwargs)


def bounded(kind: type, what: str, holds: Callable[[Any], bool], bound: str) -> Callable[[str], Any]:
    """A parser of one number of `kind` for which `holds`; errors say `bound`."""
    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and holds(value)):
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value

    return parse


positive_int = bounded(int, "a whole number", lambda v: v >= 1, ">= 1")
non_negative_int = bounded(int, "a whole number", lambda v: v >= 0, ">= 0")
positive_seconds = bounded(float, "a number of seconds", lambda v: v > 0, "a finite number of seconds > 0")
non_negative_seconds = bounded(float, "a number of seconds", lambda v: v >= 0, "a finite number of seconds >= 0")
non_negative_ms = bounded(float, "a number of milliseconds", lambda v: v >= 0, "a finite number of ms >= 0")


def int_list(text: str) -> tuple[int, ...]:
    """'1,4,8' -> (1, 4, 8): whole numbers >= 1, none twice."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not a whole number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} in {text!r} must be >= 1")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} lists a value twice")
    return tuple(values)


# The runtime's own options: the model, the ranks and how their steps run.
MODEL_DIR = option("--model-dir", default=None,
                   help="a Hugging Face StarCoder (GPTBigCode) checkpoint directory, cut into the shard cache. "
                        "Default: the suite's embedded model")
WORLD_SIZE = option("--world-size", type=positive_int, default=None,
                    help="number of tensor-parallel ranks. Default: 2 (torchrun's WORLD_SIZE under torchrun)")
DTYPE = option("--dtype", choices=list(DTYPES), default="float32", help="weights and compute. Default: %(default)r")
DEVICE = option("--device", choices=list(DEVICE_KINDS), default="cpu", help="Default: %(default)r")
DEVICE_ID = option("--device-id", type=non_negative_int, default=0,
                   help="rank r uses device device_id + r. Default: %(default)r")
THREADS_PER_RANK = option("--threads-per-rank", type=positive_int, default=None,
                          help="CPU threads per rank. Default: the cores shared evenly among the ranks")
KERNELS = option("--kernels", choices=list(KERNEL_MODES), default="auto",
                 help="the linear layers' kernels on CPU: 'auto' times the candidates (F.linear, oneDNN packed for "
                      "the batch, MKL packed sgemm in fp32, bf16 via fp32, one-row gemv and rowdot) for each weight shape and batch on this "
                      "machine, once per machine (cached), and takes the fastest; any other names the one "
                      "to use for every weight "
                      "that can take it. Default: %(default)r")
NO_PREPACK = option("--no-prepack", action="store_true", default=False,
                    help="the same as --kernels plain (plain weights, F.linear). Default: %(default)r")
COMPILE = option("--compile", action="store_true", default=False,
                 help="run decode steps through torch.compile (inductor): compiled per batch size and cache length, "
                      "seconds to minutes each; needs a C++ compiler on CPU. Default: %(default)r")
RANK_TIMEOUT = option("--rank-timeout", type=positive_seconds, default=60.0,
                      help="seconds a rank may wait on another (a hung or dead rank) before the run or case fails, "
                           "naming it. Default: %(default)r")
MAX_SEQ_LEN = option("--max-seq-len", type=positive_int, default=None,
                     help="KV cache length (the Ascend guide's MAX_SEQ_LENGTH). Default: each request's input + output")

RUNTIME_OPTIONS = (WORLD_SIZE, DTYPE, DEVICE, DEVICE_ID, THREADS_PER_RANK, KERNELS, NO_PREPACK, COMPILE, RANK_TIMEOUT)


def kernel_mode(ns) -> str:
    """--kernels, with --no-prepack as 'plain'; a contradiction is refused naming both."""
    if ns.no_prepack and ns.kernels not in ("auto", "plain"):
        raise ValueError(f"--no-prepack (plain kernels) contradicts --kernels {ns.kernels}")
    if ns.compile and ns.kernels not in ("auto", "plain"):
        raise ValueError(f"--kernels {ns.kernels} cannot be combined with --compile (inductor chooses its own GEMMs)")
    return "plain" if ns.no_prepack else ns.kernels
