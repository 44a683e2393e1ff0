"""Whether worker groups of the same code, started the same way, run at the same speed: the A/B
harness pairs the rounds of two groups started once each, so a lasting difference between two
starts (where the kernel placed a process's memory, say) shows as a difference between the
sides that no number of rounds averages out, outside the confidence interval of the pairs.

`--groups` groups of the same code and shards run at once (each on the same cores, as the two
sides of an A/B), each warmed up, then `--rounds` rounds of one case interleaved G1 G2 G3 ...,
so that the machine's drift falls on every group alike. Per group: the median first token and
decode step of its rounds. Kruskal-Wallis over the groups' rounds says whether the groups differ
by more than their rounds do; `between` is the spread of the groups' medians (max/min), `within`
the median of the groups' own max/min.

Run: python benchmarks/spawn_spread.py [--model bench|DIR] [--batch 16] [--groups 4] [--rounds 8]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import write_table  # noqa: E402

from starcoder_tp.options import positive_int  # noqa: E402
from starcoder_tp.parallel import GroupSpec, WorkerGroup  # noqa: E402
from starcoder_tp.shard import ensure_shards  # noqa: E402
from starcoder_tp.testing.build_models import build_bench  # noqa: E402


def interleaved_rounds(shards: Path, world_size: int, groups: int, prompts: list[list[int]], seq_out: int,
                       rounds: int) -> list[dict]:
    """First-token and median decode-step ms of each round, per group; the groups alive at once."""
    length = len(prompts[0]) + seq_out
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(WorkerGroup(GroupSpec(str(shards), world_size, threads_per_rank=1)))
                   for _ in range(groups)]
        run = lambda g: g.generate(prompts, seq_out, ignore_eos=True, max_seq_len=length)[0]  # noqa: E731
        for group in started:
            run(group)  # the warm-up, as the perf suite's
        found = [{"first": [], "decode": []} for _ in started]
        for i in range(rounds):
            for group, out in zip(started, found):
                result = run(group)
                out["first"].append(result.first_token_ms)
                out["decode"].append(statistics.median(result.decode_ms))
            print(f"round {i + 1}/{rounds}: decode " + " ".join(f"{out['decode'][-1]:.2f}" for out in found), flush=True)
    return found


def spread(values: list[float]) -> float:
    return max(values) / min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="Default: %(default)r")
    parser.add_argument("--world-size", type=positive_int, default=1, help="Default: %(default)r")
    parser.add_argument("--batch", type=positive_int, default=16, help="Default: %(default)r")
    parser.add_argument("--seq-in", type=positive_int, default=128, help="Default: %(default)r")
    parser.add_argument("--seq-out", type=positive_int, default=32, help="Default: %(default)r")
    parser.add_argument("--groups", type=positive_int, default=4, help="Default: %(default)r")
    parser.add_argument("--rounds", type=positive_int, default=8, help="rounds per group. Default: %(default)r")
    args = parser.parse_args()
    if args.groups < 2 or args.rounds < 2:
        parser.error(f"--groups and --rounds must be at least 2 (got {args.groups}, {args.rounds})")
    started = time.perf_counter()
    model_dir = str(build_bench()) if args.model == "bench" else args.model
    shards = ensure_shards(model_dir, args.world_size, args.dtype, log=print)
    vocab = int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    prompts = np.random.default_rng(1234).integers(1, vocab, size=(args.batch, args.seq_in)).tolist()
    per_group = interleaved_rounds(shards, args.world_size, args.groups, prompts, args.seq_out, args.rounds)
    lines = [f"| {i + 1} | {statistics.median(s['first']):.1f} ({spread(s['first']):.3f}) | "
             f"{statistics.median(s['decode']):.2f} ({spread(s['decode']):.3f}) |" for i, s in enumerate(per_group)]
    summary = []
    for key, name in (("first", "first token"), ("decode", "decode")):
        medians = [statistics.median(s[key]) for s in per_group]
        within = statistics.median(spread(s[key]) for s in per_group)
        p = stats.kruskal(*(s[key] for s in per_group)).pvalue
        summary.append(f"{name}: groups' medians {min(medians):.2f}-{max(medians):.2f} ms, between {spread(medians):.3f} "
                       f"against within {within:.3f} (Kruskal-Wallis p={p:.2g})")
    about = (f"Model: `{model_dir}`, {args.dtype}, world size {args.world_size} (one thread per rank), batch "
             f"{args.batch}, {args.seq_in} prompt tokens, {args.seq_out} new; {args.groups} worker groups of the same "
             f"code alive at once, each warmed up, then {args.rounds} rounds each, interleaved. Per group: the median "
             f"of its rounds, ms (max/min of its rounds). " + "; ".join(summary) + ".")
    write_table("Worker groups of the same code: speed from one start to another", "spawn_spread.py", started, about,
                ["group", "first token (max/min)", "decode step (max/min)"], lines)


if __name__ == "__main__":
    main()
