"""The tanh GELU's two forms in fp32 (activations.py): torch's fused op against the split one
(the same formula as elementwise passes over cache-sized blocks, torch.tanh through MKL's vector
library), side by side in one sitting.

- op: one [rows, 4096] activation (the bench-size model's MLP width), 1 and 2 threads, median ms
  over alternating rounds (kernel_timing.time_ms), and the largest difference between the forms.
- model: the first token of the bench-size model at world size 1 on one thread, its weights laid
  out by the kernel plan for the request (the same layout for both), the form switched between
  interleaved rounds; the median ratio split/fused of the pairs. This is the form's whole effect
  on a prefill, apart from any layout the plan weighs differently with it.

Run: python benchmarks/tanh_gelu.py [--model bench|embedded|DIR] [--cases 1:128,1:512,16:128] [--rounds 9]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import cpu_name, write_results  # noqa: E402

from starcoder_tp.activations import TANH_GELU, calibrate, tanh_gelu_split  # noqa: E402
from starcoder_tp.comm import TPGroup  # noqa: E402
from starcoder_tp.device import Device  # noqa: E402
from starcoder_tp.files import EMBEDDED_MODEL_DIR  # noqa: E402
from starcoder_tp.kernel_timing import time_ms  # noqa: E402
from starcoder_tp.model import load_model  # noqa: E402
from starcoder_tp.shard import ensure_shards  # noqa: E402
from starcoder_tp.testing.build_models import build_bench  # noqa: E402
from starcoder_tp.timing import timed_generate  # noqa: E402


def op_rows(rows_list: list[int], threads: int) -> list[str]:
    torch.set_num_threads(threads)
    lines = []
    for rows in rows_list:
        x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(rows)) * 3
        ms = time_ms({"fused": lambda: F.gelu(x, approximate="tanh"), "split": lambda: tanh_gelu_split(x)})
        diff = (tanh_gelu_split(x) - F.gelu(x, approximate="tanh")).abs().max().item()
        lines.append(f"| {threads} | {rows} | {ms['fused']:.3f} | {ms['split']:.3f} | "
                     f"{ms['split'] / ms['fused']:.2f} | {diff:.1e} |")
    torch.set_num_threads(1)
    return lines


def model_rows(model_dir: str, cases: list[tuple[int, int]], rounds: int) -> list[str]:
    torch.set_num_threads(1)
    model = load_model(ensure_shards(model_dir, 1, "float32"), TPGroup(0, 1), torch.device("cpu"))
    calibrate(lambda t: t)
    measured = TANH_GELU.split_from
    lines = []
    for batch, seq_in in cases:
        gen = torch.Generator().manual_seed(seq_in)
        prompts = torch.randint(1, model.config.vocab_size, (batch, seq_in), generator=gen).tolist()
        firsts: dict[str, list[float]] = {"fused": [], "split": []}
        for round_ in range(rounds + 1):  # the first round warms up, and is dropped
            for form in (("fused", "split") if round_ % 2 else ("split", "fused")):
                TANH_GELU.split_from = None if form == "fused" else (measured or 1)
                # The cache sized for 32 tokens: the layout weighed as for the perf suite's out=32 case.
                ms = timed_generate(model, Device("cpu"), prompts, 1, max_seq_len=seq_in + 32).first_token_ms
                if round_:
                    firsts[form].append(ms)
        ratios = [s / f for s, f in zip(firsts["split"], firsts["fused"])]
        lines.append(f"| {batch} | {seq_in} | {statistics.median(firsts['fused']):.1f} | "
                     f"{statistics.median(firsts['split']):.1f} | {statistics.median(ratios):.3f} "
                     f"({min(ratios):.3f}-{max(ratios):.3f}) | {model.kernels_summary().partition('): ')[2].partition('; gelu:')[0]} |")
    TANH_GELU.split_from = measured
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench, embedded or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--rows", default="1,8,16,128,512,2048", help="op table rows. Default: %(default)r")
    parser.add_argument("--cases", default="1:128,1:512,16:128", help="batch:seq_in,... Default: %(default)r")
    parser.add_argument("--rounds", type=int, default=9, help="pairs per model case. Default: %(default)r")
    args = parser.parse_args()
    started = time.perf_counter()
    rows_list = [int(r) for r in args.rows.split(",")]
    ops = op_rows(rows_list, 1) + op_rows(rows_list, 2)
    model_dir = {"bench": lambda: str(build_bench()), "embedded": lambda: str(EMBEDDED_MODEL_DIR)}.get(
        args.model, lambda: args.model)()
    cases = [tuple(int(v) for v in case.split(":")) for case in args.cases.split(",")]
    models = model_rows(model_dir, cases, args.rounds)
    text = "\n".join([
        "## The tanh GELU", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/tanh_gelu.py` in "
        f"{time.perf_counter() - started:.0f} s. Machine: {cpu_name()}, torch {torch.__version__}. "
        f"The split form as this process calibrated it: {TANH_GELU.calibrated}.", "",
        "One [rows, 4096] fp32 activation; ms per call, median of alternating rounds; diff = the largest "
        "difference between the forms.", "",
        "| threads | rows | fused | split | split/fused | diff |", "|---|---|---|---|---|---|", *ops, "",
        f"First token of `{model_dir}` at world size 1, one thread, fp32, the weights laid out by the plan "
        f"weighed for the prompt and 31 decode steps (the same for both forms); ms, median of {args.rounds} interleaved pairs; "
        "split/fused: the median of the pairs' ratios (their range).", "",
        "| batch | prompt | fused | split | split/fused | layout |", "|---|---|---|---|---|---|", *models])
    write_results("The tanh GELU", text)
    print(text)


if __name__ == "__main__":
    main()
