"""StarCoder2 (grouped-query attention, RoPE, sliding window) through the same runtime: greedy
tokens against transformers' Starcoder2ForCausalLM on checkpoints that transformers itself
writes, at world sizes 1, 2 and 4, and mutations that the comparison must catch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from starcoder_tp import shard as shard_mod
from starcoder_tp.checkpoint import CheckpointReader, expected_shapes
from starcoder_tp.comm import TPGroup
from starcoder_tp.config import ModelConfig
from starcoder_tp.device import Device
from starcoder_tp.model import load_model
from starcoder_tp.shard import load_part, merge_rank_tensors, shard_checkpoint
from starcoder_tp.testing.build_models import random_weights
from starcoder_tp.testing.compare import check_outputs_equal, check_topk_close
from starcoder_tp.testing.runners import GreedyOutput, HFRunner, TPRunner
from starcoder_tp.timing import timed_generate

NEW_TOKENS = 48
# Ragged, and the longest prompt alone is longer than the window of the "replicated" model.
PROMPTS = [[5, 17, 900, 3], [44] * 9, list(range(1000, 970, -1))]

# name: (query heads, K/V heads, sliding window, tied lm_head, vocabulary, layout)
MODELS = {
    # K/V heads split at world sizes 2 and 4; a vocabulary every world size divides.
    "gqa": (8, 4, None, True, 1024, "safetensors"),
    # 2 K/V heads: split at 2, replicated at 4; a window shorter than prompt + output; untied;
    # a vocabulary no world size divides; index-sharded safetensors.
    "replicated": (8, 2, 24, False, 1001, "index"),
}


def write_starcoder2(out: Path, heads: int, kv_heads: int, window: int | None, tied: bool, vocab: int,
                     layout: str, seed: int = 13, use_bias: bool = True) -> Path:
    """A small Starcoder2ForCausalLM written by transformers' save_pretrained, with the weights
    of build_models.random_weights (varied greedy outputs, unlike the HF initialisation)."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    config = Starcoder2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=256, sliding_window=window,
        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        bos_token_id=0, eos_token_id=0, use_bias=use_bias,
    )
    model = Starcoder2ForCausalLM(config)
    missing, unexpected = model.load_state_dict(random_weights(config.to_dict(), seed), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    if tied:
        model.tie_weights()
    model.save_pretrained(str(out), max_shard_size="100KB" if layout == "index" else "1GB")
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("starcoder2")
    return {name: write_starcoder2(root / name, *spec) for name, spec in MODELS.items()}


@pytest.fixture(scope="module")
def references(models) -> dict[str, GreedyOutput]:
    return {name: HFRunner(path).generate_greedy(PROMPTS, NEW_TOKENS) for name, path in models.items()}


@pytest.fixture(scope="module")
def runners(models, tmp_path_factory):
    made: dict[tuple, TPRunner] = {}

    def get(name: str, world_size: int, dtype: str = "float32") -> TPRunner:
        if (name, world_size, dtype) not in made:
            out = tmp_path_factory.mktemp(f"{name}-ws{world_size}-{dtype}") / "s"
            shard_checkpoint(models[name], out, world_size, dtype)
            made[name, world_size, dtype] = TPRunner(out, world_size)
        return made[name, world_size, dtype]

    yield get
    for runner in made.values():
        runner.close()


def test_written_checkpoints_have_what_the_cases_need(models):
    gqa, rep = (ModelConfig.from_dir(models[name]) for name in ("gqa", "replicated"))
    assert (gqa.model_type, gqa.n_kv_head, gqa.sliding_window, gqa.rope_theta) == ("starcoder2", 4, None, 1e5)
    assert rep.kv_layout(2) == (1, 1) and rep.kv_layout(4) == (1, 2)  # split, then replicated
    assert not rep.tie_word_embeddings and rep.vocab_size % 2 and rep.sliding_window < len(PROMPTS[2])
    assert CheckpointReader(models["replicated"]).format == "safetensors"
    assert len(list(models["replicated"].glob("model-*.safetensors"))) > 1
    assert gqa.shape_id == "SC2-L2-E64-H8-KV4-I128-V1024-W0" and rep.shape_id.endswith("-W24")


def test_outputs_are_not_degenerate(references):
    for name, out in references.items():
        for row in out.output_ids:
            assert len(set(row)) >= 12, (name, row)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_tokens_identical_to_transformers(runners, references, name, world_size):
    out = runners(name, world_size).generate_greedy(PROMPTS, NEW_TOKENS)
    check_outputs_equal(outputs_0=references[name], outputs_1=out, name_0="transformers",
                        name_1=f"tp{world_size}-{name}", prompts=PROMPTS)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_single_prompts_identical_to_transformers(runners, references, models, name, world_size):
    """Each prompt alone (no padding: the unmasked fast paths, and a window crossed from the
    prefill on) gives transformers' tokens for that prompt alone."""
    hf = HFRunner(models[name])
    for prompt in (PROMPTS[0], PROMPTS[2]):
        reference = hf.generate_greedy([prompt], NEW_TOKENS)
        out = runners(name, world_size).generate_greedy([prompt], NEW_TOKENS)
        check_outputs_equal(outputs_0=reference, outputs_1=out, name_0="transformers",
                            name_1=f"tp{world_size}-{name}-alone", prompts=[prompt])


def test_bf16_follows_the_top5_rule(runners, models):
    reference = HFRunner(models["replicated"], dtype="bfloat16").generate_greedy(PROMPTS, NEW_TOKENS, topk=5)
    out = runners("replicated", 4, "bfloat16").generate_greedy(PROMPTS, NEW_TOKENS, topk=5)
    firsts = check_topk_close(outputs_0=reference, outputs_1=out, name_0="transformers-bf16", name_1="tp4-bf16")
    print("first difference per prompt (bf16):", firsts)


@pytest.fixture(scope="module")
def one_rank(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("replicated-ws1-inproc") / "s"
    shard_checkpoint(models["replicated"], out, 1)
    return load_model(out, TPGroup(0, 1), torch.device("cpu"), kernels="plain")


def generate_with_step(model, step) -> GreedyOutput:
    """The decode steps through `step` (what generate calls `compiled_decode`), then back to eager."""
    model.compiled_decode = step
    try:
        return GreedyOutput(timed_generate(model, Device("cpu"), PROMPTS, NEW_TOKENS).output_ids.tolist())
    finally:
        model.compiled_decode = None


def test_fixed_shape_step_identical_to_transformers(one_rank, references):
    """The decode step that torch.compile and CUDA graphs take (attention over the whole cache,
    the mask hiding the slots not written yet, the window on top), run eagerly."""
    out = generate_with_step(one_rank, one_rank.forward)
    check_outputs_equal(outputs_0=references["replicated"], outputs_1=out, name_0="transformers",
                        name_1="fixed-shape-step", prompts=PROMPTS)


def test_compiled_decode_identical_to_transformers(one_rank, references):
    """The fixed-shape step through torch.compile (inductor): RoPE and the window inside the graph."""
    one_rank.compile_decode()
    out = generate_with_step(one_rank, one_rank.compiled_decode)
    check_outputs_equal(outputs_0=references["replicated"], outputs_1=out, name_0="transformers",
                        name_1="compiled-step", prompts=PROMPTS)


def test_no_bias_config_identical_to_transformers(tmp_path):
    """use_bias: false (no bias on any linear), at world size 2."""
    src = write_starcoder2(tmp_path / "m", 8, 2, None, True, 1024, "safetensors", use_bias=False)
    assert not ModelConfig.from_dir(src).use_bias
    reference = HFRunner(src).generate_greedy(PROMPTS, NEW_TOKENS)
    shard_checkpoint(src, tmp_path / "s", 2)
    runner = TPRunner(tmp_path / "s", 2)
    try:
        out = runner.generate_greedy(PROMPTS, NEW_TOKENS)
    finally:
        runner.close()
    check_outputs_equal(outputs_0=reference, outputs_1=out, name_0="transformers", name_1="tp2-no-bias", prompts=PROMPTS)


def test_dropping_the_window_is_caught(one_rank, references):
    one_rank.window = None
    try:
        out = timed_generate(one_rank, Device("cpu"), PROMPTS, NEW_TOKENS).output_ids.tolist()
    finally:
        one_rank.window = one_rank.config.sliding_window
    with pytest.raises(AssertionError, match="outputs differ"):
        check_outputs_equal(outputs_0=references["replicated"], outputs_1=GreedyOutput(out), name_0="transformers",
                            name_1="no-window")


def test_splitting_replicated_kv_heads_is_caught(models, references, tmp_path, monkeypatch):
    """At world size 4 each of the 2 K/V heads is held whole by 2 ranks; give each of those
    ranks only its half of the head's rows instead (zeros elsewhere): the tokens must change."""
    correct = shard_mod.rank_tensor

    def split(reader, name, rank, world_size, dtype):
        tensor = correct(reader, name, rank, world_size, dtype)
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            _, replicas = reader.config.kv_layout(world_size)
            share = tensor.shape[0] // replicas
            keep = tensor[rank % replicas * share:(rank % replicas + 1) * share].clone()
            tensor.zero_()
            tensor[rank % replicas * share:(rank % replicas + 1) * share] = keep
        return tensor

    monkeypatch.setattr(shard_mod, "rank_tensor", split)
    shard_checkpoint(models["replicated"], tmp_path / "s", 4)
    runner = TPRunner(tmp_path / "s", 4)
    try:
        out = runner.generate_greedy(PROMPTS, NEW_TOKENS)
    finally:
        runner.close()
    with pytest.raises(AssertionError, match="outputs differ"):
        check_outputs_equal(outputs_0=references["replicated"], outputs_1=out, name_0="transformers",
                            name_1="kv-split")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shards_put_back_together_equal_the_original(models, tmp_path, world_size):
    reader = CheckpointReader(models["replicated"])
    shard_checkpoint(models["replicated"], tmp_path / "s", world_size)
    parts = [load_part(tmp_path / "s", rank, world_size)[1] for rank in range(world_size)]
    for name in expected_shapes(reader.config):
        merged = merge_rank_tensors(name, [p[name] for p in parts], reader.config)
        assert torch.equal(merged, reader.read(name)), name
    k_rows = [p["model.layers.0.self_attn.k_proj.weight"] for p in parts]
    assert [k.shape[0] for k in k_rows] == [{1: 2, 2: 1, 4: 1}[world_size] * reader.config.head_dim] * world_size


def test_a_world_size_that_fits_no_kv_rule_is_refused_naming_the_sizes():
    raw = {"model_type": "starcoder2", "vocab_size": 100, "hidden_size": 96, "num_hidden_layers": 1,
           "num_attention_heads": 12, "num_key_value_heads": 3, "intermediate_size": 96}
    config = ModelConfig.from_hf_dict(raw)
    with pytest.raises(ValueError, match=r"world size 2 neither divides the 3 key/value heads .* "
                                         r"world sizes that work: \[1, 3, 6, 12\]"):
        config.check_world_size(2)
    with pytest.raises(ValueError, match="rope_type='linear' is not supported"):
        ModelConfig.from_hf_dict({**raw, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="num_key_value_heads=5 does not divide n_head=12"):
        ModelConfig.from_hf_dict({**raw, "num_key_value_heads": 5})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_linear_reads_back_the_weight_it_was_loaded_with(models, tmp_path, name):
    """Linear.plain_source, for layouts that cannot be unpacked (MKL's): q/k/v concatenated as at
    load, each rank its own part."""
    shard_checkpoint(models[name], tmp_path / "s", 2)
    for rank in range(2):
        model = load_model(tmp_path / "s", TPGroup(rank, 2), torch.device("cpu"), kernels="plain")
        linears = {n: m for n, m in model.named_modules() if hasattr(m, "plain_source")}
        assert len(linears) == 4 * model.config.n_layer + (not model.config.tie_word_embeddings)
        for module_name, module in linears.items():
            assert torch.equal(module.plain_source(), module.weight), (rank, module_name)
