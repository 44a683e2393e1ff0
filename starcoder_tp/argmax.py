"""The greedy pick: each row's largest logit and its first index, by a kernel of our own (argmax.c)
where it was measured faster than torch's max, and the pick among the ranks' shards (`pick`).

`pick` (TPCausalLM.pick_greedy) reduces each rank's vocabulary shard to its maximum and index, then
picks among the ranks. torch's max(dim=-1) runs that reduction at about two elements a nanosecond
on one thread of the EPYC Zen 5: 0.4-0.5 ms of a bf16 batch-16 decode step of the bench-size
model (49152 logits a row). It was already the fastest of torch's forms there: argmax and amax
then a first index ran 1.1-6x slower. argmax.c keeps a maximum and its index in each of 16 lanes
(its header says how). The two give the same values and indices, NaN included (the first NaN),
so a rank may run either; which one runs at a shape is measured (`calibrate`, at setup_cache,
outside any timed region). The kernel is built with rowdot.c into one library (rowdot.py) and
needs AVX-512; elsewhere torch's max runs.
"""
from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

import torch

from . import rowdot

if TYPE_CHECKING:
    from .comm import TPGroup

_DTYPES = (torch.float32, torch.bfloat16)
CALIBRATION_ROUNDS = 7  # timed calls of each form, alternated (the first of each is a warm-up)
# (rows, columns, dtype) -> whether argmax.c runs there: set by calibrate, read by row_max and pick.
PICK_FORM: dict[tuple[int, int, torch.dtype], bool] = {}
EXACT_FLOAT32_IDS = 1 << 24  # token ids up to this are exact as fp32 (pick's board)


def available() -> bool:
    """Whether argmax.c is built and runs on this CPU."""
    lib, _ = rowdot.library()
    # (the same AVX-512 subset as attend.c)
    return lib is not None and bool(lib.attend_supported()) and rowdot.runs_at_least("avx512")


def supports(logits: torch.Tensor) -> bool:
    """Whether `ours` takes these logits: [rows, n] on the CPU, fp32 or bf16, each row contiguous."""
    return (logits.device.type == "cpu" and logits.dim() == 2 and logits.dtype in _DTYPES
            and logits.shape[1] > 0 and logits.stride(1) == 1 and available())


def ours(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the largest value of each row as fp32, the index of its first occurrence), [rows] each,
    by argmax.c: what logits.max(dim=-1) gives (NaN: the first NaN). Only for what `supports` takes."""
    if not supports(logits):
        raise ValueError(f"argmax.ours: logits {list(logits.shape)} {logits.dtype} on {logits.device} (strides "
                         f"{logits.stride()}): not what argmax.c takes")
    return _run(logits)


def _run(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ours` once `supports` was checked."""
    rows, n = logits.shape
    values, index = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.int64)
    lib, _ = rowdot.library()
    kernel = lib.argmax_f32 if logits.dtype == torch.float32 else lib.argmax_bf16
    if kernel(logits.data_ptr(), logits.stride(0), rows, n, values.data_ptr(), index.data_ptr()):
        raise ValueError(f"argmax.ours: argmax.c does not take {n} columns")
    return values, index


def row_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits.max(dim=-1) of [rows, n] logits: by argmax.c where `calibrate` measured it faster at
    this shape and dtype, else by torch. The values' dtype may differ (fp32 from ours)."""
    if logits.dim() == 2 and PICK_FORM.get((*logits.shape, logits.dtype)) and supports(logits):
        return _run(logits)
    return logits.max(dim=-1)


def pick(logits: torch.Tensor, tp: "TPGroup", first: int) -> torch.Tensor:
    """The greedy pick over the ranks' vocabulary shards, without gathering the logits: [B] ids. `logits`:
    this rank's [B, V_local], its ids from `first` on; `tp` the group. Ties go to the lowest id, as
    torch.argmax over the whole vocabulary's logits does.

    Where the ranks share memory (tp.shm), each rank's candidates, (its maximum, that id), go in its own row
    of a zeroed fp32 board, summed by one small all-reduce (shm_reduce.c): x + 0 is x in IEEE arithmetic
    without flush-to-zero (-0 becomes +0, which compares equal), so every rank's arrive whole, NaN included.
    With argmax.c the board is filled and read in one call each. Elsewhere (torch.distributed: an NPU's
    saturating sums would not keep a NaN), and for ids past what fp32 holds exactly, the candidates go as
    doubles through an all-gather."""
    world_size, rows = tp.world_size, logits.shape[0]
    ours_here = logits.dim() == 2 and PICK_FORM.get((*logits.shape, logits.dtype)) and supports(logits)
    if world_size == 1:
        return (_run(logits) if ours_here else logits.max(dim=-1))[1]
    # (the same collective on every rank: every rank has the group's shm or none, the same shard width, and
    # either board form all-reduces the same fp32 [N, B, 2])
    if tp.shm is None or world_size * logits.shape[1] > EXACT_FLOAT32_IDS:
        values, index = row_max(logits)
        board = tp.all_gather(torch.stack([values.double(), (index + first).double()], -1))  # [N, B, 2]
    elif ours_here:
        lib, _ = rowdot.library()
        board = torch.empty(world_size, rows, 2, dtype=torch.float32)  # [N, B, 2]
        fill = lib.argmax_board_f32 if logits.dtype == torch.float32 else lib.argmax_board_bf16
        failed = fill(logits.data_ptr(), logits.stride(0), rows, logits.shape[1], tp.rank, world_size, first,
                      board.data_ptr())
        assert not failed, "argmax.c refuses only rows of 2^31 or more, and the board's are under 2^24"
        tp.all_reduce_(board)
        ids = torch.empty(rows, dtype=torch.int64)
        lib.argmax_board_pick(board.data_ptr(), world_size, rows, ids.data_ptr())
        return ids
    else:
        values, index = logits.max(dim=-1)
        board = torch.zeros(world_size, rows, 2, dtype=torch.float32, device=logits.device)  # [N, B, 2]
        board[tp.rank, :, 0] = values
        board[tp.rank, :, 1] = index + first
        tp.all_reduce_(board)
    best_rank = board[..., 0].argmax(dim=0)  # [B]; first maximum = lowest rank = lowest id
    return board[best_rank, torch.arange(rows, device=logits.device), 1].long()


def calibrate(rows: int, n: int, dtype: torch.dtype) -> str:
    """Time torch's max and argmax.c on random [rows, n] logits in `dtype` (once per shape and
    process) and note in PICK_FORM whether ours was faster; returns what was found."""
    key = (rows, n, dtype)
    if key in PICK_FORM:
        return f"{'ours' if PICK_FORM[key] else 'torch'} (measured before)"
    sample = torch.randn(rows, n).to(dtype)
    if not supports(sample):
        PICK_FORM[key] = False
        return "torch (argmax.c does not run here)"
    ms = time_forms({"torch": lambda: sample.max(dim=-1), "ours": lambda: ours(sample)})
    PICK_FORM[key] = ms["ours"] < ms["torch"]
    return f"{'ours' if PICK_FORM[key] else 'torch'} ({rows}x{n}: argmax.c {ms['ours']:.3f} vs torch {ms['torch']:.3f} ms)"


def describe(rows: int, n: int) -> str:
    """"; pick:ours" or "; pick:torch" where calibrate measured [rows, n] logits (in any dtype), else ""."""
    measured = [taken for (r, columns, _), taken in PICK_FORM.items() if (r, columns) == (rows, n)]
    return f"; pick:{'ours' if any(measured) else 'torch'}" if measured else ""


def time_forms(forms: dict[str, object]) -> dict[str, float]:
    """Each callable's median ms over CALIBRATION_ROUNDS calls, alternated, the first dropped."""
    times: dict[str, list[float]] = {name: [] for name in forms}
    for round_ in range(CALIBRATION_ROUNDS):
        for name in (list(forms) if round_ % 2 == 0 else list(forms)[::-1]):
            started = time.perf_counter()
            forms[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}
