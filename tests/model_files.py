"""Small checkpoints written in each of Hugging Face's published layouts, for the tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from starcoder_tp.testing.build_models import hf_config, random_weights, save_index_sharded

NEW_TOKENS = 64  # per prompt in the parity tests


def write_small_model(out: Path, *, multi_query: bool, vocab_size: int = 1001, seed: int = 7,
                      layout: str = "safetensors") -> Path:
    """A small random GPTBigCode checkpoint (no tokenizer) in one of HF's published layouts."""
    out.mkdir(parents=True, exist_ok=True)
    raw = hf_config(vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                    multi_query=multi_query)
    (out / "config.json").write_text(json.dumps(raw))
    weights = random_weights(raw, seed)
    write_weights(out, weights, layout)
    return out


def write_weights(out: Path, weights: dict[str, torch.Tensor], layout: str) -> None:
    if layout == "safetensors":
        save_file(weights, str(out / "model.safetensors"))
    elif layout == "index":
        save_index_sharded(weights, out, max_file_bytes=2 << 20)
    elif layout == "bin":
        torch.save(weights, out / "pytorch_model.bin")
    else:
        raise AssertionError(layout)


def copy_in_layout(src: Path, out: Path, layout: str) -> Path:
    """The embedded model re-saved as index-sharded safetensors or as a .bin."""
    from safetensors.torch import load_file

    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    write_weights(out, load_file(str(src / "model.safetensors")), layout)
    return out
