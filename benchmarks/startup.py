"""Start-up from scratch: seconds from a runner's start to its first answer with no kernel plan and no
form cached, as on a machine the runtime has not measured yet: spawn and load, the forms' calibration,
the plan's measurement, the lay-out, the settles, and the warm-up's generations (the perf suite's warm-up
for the case: a short generation, then the case's prefill). The shards and the built C libraries are
kept: the cut is a one-off per checkpoint, the libraries are built once per machine. Issue 16's target
("start-up <= 15 s for the bench-size model, including the kernel measurement") means this figure;
speed.py's cached start-up (shard check + spawn + load) leaves the measurement out.

The cache is a temporary directory ($STARCODER_TP_CACHE) holding links to the real cache's shards and
libraries; the real cache is not written. Fresh memory faults in slowly on some VMs, more after a
pause (RESULTS.md, "Start-up: the linear weights laid out from the part's mapping"): repeat, and compare
codes alternately.

Run: python benchmarks/startup.py [--model bench|bench-starcoder2|embedded|DIR] [--dtypes float32]
     [--world-sizes 1,2] [--repeat 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from starcoder_tp import setup_phases
from starcoder_tp.files import EMBEDDED_MODEL_DIR, cache_at, cache_dir
from starcoder_tp.options import positive_int
from starcoder_tp.shard import ensure_shards
from starcoder_tp.suite.perf import Case, PerfOptions, PerfRunner
from starcoder_tp.testing.build_models import build_bench, build_bench_starcoder2

KEPT = ("shards", "native")  # the real cache's, linked: a cut and a build are one-offs
CASE = Case(1, 128, 2)


def from_scratch(model_dir: str, dtype: str, world_size: int, case: Case = CASE) -> dict[str, Any]:
    """A runner started on `model_dir` with nothing measured cached, to its first answer for `case`:
    {"load_s": start() (shard check, spawn, load), "first_answer_s": to the warm-up's end, "kernels":
    the kernels it chose, as the perf suite logs them ("auto (measured, ..."), "setup_s": the
    warm-up's set-up phases in seconds (setup_phases.py)}."""
    ensure_shards(model_dir, world_size, dtype, log=lambda m: None)  # (in the real cache: a one-off)
    with tempfile.TemporaryDirectory(prefix="startup-") as scratch:
        for kept in KEPT:
            cache_dir(kept).mkdir(parents=True, exist_ok=True)
            (Path(scratch) / kept).symlink_to(cache_dir(kept), target_is_directory=True)
        with cache_at(scratch):  # (the ranks inherit it)
            options = PerfOptions(model_dir=model_dir, world_size=world_size, dtype=dtype, batch_sizes=(case.batch,),
                                  seq_in=(case.seq_in,), seq_out=(case.seq_out,), rounds=1, threads_per_rank=1)
            started = time.perf_counter()
            runner = PerfRunner(options, log=lambda m: None).start()
            try:
                loaded = time.perf_counter()
                runner.warm_up(case)
                answered = time.perf_counter()
                kernels, setup = runner.kernels_logged, runner.warm_up_setup_s
            finally:
                runner.close()
    return {"load_s": loaded - started, "first_answer_s": answered - started, "kernels": kernels, "setup_s": setup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench",
                        help="bench, bench-starcoder2, embedded or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--dtypes", default="float32", help="Default: %(default)r")
    parser.add_argument("--world-sizes", type=lambda v: [positive_int(w) for w in v.split(",")], default=[1, 2],
                        help="comma-separated. Default: %(default)r")
    parser.add_argument("--repeat", type=positive_int, default=1, help="Default: %(default)r")
    args = parser.parse_args()
    model_dir = {"bench": lambda: str(build_bench()), "bench-starcoder2": lambda: str(build_bench_starcoder2()),
                 "embedded": lambda: str(EMBEDDED_MODEL_DIR)}.get(args.model, lambda: args.model)()
    for _ in range(args.repeat):
        for dtype in [d for d in args.dtypes.split(",") if d]:
            for world_size in args.world_sizes:
                t = from_scratch(model_dir, dtype, world_size)
                print(f"[startup] {args.model} {dtype} ws{world_size} {CASE.id}: first answer {t['first_answer_s']:.1f} s "
                      f"from scratch (load {t['load_s']:.1f} s; set-up {setup_phases.describe(t['setup_s'])})", flush=True)


if __name__ == "__main__":
    main()
