"""The token embedding, whose weight a tied lm_head shares (GPTBigCode, StarCoder2 3B/7B).

One [V, E] weight serves both: the embedding reads a few of its rows per token, the lm_head all of
it at every step. A packed layout of the lm_head's (kernels.py) is a copy of its own; where that
layout is panels, a permutation of the weight, the embedding reads its rows from there, and the
plain weight is dropped: one copy in memory, not two (the bench-size model's is 192 MiB in fp32).
On the CPU, with measured or fixed kernels (not `plain`, not `compile`), the weight is left in the
part file's mapping until the lm_head's layout is known (the first request, setup_cache), as the
linear weights are: its copy out at load, 192 MiB of fresh memory, cost a start-up from scratch
1.2 s on the EPYC Zen 4 VM (RESULTS.md, "Start-up: the tied embedding read from the lm_head's
panels"). A row read from panels costs more than a plain one (~10-30 us a decode step, 0.2% of a
prefill there). Where the lm_head runs another layout, or the plain weight itself (plain, gemv,
rowdot), the embedding holds the plain weight in the process's own memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import malloc, panels
from .kernels import key_of


class Embedding(nn.Embedding):
    """nn.Embedding (its parameter named `weight`, so parts load as they are) whose rows come from the
    tied lm_head's panels where it has them (`share`), else from its own plain weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        # Given a weight, nn.Embedding skips its normal_ fill (on meta, its first call imports torch._dynamo)
        super().__init__(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
        self.in_file = False  # the weight is the part file's mapping (load_model), until `share`
        self.panels: torch.Tensor | None = None  # the tied lm_head's panels, where the rows are read

    @property
    def weight_dtype(self) -> torch.dtype:  # (whether the plain weight is held or not)
        return (self.panels if self.panels is not None else self.weight).dtype

    def shape_key(self) -> str:  # (kernels.shape_key's)
        return key_of(self.num_embeddings, self.embedding_dim, self.weight_dtype)

    def plain(self) -> torch.Tensor:
        """The plain [V, E] weight: its own, or unpacked from the panels (a copy, exact)."""
        return self.weight if self.panels is None else panels.unpack(self.panels)

    def held_plain(self) -> torch.Tensor:
        """The plain weight, held by the embedding from now on (its own, or unpacked from the panels, which
        it lets go: the lm_head's layout changes, and the old copy goes before the new one is made)."""
        if self.panels is not None:
            with torch.inference_mode(False), torch.no_grad():  # (parameters made here outlive inference mode)
                self.weight = nn.Parameter(self.plain(), requires_grad=False)
            self.panels = None
        return self.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, T] -> [B, T, E]
        if self.panels is not None:
            return panels.rows(self.panels, input_ids)
        return F.embedding(input_ids, self.weight)

    def shard_rows(self, input_ids: torch.Tensor, first: int) -> torch.Tensor:
        """[B, T, E]: the rows of the ids in this vocabulary shard, [first, first + num_embeddings), and zeros
        for the other shards' ids (whose rows the all-reduce that follows adds)."""
        if self.panels is not None:
            return panels.rows(self.panels, input_ids, first)
        local, outside = panels.shard_ids(input_ids, first, self.num_embeddings)
        return F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)

    def share(self, packed: torch.Tensor | None) -> None:
        """After the tied lm_head's lay-out (held_plain first): its `packed` weight where that is panels, the
        rows read there and the plain weight released; else None, the plain weight kept in this process's own
        memory (copied out of the file's mapping)."""
        with torch.inference_mode(False), torch.no_grad():
            if packed is not None:
                self.panels, self.in_file = packed, False
                self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
            elif self.in_file:
                self.weight, self.in_file = nn.Parameter(malloc.copy_of(self.weight), requires_grad=False), False
