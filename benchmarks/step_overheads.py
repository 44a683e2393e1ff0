"""What a decode step spends outside its matmuls and attention: each per-step mechanism of the
runtime timed alone, in the ranks as the runtime runs them (two ranks over shared memory, one
core each, the bench-size model), next to the whole step, and where it was changed, the former
code side by side in the same sitting.

Mechanisms, per decode step:
- pick: the greedy token, `TPCausalLM.pick_greedy` (local max, the ranks' candidates summed on one small
  board, the winning rank: argmax.pick);
  before: the local `argmax` and a `gather` of its value.
- all-reduce: `ShmComm.all_reduce_` of one [B, 1, E] activation, 2 per layer + 1 (the embedding);
  before: the shared slots' views made at every call, the flag written through torch, the sum
  built in a fresh tensor and copied back.
- heartbeat: a forward pre-hook on each block (a rank's liveness): the module call with the hook
  against without it, on an empty module, n_layer calls.
- mask: `attention_mask` for a left-padded request at the step's slot (built once a step, only
  for padded batches; the perf cases have none).

Each mechanism is timed over `--calls` calls per round, rounds alternating between the
mechanisms and the former code; medians over rounds. Both ranks run the same sequence, so every
collective's time includes waiting for the other rank, as in the model.

Run: python benchmarks/step_overheads.py [--dtypes float32,bfloat16] [--batches 1,16]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import write_results  # noqa: E402
from two_ranks import run_on_segment  # noqa: E402

from starcoder_tp import rowdot, shm_comm  # noqa: E402
from starcoder_tp.malloc import as_a_cpu_rank  # noqa: E402
from starcoder_tp.attention import attention_mask  # noqa: E402
from starcoder_tp.comm import TPGroup  # noqa: E402
from starcoder_tp.cpu import cpu_kind, isa_flags  # noqa: E402
from starcoder_tp.model import load_model  # noqa: E402
from starcoder_tp.shard import ensure_shards  # noqa: E402
from starcoder_tp.testing.build_models import build_bench  # noqa: E402

SEQ_IN = 128


def pick_with_argmax(model, logits: torch.Tensor) -> torch.Tensor:
    """pick_greedy as it was before: argmax, then a gather of the winning value."""
    local_idx = logits.argmax(dim=-1)
    local_val = logits.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1)
    packed = torch.stack([local_val.double(), (local_idx + model.vocab_start).double()], dim=-1)
    gathered = model.tp.all_gather(packed)
    best_rank = gathered[..., 0].argmax(dim=0)
    return gathered[best_rank, torch.arange(logits.shape[0]), 1].long()


def _exchange_before(comm: shm_comm.ShmComm, chunk: torch.Tensor) -> torch.Tensor:
    """ShmComm._exchange as it was before: views made per call, the flag written through torch."""
    comm._seq += 1
    nbytes = chunk.numel() * chunk.element_size()
    buffers = comm._data[comm._seq % 2]
    buffers[comm.rank, :nbytes].copy_(chunk.view(-1).view(torch.uint8))
    comm._flags[comm.rank, 0] = comm._seq
    comm._wait(comm._seq)
    return buffers[:, :nbytes].view(chunk.dtype)


def all_reduce_before(comm: shm_comm.ShmComm, t: torch.Tensor) -> torch.Tensor:
    """ShmComm.all_reduce_ as it was before (contiguous input): the sum in a new tensor, copied back."""
    flat = t.view(-1)
    for chunk in comm._chunks(flat):
        parts = _exchange_before(comm, chunk)
        total = parts[0].clone()
        for r in range(1, comm.world_size):
            total += parts[r]
        chunk.copy_(total)
    return t


class _Empty(nn.Module):
    def forward(self, x, start, mask, rotary):
        return x


def _per_call_us(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def _rank(rank: int, path: str, shard_dir: str, batches: list[int], rounds: int, calls: int, queue) -> None:
    as_a_cpu_rank()  # allocator and 2 MiB pages as a rank's, before the first large block
    torch.set_num_threads(1)
    os.sched_setaffinity(0, [rank % (os.cpu_count() or 1)])
    comm = shm_comm.ShmComm(path, rank, 2, timeout_s=300)
    comm.use_small_reduce(rowdot.small_all_reduce())  # (as a rank's: the decode step's all-reduces in one call)
    model = load_model(shard_dir, TPGroup(rank, 2, comm), torch.device("cpu"), kernels="auto")
    c = model.config
    ticks = [0]
    tick = lambda *_: ticks.__setitem__(0, ticks[0] + 1)  # noqa: E731, the runtime's Heartbeat.tick
    bare, hooked = _Empty(), _Empty()
    hooked.register_forward_pre_hook(tick)
    out = {}
    with torch.inference_mode():
        for batch in batches:
            model.setup_cache(batch, SEQ_IN + 8)
            ids = torch.randint(1, c.vocab_size, (batch, SEQ_IN), generator=torch.Generator().manual_seed(0))
            logits = model(ids, torch.arange(SEQ_IN).expand(batch, -1), 0, None)
            last, position = model.pick_greedy(logits).unsqueeze(-1), torch.full((batch, 1), SEQ_IN)
            activation = torch.randn(batch, 1, c.n_embd).to(logits.dtype)
            key_valid = torch.ones(batch, SEQ_IN + 8, dtype=torch.bool)
            key_valid[0, :3] = False  # one left-padded row
            slot = torch.tensor([SEQ_IN])
            x = torch.zeros(1)

            def step() -> None:
                model.pick_greedy(model(last, position, SEQ_IN, None))

            mechanisms = {
                "step": (1, step),
                "pick": (1, lambda: model.pick_greedy(logits)),
                "pick before": (1, lambda: pick_with_argmax(model, logits)),
                "all-reduce": (2 * c.n_layer + 1, lambda: comm.all_reduce_(activation)),
                "all-reduce before": (2 * c.n_layer + 1, lambda: all_reduce_before(comm, activation)),
                "block call, pre-hook": (c.n_layer, lambda: hooked(x, 0, None, None)),
                "block call, none": (c.n_layer, lambda: bare(x, 0, None, None)),
                "mask": (1, lambda: attention_mask(key_valid[:, :SEQ_IN + 1], slot)),
            }
            times: dict[str, list[float]] = {name: [] for name in mechanisms}
            for name, (_, fn) in mechanisms.items():  # warm-up
                _per_call_us(fn, 3)
            for _ in range(rounds):
                for name, (_, fn) in mechanisms.items():
                    times[name].append(_per_call_us(fn, 3 if name == "step" else calls))
            out[batch] = {name: (mechanisms[name][0], statistics.median(t)) for name, t in times.items()}
    if rank == 0:
        queue.put(out)


def measure(dtype: str, batches: list[int], rounds: int, calls: int) -> dict:
    shard_dir = str(ensure_shards(str(build_bench()), 2, dtype, log=lambda m: None))
    return run_on_segment(_rank, lambda rank, path, queue: (rank, path, shard_dir, batches, rounds, calls, queue),
                          replies=1, timeout_s=1800)[0]  # (rank 0 replies)


def rows(dtype: str, results: dict) -> list[str]:
    lines = []
    for batch, r in results.items():
        step_us = r["step"][1]

        def cell(name: str) -> str:
            n, us = r[name]
            return f"{us:.1f} x {n} = {us * n:.0f} µs ({us * n / step_us:.2%})"

        hook = r["block call, pre-hook"][1] - r["block call, none"][1]
        n_layer = r["block call, none"][0]
        lines.append(f"| {dtype} | {batch} | {step_us / 1e3:.2f} | {cell('pick before')} | {cell('pick')} | "
                     f"{cell('all-reduce before')} | {cell('all-reduce')} | {hook:.2f} x {n_layer} = {hook * n_layer:.0f} µs "
                     f"({hook * n_layer / step_us:.2%}) | {cell('mask')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="Default: %(default)r")
    parser.add_argument("--batches", default="1,16", help="Default: %(default)r")
    parser.add_argument("--rounds", type=int, default=15, help="Default: %(default)r")
    parser.add_argument("--calls", type=int, default=200, help="calls of a mechanism per round. Default: %(default)r")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    started = time.perf_counter()
    table = []
    for dtype in args.dtypes.split(","):
        print(f"[overheads] {dtype}, batches {batches}", flush=True)
        table += rows(dtype, measure(dtype, batches, args.rounds, args.calls))
        print(table[-1], flush=True)
    model, flags = cpu_kind(), isa_flags()
    text = "\n".join([
        "## Decode-step overheads", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/step_overheads.py` in "
        f"{time.perf_counter() - started:.0f} s. Machine: {model} ({flags}), torch {torch.__version__}. Bench-size "
        f"model, world size 2 over shared memory, one core per rank, prompt {SEQ_IN} tokens, kernels `auto`.", "",
        "Each cell: µs per call (median of rounds) x calls per decode step = µs per step (share of the step). "
        "`before` = the code before this change, timed alongside. Heartbeat = a block call with the pre-hook "
        "minus without. Mask = built once a step, for left-padded batches only.", "",
        "| dtype | batch | decode step ms | pick before | pick | all-reduce before | all-reduce | heartbeat | mask |",
        "|---|---|---|---|---|---|---|---|---|", *table])
    write_results("Decode-step overheads", text)
    print(text)


if __name__ == "__main__":
    main()
