"""The collectives the model needs across its tensor-parallel ranks (TPGroup): through
torch.distributed (gloo, nccl, hccl), or through shared memory (shm_comm.ShmComm) when the
ranks share one CPU host. At world size 1 every collective is a no-op."""
from __future__ import annotations

import functools
import itertools
import weakref
from typing import Callable

import torch
import torch.distributed as dist

# A compiled decode step reaches the all-reduce as one opaque operator, so that the step stays
# one graph at any depth: as a graph break it cost a graph per layer, and the layers past
# dynamo's recompile limit (8) ran eager. Operators take no Python objects, hence the key of a
# registered group.
_GROUPS: weakref.WeakValueDictionary[int, "TPGroup"] = weakref.WeakValueDictionary()
_group_keys = itertools.count()


@torch.library.custom_op("starcoder_tp::all_reduce_", mutates_args=("t",))
def _all_reduce_in_graph(t: torch.Tensor, group: int) -> None:
    _GROUPS[group]._sum_across_ranks(t)


@_all_reduce_in_graph.register_fake
def _(t: torch.Tensor, group: int) -> None:
    return None


class TPGroup:
    """This rank's place in the group and the collectives; `shm` is a ShmComm, or None for
    torch.distributed's process group."""

    def __init__(self, rank: int = 0, world_size: int = 1, shm=None):
        self.rank, self.world_size, self.shm = rank, world_size, shm
        self.key = next(_group_keys)
        _GROUPS[self.key] = self

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the row-parallel layers' partial products)."""
        if self.world_size > 1:
            if torch.compiler.is_compiling():
                torch.ops.starcoder_tp.all_reduce_(t, self.key)
            else:  # eager: no operator dispatch on the hot path
                self._sum_across_ranks(t)
        return t

    def _sum_across_ranks(self, t: torch.Tensor) -> None:
        if self.shm is not None:
            self.shm.all_reduce_(t)
        else:
            dist.all_reduce(t)

    def bound_all_reduce_(self, t: torch.Tensor) -> Callable[[], None]:
        """all_reduce_(t), eager, as a call made once: ShmComm's with its checks done where `t` takes its small
        path (a fused decode step's partial, summed twice a layer), else all_reduce_ itself. The caller holds
        `t`, contiguous, at the same address."""
        bound = self.shm.bound_all_reduce_(t) if self.world_size > 1 and self.shm is not None else None
        return bound if bound is not None else functools.partial(self.all_reduce_, t)

    def describe(self) -> str:
        """'; all-reduce probed' (or 'copied', 'streamed': ShmComm.use_stream_copy; then ',small-in-C' where
        small ones run in one call of shm_reduce.c) where the ranks share memory, else ''."""
        if self.shm is None:
            return ""
        return f"; all-reduce {self.shm.publishing}" + (",small-in-C" if self.shm.small_in_c else "")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[N, *t.shape]: every rank's `t`, in rank order."""
        if self.world_size == 1:
            return t.unsqueeze(0)
        return self._gather(t)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:  # (eager only: the compiled step returns the logits)
        if self.shm is not None:
            return self.shm.all_gather(t)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    def barrier(self, device: torch.device) -> None:
        """Every rank waits here for the others (a one-element all-reduce: microseconds on shm)."""
        if self.world_size > 1:
            self._sum_across_ranks(torch.zeros(1, device=device))

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks, in place (the slowest rank's step times)."""
        if self.world_size > 1:
            if self.shm is not None:
                t.copy_(self.shm.all_gather(t).amax(dim=0))
            else:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t
