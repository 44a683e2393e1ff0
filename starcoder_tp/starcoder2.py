"""What StarCoder2 adds to the GPTBigCode runtime: rotary positions (neox style, over the whole
head dimension, as transformers' `modeling_starcoder2.py`), and its Hugging Face weight names
mapped onto the runtime's modules, with q/k/v fused into one projection per layer.

The parts on disk keep Hugging Face's names (`shard.py`); the fusing happens at load, so a
rank's q/k/v are one GEMM, as GPTBigCode's `c_attn` is.
"""
from __future__ import annotations

import re

import torch

from .config import ModelConfig

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_RENAMES = {
    "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
    "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj",
}


def runtime_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A StarCoder2 part's tensors under the runtime's names; q/k/v concatenated by rows as
    [q | k | v] into `attn.c_attn` (then freed one layer at a time)."""
    out: dict[str, torch.Tensor] = {}
    for name in list(state):
        if name == "model.embed_tokens.weight":
            out["transformer.wte.weight"] = state.pop(name)
        elif name.startswith("model.norm."):
            out["transformer.ln_f." + name.rsplit(".", 1)[1]] = state.pop(name)
        elif name == "lm_head.weight":
            out[name] = state.pop(name)
        elif match := _LAYER.fullmatch(name):
            layer, rest = match.groups()
            module, kind = rest.rsplit(".", 1)
            prefix = f"transformer.h.{layer}."
            if module == "self_attn.q_proj":
                qkv = [state.pop(f"model.layers.{layer}.self_attn.{p}_proj.{kind}") for p in "qkv"]
                out[prefix + "attn.c_attn." + kind] = torch.cat(qkv, dim=0)
            elif module in _RENAMES:
                out[prefix + _RENAMES[module] + "." + kind] = state.pop(name)
    if state:
        raise ValueError(f"StarCoder2 part: tensors with no place in the model: {sorted(state)[:5]}")
    return out


def part_names(runtime_name: str) -> list[str]:
    """The part's tensors a runtime tensor is made of, in runtime_state's order (its inverse)."""
    if runtime_name == "transformer.wte.weight":
        return ["model.embed_tokens.weight"]
    if runtime_name.startswith("transformer.ln_f."):
        return ["model.norm." + runtime_name.rsplit(".", 1)[1]]
    if runtime_name == "lm_head.weight":
        return [runtime_name]
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(\w+)", runtime_name)
    if match:
        layer, module, kind = match.groups()
        if module == "attn.c_attn":
            return [f"model.layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkv"]
        for hf_module, module_ in _RENAMES.items():
            if module_ == module:
                return [f"model.layers.{layer}.{hf_module}.{kind}"]
    raise ValueError(f"StarCoder2: no part tensor makes the runtime tensor {runtime_name!r}")


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[D / 2] fp32, computed as transformers computes them (on the CPU, in fp32), so that the
    angles are the reference's to the bit."""
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))


def rotary_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [B, T, 1, D] in the model's dtype, for position_ids [B, T]."""
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, D / 2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, T, 1, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RotaryCache:
    """cos and sin at every slot of a cache, made with it (TPCausalLM._allocate_cache, untimed): a step's tables
    are then two lookups where rotary_tables' ops were eight, each paying, between the decode step's weight
    streams, for the caches those had just swept. The same bits as rotary_tables at each position: its ops
    are elementwise (tests/test_rotary.py checks)."""

    def __init__(self, length: int, inv_freq: torch.Tensor, dtype: torch.dtype) -> None:
        cos, sin = rotary_tables(torch.arange(length, device=inv_freq.device)[None], inv_freq, dtype)
        self.cos, self.sin = cos[0], sin[0]  # [L, 1, D]

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rotary_tables(position_ids, ...) for position_ids [B, T], each below the cache's length."""
        return self.cos[position_ids], self.sin[position_ids]  # [B, T, 1, D]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; each half of the head dimension rotated against the other (neox)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
