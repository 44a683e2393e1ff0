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


@pytest.fixture(params=["panel_rows.c", "torch"])
def gathered_by(request, monkeypatch):
    """panels.rows by the library's panel_rows.c (where it builds here), or by torch's indexing (without it)."""
    if request.param == "torch":
        monkeypatch.setattr(panels.rowdot, "library", lambda: (None, "off for this test"))
    elif panels.rowdot.library()[0] is None:
        pytest.skip(f"the kernels' library is not built: {panels.rowdot.library()[1]}")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_weights_rows_are_the_plain_weights_rows_exactly(dtype, gathered_by):
    weight = torch.randn(64, 10).to(dtype)
    packed = as_panels(weight)
    assert torch.equal(panels.unpack(packed), weight), "the premise: the layout as panels.py packs it"
    index = torch.tensor([[0, 17, 63], [15, 16, 40]])
    assert torch.equal(panels.rows(packed, index), weight[index])
    assert panels.rows(packed, index).shape == (2, 3, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shards_rows_are_its_ids_rows_and_zeros_for_the_other_shards_ids(dtype, gathered_by):
    weight = torch.randn(32, 6).to(dtype)  # ids [64, 96) of a vocabulary in shards of 32
    packed = as_panels(weight)
    index = torch.tensor([[63, 64, 95], [96, 0, 80]])
    expected = torch.zeros(2, 3, 6, dtype=dtype)
    expected[0, 1], expected[0, 2], expected[1, 2] = weight[0], weight[31], weight[16]
    got = panels.rows(packed, index, first=64)
    outside = torch.tensor([[True, False, False], [True, True, False]])
    assert torch.equal(got, expected) and not got[outside].signbit().any(), (got, expected)  # (+0: masked_fill's)
    wte = embedding(weight.clone())
    assert torch.equal(wte.shard_rows(index, 64), expected), "the plain weight's shard alike"
    wte.share(as_panels(wte.held_plain()))
    assert torch.equal(wte.shard_rows(index, 64), expected), "and the lm_head's panels'"


def embedding(weight: torch.Tensor) -> Embedding:
    module = Embedding(*weight.shape)
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    return module


def test_an_embedding_reads_its_rows_from_the_lm_heads_panels_and_holds_no_plain_weight_then():
    weight, ids = torch.randn(48, 8), torch.tensor([[3, 47, 16]])
    wte = embedding(weight.clone())
    key = wte.shape_key()
    assert key == "48x8:float32" and torch.equal(wte(ids), F.embedding(ids, weight))
    packed = as_panels(wte.held_plain())
    wte.share(packed)
    assert wte.panels is packed and wte.weight.numel() == 0, "one copy of the weight: the lm_head's"
    assert torch.equal(wte(ids), F.embedding(ids, weight)) and wte.shape_key() == key
    assert torch.equal(wte.plain(), weight) and wte.panels is packed, "unpacked for a plan's measurement"
    plain = wte.held_plain()  # the lm_head laid out otherwise: the embedding holds the plain weight again
    assert wte.panels is None and wte.weight is plain and torch.equal(plain, weight), "the old panels let go"
    wte.share(None)
    assert wte.weight is plain and torch.equal(wte(ids), F.embedding(ids, weight))


def test_an_embedding_left_in_the_files_mapping_is_copied_out_where_the_lm_head_keeps_no_panels():
    weight = torch.randn(48, 8)
    wte = embedding(weight)
    wte.in_file = True
    wte.share(None)
    assert not wte.in_file and wte.weight.data_ptr() != weight.data_ptr() and torch.equal(wte.weight, weight)
    owned = wte.weight
    wte.share(None)
    assert wte.weight is owned, "its own already: not copied again"


@pytest.mark.skipif(not panels.supports(torch.ones(16, 16)), reason="panels need AVX2 and the built library")
def test_a_model_whose_lm_head_leaves_panels_at_another_batch_size_embeds_from_its_own_weight_again(
        tmp_path, embedded_dir, prompts):
    from starcoder_tp.comm import TPGroup
    from starcoder_tp.device import Device
    from starcoder_tp.model import load_model
    from starcoder_tp.shard import shard_checkpoint
    from starcoder_tp.timing import timed_generate

    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="panels")
    wte = model.transformer.wte
    first = timed_generate(model, Device("cpu"), prompts[:1], 4)
    assert wte.panels is model.lm_head_packed is not None and wte.weight.numel() == 0
    model.use_kernels("gemv", 1)  # the lm_head's plain weight, read by the kernel too
    assert wte.panels is None and model.lm_head_packed is None and model.lm_head_kernel == "gemv"
    assert wte.weight.shape == (model.local_vocab, model.config.n_embd)
    again = timed_generate(model, Device("cpu"), prompts[:1], 4)
    reference = timed_generate(plain, Device("cpu"), prompts[:1], 4)
    assert torch.equal(first.output_ids, reference.output_ids) and torch.equal(again.output_ids, reference.output_ids)
