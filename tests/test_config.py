import json

import pytest

from starcoder_tp.testing.build_models import hf_config
from starcoder_tp.config import ModelConfig


def small(**overrides):
    raw = hf_config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128)
    raw.update(overrides)
    return raw


def test_sizes_derived_from_hf_config():
    config = ModelConfig.from_hf_dict(small())
    assert (config.head_dim, config.n_kv_head) == (16, 1)
    assert ModelConfig.from_hf_dict(small(multi_query=False)).n_kv_head == 4
    assert ModelConfig.from_hf_dict(small(n_inner=None)).n_inner == 256
    # The dimensions a latency baseline is tied to (MQA: one K/V head; MHA: as many as heads).
    assert config.shape_id == "L2-E64-H4-KV1-I128-V100"
    assert ModelConfig.from_hf_dict(small(multi_query=False)).shape_id == "L2-E64-H4-KV4-I128-V100"


@pytest.mark.parametrize("vocab,world,padded", [(100, 1, 100), (100, 3, 102), (1001, 4, 1004), (49152, 8, 49152)])
def test_vocabulary_padded_to_a_multiple_of_the_world_size(vocab, world, padded):
    assert ModelConfig.from_hf_dict(small(vocab_size=vocab)).padded_vocab_size(world) == padded


def test_world_size_must_divide_heads_and_inner_size():
    config = ModelConfig.from_hf_dict(small())
    for ok in (1, 2, 4):
        config.check_world_size(ok)
    with pytest.raises(ValueError, match=r"world size 3 does not divide the number of attention heads n_head=4"):
        config.check_world_size(3)
    with pytest.raises(ValueError, match="world size must be >= 1, got 0"):
        config.check_world_size(0)
    with pytest.raises(ValueError, match="n_inner=130"):
        ModelConfig.from_hf_dict(small(n_inner=130)).check_world_size(4)


def test_other_architectures_and_broken_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        ModelConfig.from_hf_dict(small(model_type="llama"))
    raw = small()
    del raw["n_head"]
    with pytest.raises(ValueError, match="'n_head' is missing"):
        ModelConfig.from_hf_dict(raw)
    with pytest.raises(ValueError, match="activation_function='swish'"):
        ModelConfig.from_hf_dict(small(activation_function="swish"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(small()))
    assert ModelConfig.from_dir(tmp_path).n_layer == 2
