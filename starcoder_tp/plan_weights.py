"""The model's weights as the kernel plan sees them (kernels.py): one weight per distinct shape key,
read (unpacked, where a layout holds it) only when something asks for its data. Choosing the kernels
at a new batch size needs the shapes and dtypes alone where the machine's plan is cached; reading
every packed weight back there cost up to 630 ms a change of batch size (benchmarks/RESULTS.md,
"Start-up: the weights read back only for a measurement"). A measurement reads every weight, and
a fixed `--kernels` mode's trial (kernels.fixed_choice) one of each shape."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from .linear import Linear


class PlainWeights(Mapping):
    """shape key -> the plain [N, K] weight, read on first access and then held (a measurement
    reads each several times); iterating, `len` and `in` read nothing."""

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]]):
        self._readers = readers
        self._read: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._read:
            self._read[key] = self._readers[key]()
        return self._read[key]

    def __contains__(self, key: object) -> bool:  # (Mapping's would read the weight)
        return key in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def read(self) -> int:
        """How many weights were read so far."""
        return len(self._read)


def by_shape(model: nn.Module, activation: str, tied: nn.Module | None = None
             ) -> tuple[PlainWeights, set[str], dict[str, str], int]:
    """The model's Linear weights (and `tied`, an embedding.Embedding that is also the lm_head's weight)
    by shape; the shapes also run at prefill rows (all but the lm_head's: one row per sequence); those
    run with the MLP's `activation` (its first linear, Linear.forward_activated); and the bytes of all
    the weights a decode step reads."""
    readers, prefill, activated, step_bytes = {}, set(), {}, 0
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            key = module.shape_key()
            step_bytes += module.in_features * module.out_features * module.weight.element_size()
            readers.setdefault(key, module.plain_weight)
            if name != "lm_head":
                prefill.add(key)
            if name.endswith("mlp.c_fc"):
                activated[key] = activation
    if tied is not None:
        readers.setdefault(tied.shape_key(), tied.plain)
        step_bytes += tied.num_embeddings * tied.embedding_dim * tied.weight_dtype.itemsize
    return PlainWeights(readers), prefill, activated, step_bytes
