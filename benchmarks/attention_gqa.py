"""Prefill attention with fewer K/V heads than query heads (StarCoder's multi-query attention,
StarCoder2's grouped-query attention): SDPA with the K/V heads expanded to every query head (a
view for one K/V head), made contiguous, or mapped by SDPA itself (`enable_gqa`), causal, one
thread, best of 7 calls each (after a warm-up), side by side in one sitting.

Run: python benchmarks/attention_gqa.py [--lengths 128,512]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import best_s  # noqa: E402
from speed import write_table  # noqa: E402


def best_ms(fn) -> float:
    return best_s(fn, 7) * 1e3


def row(dtype: torch.dtype, heads: int, kv: int, length: int) -> str:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, 64, generator=gen).to(dtype)
    k, v = (torch.randn(1, kv, length, 64, generator=gen).to(dtype) for _ in range(2))
    if kv == 1:
        wide_k, wide_v = k.expand(1, heads, -1, -1), v.expand(1, heads, -1, -1)
    else:
        wide_k, wide_v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    ms = {"expanded": best_ms(lambda: F.scaled_dot_product_attention(q, wide_k, wide_v, is_causal=True)),
          "contiguous": best_ms(lambda: F.scaled_dot_product_attention(q, wide_k.contiguous(), wide_v.contiguous(),
                                                                         is_causal=True)),
          "enable_gqa": best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))}
    same = torch.allclose(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float(),
                          F.scaled_dot_product_attention(q, wide_k, wide_v, is_causal=True).float(), atol=1e-2)
    return (f"| {str(dtype)[6:]} | {heads} / {kv} | {length} | {ms['expanded']:.2f} | {ms['contiguous']:.2f} | "
            f"{ms['enable_gqa']:.2f} | {ms['enable_gqa'] / ms['expanded']:.2f} | {'yes' if same else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,512", help="Default: %(default)r")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    lines = [row(dtype, heads, kv, int(length)) for dtype in (torch.float32, torch.bfloat16)
             for heads, kv in ((16, 1), (16, 4)) for length in args.lengths.split(",")]
    write_table("Grouped attention", "attention_gqa.py", started,
                "Causal prefill SDPA, head dim 64, batch 1; ms, best of 7. `expanded` = K/V heads expanded to every "
                "query head (a view for one K/V head, repeat_interleave for several), as attention.py did before; "
                "`enable_gqa` = SDPA maps the query heads itself.",
                ["dtype", "heads / K/V heads", "tokens", "expanded", "contiguous", "enable_gqa", "enable_gqa/expanded",
                 "same output"], lines)


if __name__ == "__main__":
    main()
