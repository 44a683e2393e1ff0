"""Fixtures for the runtime's own tests: small checkpoints in every published layout, shard
sets, persistent worker groups and the transformers reference, each built once per session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from starcoder_tp.build_models import EMBEDDED_MODEL_DIR, hf_config, random_weights, save_index_sharded
from starcoder_tp.runners import HFRunner, TPRunner
from starcoder_tp.shard import shard_checkpoint

# Ragged on purpose: the runtime must left-pad them and place positions right.
PROMPTS_TEXT = [
    "def fib(n):",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "x",
    "def sort_numbers(numbers: list[int]) -> list[int]:\n    \"\"\"Return the numbers sorted.\"\"\"\n",
]
NEW_TOKENS = 64


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the shard cache of the tests out of the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STARCODER_TP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    return EMBEDDED_MODEL_DIR


@pytest.fixture(scope="session")
def prompts(embedded_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_dir))
    return [tokenizer(text).input_ids for text in PROMPTS_TEXT]


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


@pytest.fixture(scope="session")
def hf_reference(embedded_dir, prompts):
    return HFRunner(embedded_dir).generate_greedy(prompts, NEW_TOKENS)


@pytest.fixture(scope="session")
def tp_runners(tmp_path_factory, embedded_dir):
    """One persistent worker group per world size over the embedded model, made on demand."""
    runners: dict[tuple, TPRunner] = {}

    def get(world_size: int, dtype: str = "float32", model_dir: Path | None = None, comm: str = "auto") -> TPRunner:
        key = (world_size, dtype, str(model_dir or embedded_dir), comm)
        if key not in runners:
            out = tmp_path_factory.mktemp(f"shards-ws{world_size}-{dtype}")
            shard_checkpoint(model_dir or embedded_dir, out / "s", world_size, dtype)
            runners[key] = TPRunner(out / "s", world_size, comm=comm)
        return runners[key]

    yield get
    for runner in runners.values():
        runner.close()
