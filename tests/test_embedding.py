"""The token embedding that a tied lm_head shares (embedding.py), and its rows read from panels."""
import pytest
import torch
import torch.nn.functional as F

from starcoder_tp import panels
from starcoder_tp.embedding import Embedding


def as_panels(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] in the panels layout that panels.py documents, made here by hand (any CPU)."""
    n, k = weight.shape
    if weight.dtype == torch.bfloat16:
        return weight.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return weight.reshape(n // 16, 16, k).permute(0, 2, 1).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_weights_rows_are_the_plain_weights_rows_exactly(dtype):
    weight = torch.randn(64, 10).to(dtype)
    packed = as_panels(weight)
    assert torch.equal(panels.unpack(packed), weight), "the premise: the layout as panels.py packs it"
    index = torch.tensor([[0, 17, 63], [15, 16, 40]])
    assert torch.equal(panels.rows(packed, index), weight[index])
    assert panels.rows(packed, index).shape == (2, 3, 10)


def embedding(weight: torch.Tensor) -> Embedding:
    module = Embedding(*weight.shape)
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    return module


def test_an_embedding_reads_its_rows_from_the_lm_heads_panels_and_holds_no_plain_weight_then():
    weight, ids = torch.randn(48, 8), torch.tensor([[3, 47, 16]])
    wte = embedding(weight.clone())
    key = wte.shape_key()
    assert key == "48x8:float32" and torch.equal(wte(ids), F.embedding(ids, weight))
    packed = as_panels(weight)
    wte.share(packed, wte.plain())
    assert wte.panels is packed and wte.weight.numel() == 0, "one copy of the weight: the lm_head's"
    assert torch.equal(wte(ids), F.embedding(ids, weight)) and wte.shape_key() == key
    assert torch.equal(wte.plain(), weight), "unpacked for a plan's measurement or another layout"
    wte.share(None, wte.plain())  # the lm_head laid out otherwise: the embedding holds the plain weight again
    assert wte.panels is None and torch.equal(wte.weight, weight) and torch.equal(wte(ids), F.embedding(ids, weight))


def test_an_embedding_left_in_the_files_mapping_is_copied_out_where_the_lm_head_keeps_no_panels():
    weight = torch.randn(48, 8)
    wte = embedding(weight)
    wte.in_file = True
    wte.share(None, wte.plain())
    assert not wte.in_file and wte.weight.data_ptr() != weight.data_ptr() and torch.equal(wte.weight, weight)
    owned = wte.weight
    wte.share(None, wte.plain())
    assert wte.weight is owned, "its own already: not copied again"
