"""The GPTBigCode (StarCoder) configuration, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "relu")


@dataclass(frozen=True)
class ModelConfig:
    """The sizes of a GPTBigCode model; everything the runtime needs from `config.json`."""

    vocab_size: int
    n_positions: int  # learned absolute positions: the longest sequence the model can hold
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    multi_query: bool
    layer_norm_epsilon: float
    activation_function: str
    scale_attn_weights: bool
    tie_word_embeddings: bool
    eos_token_id: int | None
    bos_token_id: int | None

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"expected one of {SUPPORTED_ACTIVATIONS}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        """Key/value heads: ONE for multi-query attention (StarCoder), n_head otherwise."""
        return 1 if self.multi_query else self.n_head

    @property
    def shape_id(self) -> str:
        """The dimensions that set the latency, as one token (recorded with every result, so a
        baseline of one model never gates another): layers, width, heads, K/V heads, MLP, vocab."""
        return (f"L{self.n_layer}-E{self.n_embd}-H{self.n_head}-KV{self.n_kv_head}-I{self.n_inner}"
                f"-V{self.vocab_size}")

    def padded_vocab_size(self, world_size: int) -> int:
        """The vocabulary rounded up so that every rank holds the same number of rows."""
        return -(-self.vocab_size // world_size) * world_size

    def check_world_size(self, world_size: int) -> None:
        """Raise a ValueError naming the size that the world size does not divide."""
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if self.n_head % world_size:
            raise ValueError(
                f"world size {world_size} does not divide the number of attention heads "
                f"n_head={self.n_head}; pick a divisor of {self.n_head}"
            )
        if self.n_inner % world_size:
            raise ValueError(
                f"world size {world_size} does not divide the MLP inner size n_inner={self.n_inner}"
            )

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type != "gpt_bigcode":
            raise ValueError(
                f"{source}: model_type is {model_type!r}, but starcoder_tp runs only 'gpt_bigcode' "
                "(StarCoder) checkpoints"
            )
        try:
            n_embd = int(raw["n_embd"])
            n_inner = raw.get("n_inner")
            return cls(
                vocab_size=int(raw["vocab_size"]),
                n_positions=int(raw["n_positions"]),
                n_embd=n_embd,
                n_layer=int(raw["n_layer"]),
                n_head=int(raw["n_head"]),
                n_inner=int(n_inner) if n_inner is not None else 4 * n_embd,
                multi_query=bool(raw.get("multi_query", True)),
                layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
                activation_function=str(raw.get("activation_function", "gelu_pytorch_tanh")),
                scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                eos_token_id=_first_id(raw.get("eos_token_id")),
                bos_token_id=_first_id(raw.get("bos_token_id")),
            )
        except KeyError as missing:
            raise ValueError(f"{source}: required key {missing} is missing") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        return cls.from_hf_dict(read_config_json(model_dir), source=str(Path(model_dir) / "config.json"))


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a Hugging Face checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
