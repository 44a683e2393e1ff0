"""A runtime form (the tanh GELU's, the multi-query prefill's) switched between interleaved
first-token measurements of one model, in one process: the form's whole effect on a prefill with
the weights' layout held fixed. Used by tanh_gelu.py and prefill_attention.py."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from starcoder_tp.device import Device
from starcoder_tp.files import EMBEDDED_MODEL_DIR
from starcoder_tp.testing.build_models import build_bench
from starcoder_tp.timing import timed_generate


def model_dir_of(name: str) -> str:
    """--model: bench, embedded or a checkpoint directory."""
    return {"bench": lambda: str(build_bench()), "embedded": lambda: str(EMBEDDED_MODEL_DIR)}.get(name, lambda: name)()


def first_token_pairs(model, batch: int, seq_in: int, rounds: int, forms: tuple[str, str],
                      set_form: Callable[[str], None]) -> dict[str, list[float]]:
    """Each form's first-token ms over `rounds` pairs in alternating order, after a warm-up pair
    that is dropped; random prompts of `seq_in` tokens, the cache sized for 32 new tokens (so
    that the plan weighs the layout as for the perf suite's out=32 case, the same for both)."""
    gen = torch.Generator().manual_seed(seq_in)
    prompts = torch.randint(1, model.config.vocab_size, (batch, seq_in), generator=gen).tolist()
    firsts: dict[str, list[float]] = {form: [] for form in forms}
    for round_ in range(rounds + 1):
        for form in (forms if round_ % 2 else forms[::-1]):
            set_form(form)
            ms = timed_generate(model, Device("cpu"), prompts, 1, max_seq_len=seq_in + 32).first_token_ms
            if round_:
                firsts[form].append(ms)
    return firsts


def pair_cells(firsts: dict[str, list[float]], base: str, other: str) -> str:
    """Table cells: each form's median, and the median (range) of the pairs' ratios other/base."""
    ratios = [o / b for o, b in zip(firsts[other], firsts[base])]
    return (f"{statistics.median(firsts[base]):.1f} | {statistics.median(firsts[other]):.1f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


def parse_args(doc: str, sizes_flag: str, sizes_default: str, sizes_help: str):
    """The benchmark's options: --model (resolved to `model_dir`), --cases (parsed), --rounds, and
    its op table's sizes (`sizes_flag`, parsed to the list `sizes`)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench",
                        help="bench, embedded or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--cases", default="1:128,1:512,16:128", help="batch:seq_in,... Default: %(default)r")
    parser.add_argument("--rounds", type=int, default=9, help="pairs per model case. Default: %(default)r")
    parser.add_argument(sizes_flag, dest="sizes", default=sizes_default, help=f"{sizes_help}. Default: %(default)r")
    args = parser.parse_args()
    args.model_dir, args.cases = model_dir_of(args.model), cases_of(args.cases)
    args.sizes = [int(size) for size in args.sizes.split(",")]
    return args


def load_fp32(model_dir: str):
    """The model at world size 1 in fp32 on one thread, in this process."""
    from starcoder_tp.comm import TPGroup
    from starcoder_tp.model import load_model
    from starcoder_tp.malloc import as_a_cpu_rank
    from starcoder_tp.shard import ensure_shards

    as_a_cpu_rank()  # allocator and 2 MiB pages as a rank's, before the first large block
    torch.set_num_threads(1)
    return load_model(ensure_shards(model_dir, 1, "float32"), TPGroup(0, 1), torch.device("cpu"))


def cases_of(text: str) -> list[tuple[int, int]]:
    return [(int(case.split(":")[0]), int(case.split(":")[1])) for case in text.split(",")]


def form_rows(model, cases: list[tuple[int, int]], rounds: int, forms: tuple[str, str],
              set_form: Callable[[str], None], layout: bool = False) -> list[str]:
    """Table rows: batch, prompt, pair_cells (forms[1] against forms[0]), and with `layout` the
    weights' layout (the plan line's shapes)."""
    lines = []
    for batch, seq_in in cases:
        firsts = first_token_pairs(model, batch, seq_in, rounds, forms, set_form)
        shapes = model.kernels_summary().partition("): ")[2].split("; gelu:")[0]
        lines.append(f"| {batch} | {seq_in} | {pair_cells(firsts, *forms)} |" + (f" {shapes} |" if layout else ""))
    return lines


def write_section(title: str, script: str, started: float, calibrated: str, op_about: str, op_header: list[str],
                  ops: list[str], model_dir: str, rounds: int, forms: tuple[str, str], models: list[str],
                  layout: bool = False) -> None:
    """Write (and print) the benchmark's RESULTS.md section: the op table, then the model's."""
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import cpu_name, write_results

    base, other = forms
    model_header = ["batch", "prompt", base, other, f"{other}/{base}"] + (["layout"] if layout else [])
    text = "\n".join([
        f"## {title}", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/{script}` in "
        f"{time.perf_counter() - started:.0f} s. Machine: {cpu_name()}, torch {torch.__version__}. "
        f"The form as this process calibrated it: {calibrated}.", "", op_about, "",
        "| " + " | ".join(op_header) + " |", "|" + "---|" * len(op_header), *ops, "",
        f"First token of `{model_dir}` at world size 1, one thread, fp32, the weights laid out by the plan weighed "
        f"for the prompt and 31 decode steps (the same for both forms); ms, median of {rounds} interleaved pairs; "
        f"{other}/{base}: the median of the pairs' ratios (their range).", "",
        "| " + " | ".join(model_header) + " |", "|" + "---|" * len(model_header), *models])
    write_results(title, text)
    print(text)


def model_table(model_dir: str, cases: list[tuple[int, int]], rounds: int, forms: tuple[str, str], holder: object,
                attr: str, off: object, on: Callable[[object], object], calibrate: Callable[[object], object],
                layout: bool = False) -> list[str]:
    """form_rows for the model at `model_dir`: `calibrate(model)` first (as a run would), then
    `holder.attr` set to `off` for forms[0] and to `on(what calibrate set)` for forms[1], and
    restored afterwards."""
    model = load_fp32(model_dir)
    calibrate(model)
    measured = getattr(holder, attr)
    try:
        return form_rows(model, cases, rounds, forms,
                         lambda form: setattr(holder, attr, off if form == forms[0] else on(measured)), layout)
    finally:
        setattr(holder, attr, measured)
