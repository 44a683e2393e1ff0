"""The decode step's attention alone, one thread: SDPA (as attention.attend runs it), attend.c's
vertical form (decode_attention.few_heads(0)), attend_few.c (few_heads(FEW_HEADS): up to 8 query heads
a K/V head), and a plain read of the same keys and values (their sums) as the floor from memory.

Each call takes the next of 9 layers' caches, as a model's step does; "warm" repeats one layer's,
"from memory" reads 96 MB between calls (the weights' stream between two layers' attention).
Medians of 27 calls, µs.

Run: python benchmarks/decode_attention.py [--shapes B:H:KV:D:S,...] [--dtypes float32,bfloat16]
Prints a markdown table (for RESULTS.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from starcoder_tp import decode_attention  # noqa: E402
from starcoder_tp.attention import attend as sdpa_attend  # noqa: E402
from starcoder_tp.cpu import cpu_kind  # noqa: E402
from starcoder_tp.malloc import as_a_cpu_rank  # noqa: E402

# (batch, heads, K/V heads, head dim, keys): the StarCoder2 bench model at world size 1 and 2, batch 16
# and 1; the GPTBigCode bench model's multi-query heads at world size 1 and 2 (16 and 8 a K/V head).
SHAPES = "16:8:2:128:152,16:4:1:128:152,1:8:2:128:512,16:8:2:128:1024,16:16:1:64:152,16:8:1:64:152"
LAYERS = 9


def _shape(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.split(":"))
    if len(parts) != 5 or min(parts) < 1 or parts[1] % parts[2] or parts[3] % 16:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected B:H:KV:D:S, H a multiple of KV, D of 16")
    return parts


def median_us(call, layers: list, evict: torch.Tensor | None, warm: bool) -> float:
    times = []
    for i in range(3 * LAYERS):
        if evict is not None:
            evict.sum()
        keys, values = layers[0 if warm else i % LAYERS]
        start = time.perf_counter()
        call(keys, values)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def row(dtype: torch.dtype, shape: tuple[int, ...], evict: torch.Tensor) -> str:
    b, h, kv, d, s = shape
    fused = torch.randn(b, 1, (h + 2 * kv) * d).to(dtype)  # q: a view of the fused q/k/v, as in the model
    q = fused[..., :h * d].view(b, 1, h, d)
    layers = [tuple(torch.randn(b, kv, s + 36, d).to(dtype)[:, :, :s] for _ in range(2)) for _ in range(LAYERS)]
    scale = d ** -0.5
    ours = lambda k, v: decode_attention.attend(q, k, v, None, scale)  # noqa: E731
    # (form, attend_few.c's head count while it is timed, the call)
    forms = [("sdpa", 0, lambda k, v: sdpa_attend(q, k, v, None, scale)), ("vertical", 0, ours),
             ("few", decode_attention.FEW_HEADS, ours), ("read", 0, lambda k, v: (k.sum(), v.sum()))]
    cells = []
    for _, most, call in forms:
        decode_attention.few_heads(most)
        call(*layers[0])
        warm, cold = median_us(call, layers, None, True), median_us(call, layers, evict, False)
        cells.append(f"{warm:.0f} / {cold:.0f}")
    decode_attention.few_heads(decode_attention.FEW_HEADS)
    name = str(dtype).removeprefix("torch.")
    return f"| {name} | {', '.join(map(str, shape))} (G {h // kv}) | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, type=lambda t: [_shape(p) for p in t.split(",")],
                        help="B:H:KV:D:S, comma-separated. Default: %(default)r")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        type=lambda t: [getattr(torch, name) for name in t.split(",")],
                        help="Default: %(default)r")
    args = parser.parse_args()
    if not decode_attention.available():
        raise SystemExit("attend.c is not built here, or this CPU lacks AVX-512: nothing of ours to time")
    as_a_cpu_rank()
    torch.set_num_threads(1)
    evict = torch.randn(96 * 2 ** 20 // 4)
    print(f"{cpu_kind()}, one thread; µs, warm / from memory (medians of {3 * LAYERS} calls)\n")
    print("| dtype | batch, heads, K/V heads, head dim, keys | SDPA | attend.c vertical | attend_few.c | read K+V |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for dtype in args.dtypes:
            for shape in args.shapes:
                print(row(dtype, shape, evict), flush=True)


if __name__ == "__main__":
    main()
