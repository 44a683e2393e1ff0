"""The token embedding, whose weight a tied lm_head shares (GPTBigCode, StarCoder2 3B/7B).

One [V, E] weight serves both: the embedding reads a few of its rows per token, the lm_head all of
it at every step. The lm_head's kernel takes it in its own layout (kernels.py), a copy; where that
layout is panels, a permutation of the weight, the embedding reads its rows from there, and the
plain weight is dropped: one copy in memory, not two (the bench-size model's is 192 MiB in fp32).
Until the lm_head's layout is known (the first request, setup_cache) the weight is left in the part
file's mapping, as the linear weights are: its copy out at load, 192 MiB of fresh memory, cost a
start-up from scratch 1.2 s on the EPYC Zen 4 VM (RESULTS.md, "Start-up: the tied embedding read from
the lm_head's panels"). A row read from panels costs more than a plain one (~10-30 us a decode step,
0.2% of a prefill there). Where the lm_head keeps another layout, the lay-out copies the plain weight
out of the mapping, into the process's own memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import malloc, panels


class Embedding(nn.Embedding):
    """nn.Embedding (its parameter named `weight`, so parts load as they are) whose rows come from the
    tied lm_head's panels where it has them (`share`), else from its own plain weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        # Given a weight, nn.Embedding skips its normal_ fill (on meta, its first call imports torch._dynamo)
        super().__init__(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
        self.in_file = False  # the weight is the part file's mapping (load_model), until `share`
        self.panels: torch.Tensor | None = None  # the tied lm_head's panels, where the rows are read

    def shape_key(self) -> str:  # (kernels.shape_key's, whether the plain weight is held or not)
        dtype = (self.panels if self.panels is not None else self.weight).dtype
        return f"{self.num_embeddings}x{self.embedding_dim}:{str(dtype).removeprefix('torch.')}"

    def plain(self) -> torch.Tensor:
        """The plain [V, E] weight: its own, or unpacked from the panels (a copy, exact)."""
        return self.weight if self.panels is None else panels.unpack(self.panels)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, T] -> [B, T, E]
        if self.panels is not None:
            return panels.rows(self.panels, input_ids)
        return F.embedding(input_ids, self.weight)

    def share(self, packed: torch.Tensor | None, plain: torch.Tensor) -> None:
        """After the tied lm_head's lay-out: its `packed` weight where that is panels (the rows are read
        there, the plain weight released), else None, and the plain weight `plain` (plain()'s) kept in this
        process's own memory, placed as the kernels read it (copied out of the file's mapping)."""
        with torch.inference_mode(False), torch.no_grad():  # (parameters made here outlive inference mode)
            if packed is not None:
                self.panels, self.in_file = packed, False
                self.weight = nn.Parameter(plain.new_empty(0), requires_grad=False)
            elif self.panels is not None or self.in_file:
                owned = malloc.copy_of(plain) if self.in_file else malloc.placed(plain)
                self.panels, self.in_file = None, False
                self.weight = nn.Parameter(owned, requires_grad=False)
