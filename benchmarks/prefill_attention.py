"""The multi-query causal prefill's two forms in fp32 (attention.py): SDPA's flash kernel against
causal_blocks (two GEMMs per block of query tokens over all heads), side by side in one sitting.

- op: one layer's attention, [1, T, H, 64] queries against the one K/V head, H = 16 (the
  bench-size model and StarCoder at world size 1) and 8 (world size 2), 1 and 2 threads, median ms
  over alternating rounds (kernel_timing.time_ms), and the largest difference between the forms;
  the blocks at BLOCK_ROWS (32) query tokens, not the calibrated size.
- model: the first token of the bench-size model at world size 1 on one thread, its weights laid
  out by the kernel plan weighed as for 32 new tokens (the same layout for both), the form switched
  between interleaved rounds; the median ratio blocks/sdpa of the pairs; the blocks at every
  length, with the block size calibrated (BLOCK_ROWS where SDPA won the calibration at every length).

Run: python benchmarks/prefill_attention.py [--model bench|embedded|DIR] [--cases 1:128,1:512,16:128] [--rounds 9]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from form_pairs import model_table, parse_args, write_section  # noqa: E402

from starcoder_tp.attention import (CALIBRATION_TOKENS, PREFILL_FORM, attend, calibrate_attention,  # noqa: E402
                                    causal_blocks)
from starcoder_tp.kernel_timing import time_ms  # noqa: E402


def op_rows(tokens: list[int], heads: int, threads: int) -> list[str]:
    torch.set_num_threads(threads)
    saved, PREFILL_FORM.blocks_at = PREFILL_FORM.blocks_at, frozenset()  # attend: SDPA
    lines = []
    for t in tokens:
        gen = torch.Generator().manual_seed(t)
        q = torch.randn(1, t, heads + 2, 64, generator=gen)[:, :, :heads]
        keys, values = torch.randn(1, 1, t, 64, generator=gen), torch.randn(1, 1, t, 64, generator=gen)
        ms = time_ms({"sdpa": lambda: attend(q, keys, values, None, 0.125),
                      "blocks": lambda: causal_blocks(q, keys, values, 0.125)})
        diff = (causal_blocks(q, keys, values, 0.125) - attend(q, keys, values, None, 0.125)).abs().max().item()
        lines.append(f"| {threads} | {heads} | {t} | {ms['sdpa']:.3f} | {ms['blocks']:.3f} | "
                     f"{ms['blocks'] / ms['sdpa']:.2f} | {diff:.1e} |")
    PREFILL_FORM.blocks_at = saved
    torch.set_num_threads(1)
    return lines


def calibrate_on(model) -> str:
    attn = model.transformer.h[0].attn
    return calibrate_attention(attn.local_heads, attn.head_dim, lambda t: t, kv_heads=attn.local_kv_heads)


def main() -> None:
    args = parse_args(__doc__, "--tokens", "32,64,128,256,512,1024", "op table lengths")
    started = time.perf_counter()
    ops = [line for threads in (1, 2) for heads in (16, 8) for line in op_rows(args.sizes, heads, threads)]
    model_dir, cases = args.model_dir, args.cases
    models = model_table(model_dir, cases, args.rounds, ("sdpa", "blocks"), PREFILL_FORM, "blocks_at", frozenset(),
                         lambda measured: frozenset(CALIBRATION_TOKENS), calibrate_on)
    write_section("The multi-query prefill's attention", "prefill_attention.py", started, PREFILL_FORM.calibrated,
                  "One layer's causal attention, fp32, head dim 64, one K/V head; ms per call, median of alternating "
                  "rounds; diff = the largest difference between the forms.",
                  ["threads", "heads", "tokens", "sdpa", "blocks", "blocks/sdpa", "diff"], ops,
                  model_dir, args.rounds, ("sdpa", "blocks"), models)


if __name__ == "__main__":
    main()
