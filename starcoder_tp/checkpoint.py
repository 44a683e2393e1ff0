"""Reading Hugging Face GPTBigCode and StarCoder2 checkpoints lazily, one tensor (or one slice) at a time.

Cutting the 15.5B StarCoder must not need its 31+ GB in memory: safetensors files are read
through `safe_open(...).get_slice`, which copies only the requested rows; `.bin` files are
memory-mapped (`torch.load(mmap=True, weights_only=True)`, which also never unpickles code).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, read_config_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Non-persistent buffers that some exporters still wrote; they carry no weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model (GPTBigCodeForCausalLM or Starcoder2ForCausalLM) with its full
    (unsharded) shape, under Hugging Face's names."""
    if config.model_type == "starcoder2":
        return _starcoder2_shapes(config)
    e, inner, d = config.n_embd, config.n_inner, config.head_dim
    qkv_rows = e + 2 * config.n_kv_head * d
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (config.vocab_size, e),
        "transformer.wpe.weight": (config.n_positions, e),
        "transformer.ln_f.weight": (e,),
        "transformer.ln_f.bias": (e,),
    }
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (e,), p + "ln_1.bias": (e,),
            p + "attn.c_attn.weight": (qkv_rows, e), p + "attn.c_attn.bias": (qkv_rows,),
            p + "attn.c_proj.weight": (e, e), p + "attn.c_proj.bias": (e,),
            p + "ln_2.weight": (e,), p + "ln_2.bias": (e,),
            p + "mlp.c_fc.weight": (inner, e), p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (e, inner), p + "mlp.c_proj.bias": (e,),
        })
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, e)
    return shapes


def _starcoder2_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    e, inner, d = config.n_embd, config.n_inner, config.head_dim
    kv_rows = config.n_kv_head * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, e)}
    linears = {"self_attn.q_proj": (e, e), "self_attn.k_proj": (kv_rows, e), "self_attn.v_proj": (kv_rows, e),
               "self_attn.o_proj": (e, e), "mlp.c_fc": (inner, e), "mlp.c_proj": (e, inner)}
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes.update({p + norm + ".weight": (e,), p + norm + ".bias": (e,)})
        for name, shape in linears.items():
            shapes[p + name + ".weight"] = shape
            if config.use_bias:
                shapes[p + name + ".bias"] = shape[:1]
    shapes.update({"model.norm.weight": (e,), "model.norm.bias": (e,)})
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, e)
    return shapes


def _canonical_name(name: str, model_type: str) -> str:
    # A checkpoint saved from the bare model (GPTBigCodeModel, Starcoder2Model: no LM head)
    # has no "transformer." / "model." prefix.
    if model_type == "gpt_bigcode" and name.startswith(("wte.", "wpe.", "h.", "ln_f.")):
        return "transformer." + name
    if model_type == "starcoder2" and name.startswith(("embed_tokens.", "layers.", "norm.")):
        return "model." + name
    return name


class CheckpointReader:
    """A lazy view of a HF checkpoint directory: names, shapes and slices of its tensors."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.raw_config = read_config_json(self.model_dir)
        self.config = ModelConfig.from_hf_dict(self.raw_config, source=str(self.model_dir / "config.json"))
        self.format, self.files = _find_weight_files(self.model_dir)
        self._location: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, stored name)
        self._shape: dict[str, tuple[int, ...]] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        for path in self.files:
            for stored, shape, _ in self._list_file(path):  # the dtype listed: refused when unsupported
                if stored.endswith(IGNORED_SUFFIXES):
                    continue
                name = _canonical_name(stored, self.config.model_type)
                self._location[name] = (path, stored)
                self._shape[name] = shape
        self._check_against_config()

    def _list_file(self, path: Path):
        if self.format == "safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    for stored in f.keys():
                        sl = f.get_slice(stored)
                        yield stored, tuple(sl.get_shape()), _st_dtype(sl.get_dtype())
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
        else:
            for stored, tensor in self._bin_tensors(path).items():
                yield stored, tuple(tensor.shape), tensor.dtype

    def _bin_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin_cache:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:
                raise ValueError(f"{path}: cannot be loaded as a weights-only PyTorch file ({err})") from None
            if not isinstance(state, dict):
                raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
            self._bin_cache[path] = state
        return self._bin_cache[path]

    def _check_against_config(self) -> None:
        expected = expected_shapes(self.config)
        missing = sorted(set(expected) - set(self._shape))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"{self.model_dir}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")
        unexpected = sorted(set(self._shape) - set(expected) - {"lm_head.weight"})
        if unexpected:
            shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
            raise ValueError(f"{self.model_dir}: unexpected tensor(s) for this config: {shown}")
        for name, shape in expected.items():
            if self._shape[name] != shape:
                raise ValueError(
                    f"{self.model_dir}: tensor {name} has shape {list(self._shape[name])}, "
                    f"but config.json implies {list(shape)}"
                )

    def names(self) -> list[str]:
        """The weight names the runtime uses (a tied `lm_head.weight` is left out)."""
        return list(expected_shapes(self.config))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor `name`, or only rows [start, stop) along `dim`, as a fresh CPU tensor."""
        path, stored = self._location[name]
        size = self._shape[name][dim]
        start = 0 if start is None else start
        stop = size if stop is None else min(stop, size)
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        if self.format == "safetensors":
            with safe_open(str(path), framework="pt") as f:
                return f.get_slice(stored)[index]
        return self._bin_tensors(path)[stored][index].clone()

    def fingerprint(self) -> str:
        """A cheap identity of the source: config.json, plus name, size and mtime of every weight file.

        Hashing the full 31+ GB would cost minutes; a rewritten or copied file changes its mtime,
        so a changed checkpoint is never mistaken for a cached one.
        """
        digest = hashlib.sha256()
        digest.update((self.model_dir / "config.json").read_bytes())
        for path in self.files:
            st = path.stat()
            digest.update(f"\0{path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return digest.hexdigest()


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's weight files, found as CheckpointReader finds them (nothing is read)."""
    return _find_weight_files(Path(model_dir))[1]


def _find_weight_files(model_dir: Path) -> tuple[str, list[Path]]:
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index_path = model_dir / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path}: no 'weight_map' in the index")
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            absent = [str(p) for p in files if not p.is_file()]
            if absent:
                raise FileNotFoundError(f"{index_path} names weight files that are missing: {', '.join(absent)}")
            return fmt, files
    single = sorted(model_dir.glob("*.safetensors"))
    if single:
        return "safetensors", single
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins:
        return "bin", bins
    raise FileNotFoundError(
        f"{model_dir}: no weights found (expected model.safetensors, {SAFETENSORS_INDEX} "
        "with its shards, or pytorch_model*.bin)"
    )


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _st_dtype(name: str) -> torch.dtype:
    if name not in _ST_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name}")
    return _ST_DTYPES[name]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
