"""Peak memory of cutting the bench-size model, against its size on disk.

Sharding reads tensor slices lazily and writes one output file at a time, so its peak RSS
should stay far below the checkpoint's size (the 15.5B StarCoder must not need 31+ GB).
Run: python benchmarks/shard_memory.py [--world-size 2] [--dtype float32]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from starcoder_tp.testing.build_models import build_bench

# The peak RSS of this process image (device.peak_rss_bytes: VmHWM, not ru_maxrss, which a child
# inherits from its parent across fork + exec).
CHILD = """
import sys, time
import torch  # imported before the baseline, as the CLI would
from starcoder_tp.device import peak_rss_bytes as hwm
from starcoder_tp.shard import shard_checkpoint
base = hwm()
t = time.perf_counter()
shard_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], max_file_bytes=int(sys.argv[5]), log=lambda m: None)
print(base, hwm(), time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-file-mb", type=int, default=64, help="largest output file. Default: %(default)r")
    args = parser.parse_args()
    started = time.perf_counter()
    model_dir = build_bench()
    print(f"bench model at {model_dir} (built or found in {time.perf_counter() - started:.1f}s)")
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), f"{tmp}/shards", str(args.world_size),
                              args.dtype, str(args.max_file_mb << 20)], capture_output=True, text=True, check=True)
        base, peak, seconds = out.stdout.split()
    base, peak = int(base), int(peak)
    mb = 1 << 20
    print(f"checkpoint size:            {size / mb:8.0f} MB")
    print(f"peak RSS of the shard run:  {peak / mb:8.0f} MB  (python + torch alone: {base / mb:.0f} MB)")
    print(f"added by sharding:          {(peak - base) / mb:8.0f} MB  = {(peak - base) / size:.2f} x the checkpoint")
    print(f"time to shard (ws={args.world_size}, {args.dtype}): {float(seconds):.1f}s")


if __name__ == "__main__":
    main()
