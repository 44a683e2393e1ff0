"""plan_weights: the model's weights by shape for the kernel plan, read back only where asked for."""
from __future__ import annotations

import pytest
import torch

from starcoder_tp import forms, kernels, plan_weights
from starcoder_tp.comm import TPGroup
from starcoder_tp.embedding import Embedding
from starcoder_tp.linear import Linear
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint


@pytest.fixture
def plain_model(tmp_path, embedded_dir):
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    return load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")


def test_plain_weights_reads_a_weight_once_and_only_when_asked():
    reads = []
    weights = plan_weights.PlainWeights({"2x2:float32": lambda: reads.append("a") or torch.ones(2, 2),
                                         "3x2:float32": lambda: reads.append("b") or torch.zeros(3, 2)})
    assert sorted(weights) == ["2x2:float32", "3x2:float32"] and len(weights) == 2 and "3x2:float32" in weights
    assert reads == [] and weights.read() == 0
    assert torch.equal(weights["3x2:float32"], torch.zeros(3, 2))
    assert weights["3x2:float32"] is weights["3x2:float32"] and reads == ["b"] and weights.read() == 1
    with pytest.raises(KeyError):
        weights["9x9:float32"]


def test_by_shape_names_the_prefill_and_activated_shapes_and_the_steps_bytes(plain_model):
    model = plain_model
    tied = model.transformer.wte if model.config.tie_word_embeddings else None
    weights, prefill, activated, step_bytes = plan_weights.by_shape(model, model.config.activation_function, tied)
    c_fc = model.transformer.h[0].mlp.c_fc.shape_key()
    assert activated == {c_fc: model.config.activation_function}
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert step_bytes == 4 * (sum(m.weight.numel() for m in linears) + (tied.weight.numel() if tied else 0)), \
        "what a decode step reads, fp32"
    assert set(weights) == {m.shape_key() for m in linears} | ({tied.shape_key()} if tied else set())
    assert prefill == {m.shape_key() for name, m in model.named_modules() if isinstance(m, Linear)
                       and name != "lm_head"}
    assert weights.read() == 0


@pytest.mark.parametrize("mode", ["onednn", "panels"])
def test_by_shape_reads_packed_weights_back_as_they_were(plain_model, mode):
    """Under oneDNN's layouts (to_dense), and under panels, where the tied embedding's plain weight is
    dropped and it is read from the lm_head's panels: the same weights, the same step bytes."""
    model = plain_model
    tied = model.transformer.wte if model.config.tie_word_embeddings else None
    *_, plain_step_bytes = plan_weights.by_shape(model, model.config.activation_function, tied)
    plain = {}  # the first weight of each shape, as by_shape reads
    for m in model.modules():
        if isinstance(m, Linear):
            plain.setdefault(m.shape_key(), m.weight.detach().clone())
    if tied is not None:
        plain.setdefault(tied.shape_key(), tied.weight.detach().clone())
    if model.use_kernels(mode, 1) == 0:
        pytest.skip(f"{mode} packs none of these weights on this machine")
    if mode == "panels" and tied is not None:
        assert tied.panels is not None and tied.weight.numel() == 0, "the embedding reads the lm_head's panels"
    weights, _, _, step_bytes = plan_weights.by_shape(model, model.config.activation_function, tied)
    assert step_bytes == plain_step_bytes
    for key, weight in plain.items():
        assert torch.equal(weights[key], weight), key


def test_forms_and_the_plans_key_read_no_weight(plain_model, tmp_path, monkeypatch):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))  # (a plan measured without prefills)
    model = plain_model
    attention = model.transformer.h[0].attn
    weights, _, activated, step_bytes = plan_weights.by_shape(model, model.config.activation_function,
                                                              model.transformer.wte)
    forms.calibrate_forms(weights, activated, model.tp, attention)
    assert kernels.cached_or_measured(weights, 1, model.tp, set(), activated, step_bytes=step_bytes)[1] == "measured"
    assert weights.read() == len(weights), "a measurement reads every weight"
    again, _, activated, step_bytes = plan_weights.by_shape(model, model.config.activation_function,
                                                            model.transformer.wte)
    forms.calibrate_forms(again, activated, model.tp, attention)
    assert kernels.cached_or_measured(again, 1, model.tp, set(), activated, step_bytes=step_bytes)[1] == "cached"
    assert again.read() == 0, "a cached plan and the forms need the shapes alone"


def test_a_new_batch_size_with_a_cached_plan_reads_weights_only_to_lay_them_out(plain_model, tmp_path, monkeypatch):
    """Outside the lay-out, the weights are read back (as they were at every new batch size before
    plan_weights) only where a plan is measured."""
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))
    model = plain_model
    model.use_kernels("auto", 1)
    model.use_kernels("auto", 4)  # both plans measured and cached
    outside, laying_out = [], []

    def spied(real):
        def read(self):
            if not laying_out:
                outside.append(self)
            return real(self)
        return read
    for cls, name in ((Linear, "plain_weight"), (Embedding, "plain")):
        monkeypatch.setattr(cls, name, spied(getattr(cls, name)))
    real_lay_out = model.lay_out

    def lay_out(*args):
        laying_out.append(True)
        try:
            return real_lay_out(*args)
        finally:
            laying_out.pop()
    monkeypatch.setattr(model, "lay_out", lay_out)
    model.use_kernels("auto", 1)
    assert model.kernel_plan_source == "cached" and outside == []
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "another cache"))
    model.use_kernels("auto", 4)
    assert model.kernel_plan_source == "measured" and outside, "a measurement reads the weights"
