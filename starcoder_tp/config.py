"""The model configuration, read from a Hugging Face `config.json`: GPTBigCode (StarCoder) or
StarCoder2, under GPTBigCode's names (StarCoder2's `hidden_size` is `n_embd` here, and so on)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "relu")
MODEL_TYPES = ("gpt_bigcode", "starcoder2")


@dataclass(frozen=True)
class ModelConfig:
    """The sizes of a model; everything the runtime needs from `config.json`."""

    vocab_size: int
    n_positions: int  # the longest sequence the model can hold (learned positions, or the RoPE context)
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
    model_type: str = "gpt_bigcode"
    num_key_value_heads: int | None = None  # StarCoder2's GQA; GPTBigCode's follow from multi_query
    rope_theta: float | None = None  # rotary positions (StarCoder2) instead of learned ones
    sliding_window: int | None = None  # a query sees itself and the window - 1 slots before it
    use_bias: bool = True

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"num_key_value_heads={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 (or null for none)")
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
        """Key/value heads: ONE for multi-query attention (StarCoder), n_head for GPTBigCode's
        multi-head variant, num_key_value_heads for StarCoder2's grouped-query attention."""
        if self.num_key_value_heads is not None:
            return self.num_key_value_heads
        return 1 if self.multi_query else self.n_head

    def kv_layout(self, world_size: int) -> tuple[int, int]:
        """(K/V heads per rank, ranks holding each K/V head). The heads are split when the world
        size divides their number, and replicated when it is a multiple of it (then each rank
        holds the one K/V head its query heads use; MQA is the case of one head)."""
        kv = self.n_kv_head
        if kv % world_size == 0:
            return kv // world_size, 1
        if world_size % kv == 0:
            return 1, world_size // kv
        raise ValueError(
            f"world size {world_size} neither divides the {kv} key/value heads nor is a multiple of them "
            f"(n_head={self.n_head}); world sizes that work: {self.valid_world_sizes()}"
        )

    def valid_world_sizes(self, limit: int = 64) -> list[int]:
        kv = self.n_kv_head
        return [w for w in range(1, min(limit, self.n_head) + 1)
                if not self.n_head % w and not self.n_inner % w and (not kv % w or not w % kv)]

    @property
    def shape_id(self) -> str:
        """The dimensions that set the latency, as one token (recorded with every result, so a
        baseline of one model never gates another): layers, width, heads, K/V heads, MLP, vocab;
        StarCoder2's start with its family and end with its window."""
        dims = (f"L{self.n_layer}-E{self.n_embd}-H{self.n_head}-KV{self.n_kv_head}-I{self.n_inner}"
                f"-V{self.vocab_size}")
        if self.model_type == "gpt_bigcode":
            return dims
        return f"SC2-{dims}-W{self.sliding_window or 0}"

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
                f"n_head={self.n_head}; world sizes that work: {self.valid_world_sizes()}"
            )
        if self.n_inner % world_size:
            raise ValueError(
                f"world size {world_size} does not divide the MLP inner size n_inner={self.n_inner}; "
                f"world sizes that work: {self.valid_world_sizes()}"
            )
        self.kv_layout(world_size)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type is {model_type!r}, but starcoder_tp runs only 'gpt_bigcode' "
                "(StarCoder) and 'starcoder2' checkpoints"
            )
        if model_type == "starcoder2":
            return _starcoder2_config(raw, source)
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


def _starcoder2_config(raw: dict[str, Any], source: str) -> ModelConfig:
    """StarCoder2's keys under GPTBigCode's names (transformers' Starcoder2Config defaults)."""
    rope = raw.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: rope_parameters.rope_type={rope_type!r} is not supported; only 'default'")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    try:
        n_embd = int(raw["hidden_size"])
        n_head = int(raw["num_attention_heads"])
        if int(raw.get("head_dim") or n_embd // n_head) != n_embd // n_head:
            raise ValueError(f"{source}: head_dim={raw['head_dim']} differs from hidden_size / num_attention_heads")
        window = raw.get("sliding_window")
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            n_positions=int(raw.get("max_position_embeddings", 4096)),
            n_embd=n_embd,
            n_layer=int(raw["num_hidden_layers"]),
            n_head=n_head,
            n_inner=int(raw["intermediate_size"]),
            multi_query=False,
            layer_norm_epsilon=float(raw.get("norm_epsilon", 1e-5)),
            activation_function=str(raw.get("hidden_act", "gelu_pytorch_tanh")),
            scale_attn_weights=True,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            eos_token_id=_first_id(raw.get("eos_token_id")),
            bos_token_id=_first_id(raw.get("bos_token_id")),
            model_type="starcoder2",
            num_key_value_heads=int(raw.get("num_key_value_heads", n_head)),
            rope_theta=float(theta),
            sliding_window=None if window is None else int(window),
            use_bias=bool(raw.get("use_bias", True)),
        )
    except KeyError as missing:
        raise ValueError(f"{source}: required key {missing} is missing") from None


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
