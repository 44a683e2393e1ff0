"""Cutting a checkpoint into one part per rank ("part_model/{rank}") and reading a part back.

The rules are those of vLLM's gpt_bigcode.py / starcoder2.py and TGI's flash_santacoder:
query heads are split across ranks; key/value heads are split when the world size divides
their number and replicated when it is a multiple of it, each rank then holding the K/V head
its query heads use (StarCoder's multi-query attention: its ONE K/V head whole on every rank;
GPTBigCode's multi-head variant splits its K/V heads with the queries). `c_fc` is
column-parallel, `c_proj`/`o_proj` row-parallel with the bias replicated (added once, after
the all-reduce), the embedding and an untied `lm_head` vocabulary-parallel with the vocabulary
padded to a multiple of the world size, and `wpe` and the layer norms replicated. Parts keep
Hugging Face's names.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__, files, log as default_log
from .checkpoint import CheckpointReader, file_sha256
from .config import ModelConfig
from .files import atomic_dir
from .starcoder2 import part_names

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json",
)
PART_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_FILE_BYTES = 1 << 30


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ShardRule:
    """How one full tensor maps to one rank: the [start, stop) ranges along `dim` to read and
    concatenate, and the number of rows the result is zero-padded to (vocabulary padding)."""

    dim: int
    ranges: tuple[tuple[int, int], ...] | None  # None: replicated whole
    pad_rows_to: int | None = None


VOCAB_PARALLEL = ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight")


def kv_rows(config: ModelConfig, rank: int, world_size: int) -> tuple[int, int]:
    """The rows of a [n_kv_head * head_dim, ...] K or V block that `rank` holds."""
    local_kv, replicas = config.kv_layout(world_size)
    first = (rank // replicas) * local_kv
    return first * config.head_dim, (first + local_kv) * config.head_dim


def shard_rule(name: str, config: ModelConfig, rank: int, world_size: int) -> ShardRule:
    """The rule that cuts tensor `name` for `rank` of `world_size`."""
    n = world_size
    d = config.head_dim
    q_rows = config.n_head // n * d
    if name in VOCAB_PARALLEL:
        rows = config.padded_vocab_size(n) // n
        return ShardRule(0, ((rank * rows, (rank + 1) * rows),), pad_rows_to=rows)
    if config.model_type == "starcoder2":
        return _starcoder2_rule(name, config, rank, n)
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        local_heads = config.n_head // n
        if config.multi_query:
            # rows: [q of all heads (n_embd) | k (d) | v (d)]; every rank keeps k and v whole.
            q = (rank * q_rows, (rank + 1) * q_rows)
            k_start, k_stop = kv_rows(config, rank, n)
            e = config.n_embd
            return ShardRule(0, (q, (e + k_start, e + k_stop), (e + d + k_start, e + d + k_stop)))
        # multi-head rows are interleaved per head as [q_h | k_h | v_h] (HF's layout), so a
        # rank's heads are one contiguous block of rows.
        block = local_heads * 3 * d
        return ShardRule(0, ((rank * block, (rank + 1) * block),))
    if name.endswith("mlp.c_fc.weight") or name.endswith("mlp.c_fc.bias"):
        rows = config.n_inner // n
        return ShardRule(0, ((rank * rows, (rank + 1) * rows),))
    if name.endswith("attn.c_proj.weight"):
        cols = config.n_embd // n
        return ShardRule(1, ((rank * cols, (rank + 1) * cols),))
    if name.endswith("mlp.c_proj.weight"):
        cols = config.n_inner // n
        return ShardRule(1, ((rank * cols, (rank + 1) * cols),))
    # wpe, layer norms, row-parallel biases: replicated.
    return ShardRule(0, None)


def _starcoder2_rule(name: str, config: ModelConfig, rank: int, n: int) -> ShardRule:
    q_rows = config.n_head // n * config.head_dim
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return ShardRule(0, ((rank * q_rows, (rank + 1) * q_rows),))
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias",
                      "self_attn.v_proj.weight", "self_attn.v_proj.bias")):
        return ShardRule(0, (kv_rows(config, rank, n),))
    if name.endswith("self_attn.o_proj.weight"):
        return ShardRule(1, ((rank * q_rows, (rank + 1) * q_rows),))
    if name.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
        rows = config.n_inner // n
        return ShardRule(0, ((rank * rows, (rank + 1) * rows),))
    if name.endswith("mlp.c_proj.weight"):
        cols = config.n_inner // n
        return ShardRule(1, ((rank * cols, (rank + 1) * cols),))
    return ShardRule(0, None)  # layer norms, row-parallel biases


def rank_tensor(reader: CheckpointReader, name: str, rank: int, world_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Read only this rank's piece of `name` from the checkpoint, in `dtype`."""
    rule = shard_rule(name, reader.config, rank, world_size)
    if rule.ranges is None:
        return reader.read(name).to(dtype).contiguous()
    pieces = [reader.read(name, rule.dim, start, stop) for start, stop in rule.ranges]
    tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=rule.dim)
    if rule.pad_rows_to is not None and tensor.shape[0] < rule.pad_rows_to:
        pad = tensor.new_zeros((rule.pad_rows_to - tensor.shape[0],) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, pad], dim=0)
    return tensor.to(dtype).contiguous()


def merge_rank_tensors(name: str, parts: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Put one tensor back together from its per-rank pieces (the inverse of `rank_tensor`)."""
    n = len(parts)
    rule = shard_rule(name, config, 0, n)
    if rule.ranges is None:
        for rank, part in enumerate(parts[1:], start=1):
            if not torch.equal(part, parts[0]):
                raise ValueError(f"replicated tensor {name} differs between rank 0 and rank {rank}")
        return parts[0]
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")) and config.multi_query:
        q_rows = config.n_embd // n
        for rank, part in enumerate(parts[1:], start=1):
            if not torch.equal(part[q_rows:], parts[0][q_rows:]):
                raise ValueError(f"the K/V head of {name} differs between rank 0 and rank {rank}")
        return torch.cat([p[:q_rows] for p in parts] + [parts[0][q_rows:]], dim=0)
    _, replicas = config.kv_layout(n)
    if replicas > 1 and name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        for rank, part in enumerate(parts):
            if not torch.equal(part, parts[rank - rank % replicas]):
                raise ValueError(f"the K/V head of {name} differs between rank {rank - rank % replicas} and rank {rank}")
        parts = parts[::replicas]
    full = torch.cat(parts, dim=rule.dim)
    if rule.pad_rows_to is not None:
        full = full[: config.vocab_size]
    return full


def group_by_size(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive names packed into files of at most max_bytes (one oversized tensor: its own file)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if groups[-1] and used + nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    return groups


def _write_rank(reader: CheckpointReader, rank: int, world_size: int, dtype_name: str,
                rank_dir: Path, max_file_bytes: int) -> None:
    config, dtype = reader.config, DTYPES[dtype_name]
    rank_dir.mkdir(parents=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = []
    for name in reader.names():
        shape = list(reader.shape(name))
        rule = shard_rule(name, config, rank, world_size)
        if rule.ranges is not None:
            shape[rule.dim] = rule.pad_rows_to or sum(stop - start for start, stop in rule.ranges)
        sizes.append((name, int(torch.Size(shape).numel()) * itemsize))
    groups = group_by_size(sizes, max_file_bytes)
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        file_name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        # One file's tensors at a time: peak memory is one file, not one rank's whole part.
        tensors = {name: rank_tensor(reader, name, rank, world_size, dtype) for name in names}
        save_file(tensors, str(rank_dir / file_name), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: file_name for name in names})
    (rank_dir / PART_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    part_config = dict(reader.raw_config)
    part_config["starcoder_tp"] = {
        "format_version": FORMAT_VERSION, "rank": rank, "world_size": world_size, "dtype": dtype_name,
        "padded_vocab_size": config.padded_vocab_size(world_size),
    }
    (rank_dir / "config.json").write_text(json.dumps(part_config, indent=2))
    for tok_file in TOKENIZER_FILES:
        if (reader.model_dir / tok_file).is_file():
            shutil.copyfile(reader.model_dir / tok_file, rank_dir / tok_file)


def _manifest_matches(manifest: dict, fingerprint: str, world_size: int, dtype_name: str) -> str | None:
    """None when the manifest describes the requested shards, else what differs."""
    wanted = {"format_version": FORMAT_VERSION, "world_size": world_size, "dtype": dtype_name}
    for key, value in wanted.items():
        if manifest.get(key) != value:
            return f"{key} is {manifest.get(key)!r}, wanted {value!r}"
    if manifest.get("source", {}).get("fingerprint") != fingerprint:
        return "it was cut from another checkpoint (source fingerprint differs)"
    return None


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {shard_dir} is not a complete shard set "
            "(cut one with `python -m starcoder_tp shard`)"
        )
    return json.loads(path.read_text())


def shard_checkpoint(model_dir: str | Path, out_dir: str | Path, world_size: int, dtype: str = "float32",
                     *, force: bool = False, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                     log: Callable[[str], None] | None = None) -> dict:
    """Cut `model_dir` into `out_dir/part_model/{rank}` and write `out_dir/manifest.json`.

    Returns the manifest. A matching manifest already in `out_dir` means nothing to do. The
    set is built in a temporary sibling directory and renamed into place, so an interrupted
    run never leaves something that passes for a complete shard set.
    """
    log = log or default_log
    parse_dtype(dtype)
    reader = CheckpointReader(model_dir)
    reader.config.check_world_size(world_size)
    out_dir = Path(out_dir)
    fingerprint = reader.fingerprint()
    if (out_dir / "manifest.json").is_file():
        existing = read_manifest(out_dir)
        why = _manifest_matches(existing, fingerprint, world_size, dtype)
        if why is None:
            log(f"[shard] {out_dir} already holds these shards (manifest matches); nothing to do")
            return existing
        if not force:
            raise ValueError(f"{out_dir} already holds other shards: {why}. Use --force to replace them, or another --out")
    elif out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise ValueError(f"{out_dir} exists, is not empty and has no manifest.json; refusing to write into it")

    started = time.perf_counter()

    def theirs_match(out: Path) -> bool:  # another process finished the same shard set first
        return (out / "manifest.json").is_file() and _manifest_matches(read_manifest(out), fingerprint, world_size,
                                                                       dtype) is None

    with atomic_dir(out_dir, keep_theirs=theirs_match) as tmp:
        for rank in range(world_size):
            _write_rank(reader, rank, world_size, dtype, tmp / "part_model" / str(rank), max_file_bytes)
            log(f"[shard] rank {rank + 1}/{world_size} written ({time.perf_counter() - started:.1f}s)")
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(path.relative_to(tmp))] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        manifest = {
            "format_version": FORMAT_VERSION,
            "starcoder_tp_version": __version__,
            "world_size": world_size,
            "dtype": dtype,
            "source": {"path": str(Path(model_dir).resolve()), "format": reader.format, "fingerprint": fingerprint},
            "config": {k: getattr(reader.config, k) for k in ("model_type", "vocab_size", "n_embd", "n_layer", "n_head",
                                                              "n_kv_head", "sliding_window")},
            "padded_vocab_size": reader.config.padded_vocab_size(world_size),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log(f"[shard] {model_dir} -> {out_dir}: {world_size} part(s), {dtype}, {time.perf_counter() - started:.1f}s")
    return read_manifest(out_dir)


def verify_rank_files(shard_dir: str | Path, manifest: dict, rank: int, checksums: bool = True) -> None:
    """Every file of this rank as the manifest lists it: present, of the right size and (with
    `checksums`) the right sha256. Hashing runs at about 1.4 GB/s per rank here, so a 15.5B
    StarCoder in fp16 at world size 2 adds ~11 s to loading; sizes alone cost nothing."""
    prefix = f"part_model/{rank}/"
    listed = {rel: entry for rel, entry in manifest["files"].items() if rel.startswith(prefix)}
    if not listed:
        raise ValueError(f"{shard_dir}/manifest.json lists no files for rank {rank}")
    for rel, entry in listed.items():
        path = Path(shard_dir) / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the manifest but missing: re-shard with --force")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated or replaced): "
                             "re-shard with --force")
        if checksums and file_sha256(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the manifest (the file is corrupted): re-shard with --force")


def load_part(shard_dir: str | Path, rank: int, world_size: int, device: torch.device | str = "cpu",
              verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """This rank's config dict and tensors, read straight onto `device` (one copy in memory),
    after checking its files against the manifest."""
    manifest = read_manifest(shard_dir)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{shard_dir}: shard format {manifest.get('format_version')} is not {FORMAT_VERSION}; re-shard")
    if manifest["world_size"] != world_size:
        raise ValueError(
            f"{shard_dir} was cut for world size {manifest['world_size']}, not {world_size}; "
            f"run with --world-size {manifest['world_size']} or re-shard"
        )
    rank_dir = Path(shard_dir) / "part_model" / str(rank)
    verify_rank_files(shard_dir, manifest, rank, checksums=verify)
    raw_config = json.loads((rank_dir / "config.json").read_text())
    meta = raw_config.get("starcoder_tp", {})
    if meta.get("rank") != rank or meta.get("world_size") != world_size:
        raise ValueError(f"{rank_dir}/config.json describes rank {meta.get('rank')} of {meta.get('world_size')}, not rank {rank} of {world_size}")
    weight_map = json.loads((rank_dir / PART_INDEX).read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for file_name in sorted(set(weight_map.values())):
        state.update(load_file(str(rank_dir / file_name), device=str(device)))
    return raw_config, state


def part_tensor_reader(shard_dir: str | Path, rank: int, model_type: str) -> Callable[[str], torch.Tensor]:
    """A function reading one of this rank's tensors again by its runtime name, onto the CPU (a
    fresh copy; the files were checked against the manifest at load): StarCoder2's as
    `starcoder2.runtime_state` made it, q/k/v concatenated."""
    rank_dir = Path(shard_dir) / "part_model" / str(rank)
    weight_map = json.loads((rank_dir / PART_INDEX).read_text())["weight_map"]

    def read_stored(name: str) -> torch.Tensor:
        if name not in weight_map:
            raise KeyError(f"{rank_dir}: no tensor {name!r} in the part")
        with safe_open(str(rank_dir / weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def read(runtime_name: str) -> torch.Tensor:
        names = part_names(runtime_name) if model_type == "starcoder2" else [runtime_name]
        return torch.cat([read_stored(name) for name in names])

    return read


def ensure_shards(model_dir: str | Path, world_size: int, dtype: str = "float32",
                  cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                  lock_timeout_s: float = 3600.0) -> Path:
    """The shard set of `model_dir` for this world size and dtype, cut into the cache when
    missing; keyed by the source's fingerprint, so a changed checkpoint is cut again."""
    parse_dtype(dtype)
    fingerprint = CheckpointReader(model_dir).fingerprint()
    out = Path(cache_dir or files.cache_dir("shards")) / f"{Path(model_dir).resolve().name}-{fingerprint[:16]}-ws{world_size}-{dtype}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two suites on one machine share the cache: one cuts, the other waits and then finds it done.
    with _cache_lock(out.parent / f".{out.name}.lock", lock_timeout_s, log):
        shard_checkpoint(model_dir, out, world_size, dtype, log=log)
    return out


@contextlib.contextmanager
def _cache_lock(path: Path, timeout_s: float, log: Callable[[str], None] | None):
    """An exclusive flock (released by the kernel if its holder dies), waited for with a
    deadline so that a stuck holder cannot hang this process."""
    with open(path, "a+") as lock:
        deadline = time.monotonic() + timeout_s
        next_note = 0.0
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"{path}: held by {holder} for more than {timeout_s:.0f}s while it cuts the "
                                       "same shards; stop it or remove the half-made cache entry") from None
                if log and now >= next_note:
                    log(f"[shard] waiting for {holder}, which is cutting the same shards ({path})")
                    next_note = now + 30
                time.sleep(0.2)
        lock.seek(0), lock.truncate()
        lock.write(f"pid {os.getpid()}"), lock.flush()
        try:
            yield
        finally:
            lock.seek(0), lock.truncate()
