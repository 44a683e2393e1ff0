"""The padded prefill before and after the attention rewrite, side by side: the mask handed to
SDPA (its shape and bytes, read off the real call) and the prefill time, for a left-padded batch
(8 x 512 by default) at world size 1, one thread.

"Before" is another commit's code (--ref, extracted as the A/B gate extracts side B), "after" this
checkout's; each runs in a process of its own, alternating, --repeats times. Prints a markdown
table; with --write, it becomes the "attention mask" section of benchmarks/RESULTS.md.
Run: python benchmarks/attention_mask.py --ref main --model embedded [--write]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(model_dir: str, batch: int, length: int, rounds: int) -> dict:
    """In this process, with whichever starcoder_tp is first on the path."""
    import torch
    import torch.nn.functional as F

    import starcoder_tp
    from starcoder_tp.shard import ensure_shards

    try:  # the layout after the rewrite, then the one before
        from starcoder_tp.comm import TPGroup
        from starcoder_tp.model import load_model
    except ImportError:
        from starcoder_tp.generate import load_model
        from starcoder_tp.model import TPGroup
    try:  # allocator and 2 MiB pages as a rank's, before the first large block (code from before malloc.py: none)
        from starcoder_tp import malloc

        malloc.tune_malloc()
        malloc.enable_huge_pages()
    except (ImportError, AttributeError):
        pass
    torch.set_num_threads(1)
    model = load_model(ensure_shards(model_dir, 1, "float32", log=lambda m: None), TPGroup(0, 1), torch.device("cpu"))
    lengths = [length - (length // (2 * batch)) * row for row in range(batch)]  # ragged: every row padded but one
    ids = torch.randint(20, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    key_valid = torch.zeros(batch, length + 1, dtype=torch.bool)
    for row, n in enumerate(lengths):
        key_valid[row, length - n:] = True
    positions = (key_valid[:, :length].long().cumsum(-1) - 1).clamp(min=0)
    masks = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        if attn_mask is not None:
            masks.append((tuple(attn_mask.shape), attn_mask.numel() * attn_mask.element_size()))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    times = []
    with torch.inference_mode():
        model.setup_cache(batch, length + 1)
        F.scaled_dot_product_attention = recording
        try:
            model(ids, positions, 0, key_valid)  # warm-up, and the masks of one prefill
        finally:
            F.scaled_dot_product_attention = sdpa
        for _ in range(rounds):
            started = time.perf_counter()
            model(ids, positions, 0, key_valid)
            times.append((time.perf_counter() - started) * 1e3)
    shape, nbytes = max(masks, key=lambda m: m[1])
    return {"code": str(Path(starcoder_tp.__file__).parent), "mask_shape": list(shape), "mask_bytes": nbytes,
            "masks_per_prefill": len(masks), "prefill_ms": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="main", help="the code before. Default: %(default)r")
    parser.add_argument("--model", default="embedded", help="embedded, bench or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="prefills timed per process. Default: %(default)r")
    parser.add_argument("--repeats", type=int, default=3, help="processes per side, alternating. Default: %(default)r")
    parser.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "BATCH", "LENGTH", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, batch, length, rounds = args.child
        print(json.dumps(measure(model, int(batch), int(length), int(rounds))))
        return

    sys.path.insert(0, str(REPO))
    from starcoder_tp.files import EMBEDDED_MODEL_DIR
    from starcoder_tp.suite.gitref import checkout_ref
    from starcoder_tp.suite.machine import describe, machine_fingerprint
    from starcoder_tp.device import Device
    from starcoder_tp.testing.build_models import build_bench

    model_dir = {"embedded": str(EMBEDDED_MODEL_DIR), "bench": None}.get(args.model, args.model)
    model_dir = model_dir or str(build_bench())
    sides = {"before": checkout_ref(args.ref).path, "after": REPO}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, code in sides.items():
            env = {**os.environ, "PYTHONPATH": str(code)}
            proc = subprocess.run([sys.executable, __file__, "--child", model_dir, str(args.batch), str(args.length),
                                   str(args.rounds)], capture_output=True, text=True, env=env, cwd=code, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"{side} ({code}) failed:\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    machine = describe(machine_fingerprint(Device("cpu"), 1))
    lines = ["## attention mask: padded prefill before and after", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/attention_mask.py`, "
             f"{args.repeats} processes per side alternating, median of {args.rounds} prefills each. Machine: {machine}. "
             f"Model: `{model_dir}`, world size 1, float32; a left-padded batch of {args.batch} x {args.length} tokens "
             f"(every row padded but one). Before: {args.ref}; after: this checkout.", "",
             "| code | largest mask handed to SDPA | its bytes | masks per prefill | prefill ms (per process) |",
             "|---|---|---|---|---|"]
    for side, results in runs.items():
        r = results[0]
        times = ", ".join(f"{x['prefill_ms']:.1f}" for x in results)
        lines.append(f"| {side} | {r['mask_shape']} bool | {r['mask_bytes'] / 2**20:.1f} MiB | {r['masks_per_prefill']} "
                     f"| {times} |")
    before = statistics.median(x["prefill_ms"] for x in runs["before"])
    after = statistics.median(x["prefill_ms"] for x in runs["after"])
    lines += ["", f"after / before: mask bytes {runs['after'][0]['mask_bytes'] / runs['before'][0]['mask_bytes']:.3f}, "
                  f"prefill time {after / before:.3f} (medians over the processes)."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from speed import write_results

        write_results(lines[0][3:], text)


if __name__ == "__main__":
    main()
