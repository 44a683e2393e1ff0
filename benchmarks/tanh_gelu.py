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

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from form_pairs import model_table, parse_args, write_section  # noqa: E402

from starcoder_tp.activations import TANH_GELU, calibrate, tanh_gelu_split  # noqa: E402
from starcoder_tp.kernel_timing import time_ms  # noqa: E402


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


def main() -> None:
    args = parse_args(__doc__, "--rows", "1,8,16,128,512,2048", "op table rows")
    started = time.perf_counter()
    ops = op_rows(args.sizes, 1) + op_rows(args.sizes, 2)
    model_dir, cases = args.model_dir, args.cases
    models = model_table(model_dir, cases, args.rounds, ("fused", "split"), TANH_GELU, "split_from", None,
                         lambda measured: measured or 1, lambda model: calibrate(lambda t: t), layout=True)
    write_section("The tanh GELU", "tanh_gelu.py", started, TANH_GELU.calibrated,
                  "One [rows, 4096] fp32 activation; ms per call, median of alternating rounds; diff = the largest "
                  "difference between the forms.", ["threads", "rows", "fused", "split", "split/fused", "diff"], ops,
                  model_dir, args.rounds, ("fused", "split"), models, layout=True)


if __name__ == "__main__":
    main()
