import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_files import write_small_model
from starcoder_tp import shard as shard_mod
from starcoder_tp.checkpoint import CheckpointReader, expected_shapes, file_sha256
from starcoder_tp.shard import load_part, merge_rank_tensors, rank_tensor, read_manifest, shard_checkpoint


def part_tensors(shard_dir, world_size):
    return [load_part(shard_dir, rank, world_size)[1] for rank in range(world_size)]


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shards_put_back_together_equal_the_original(tmp_path, multi_query, world_size):
    src = write_small_model(tmp_path / "src", multi_query=multi_query, vocab_size=1001)  # 1001: not divisible
    reader = CheckpointReader(src)
    shard_checkpoint(src, tmp_path / "out", world_size)
    parts = part_tensors(tmp_path / "out", world_size)
    for name in expected_shapes(reader.config):
        merged = merge_rank_tensors(name, [p[name] for p in parts], reader.config)
        assert torch.equal(merged, reader.read(name)), name


def test_multi_query_kv_head_is_whole_on_every_rank_and_queries_are_split(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True)
    reader = CheckpointReader(src)
    full = reader.read("transformer.h.0.attn.c_attn.weight")  # [64 q + 16 k + 16 v, 64]
    parts = [rank_tensor(reader, "transformer.h.0.attn.c_attn.weight", r, 4, torch.float32) for r in range(4)]
    for rank, part in enumerate(parts):
        assert part.shape == (16 + 32, 64)
        assert torch.equal(part[:16], full[rank * 16:(rank + 1) * 16])  # its one query head
        assert torch.equal(part[16:], full[64:])  # the whole K/V head


def test_multi_head_kv_heads_are_split_with_their_queries(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=False)
    reader = CheckpointReader(src)
    full = reader.read("transformer.h.1.attn.c_attn.bias")  # per head [q|k|v], 48 each
    part = rank_tensor(reader, "transformer.h.1.attn.c_attn.bias", 1, 2, torch.float32)
    assert torch.equal(part, full[96:192])


def test_row_parallel_biases_replicated_and_vocabulary_padded_with_zeros(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True, vocab_size=1001)
    shard_checkpoint(src, tmp_path / "out", 4)
    parts = part_tensors(tmp_path / "out", 4)
    for name in ("transformer.h.0.attn.c_proj.bias", "transformer.h.1.mlp.c_proj.bias", "transformer.wpe.weight"):
        assert all(torch.equal(p[name], parts[0][name]) for p in parts), name
    assert [p["transformer.wte.weight"].shape[0] for p in parts] == [251] * 4
    assert torch.count_nonzero(parts[3]["transformer.wte.weight"][-3:]) == 0
    assert parts[1]["transformer.h.0.mlp.c_proj.weight"].shape == (64, 32)
    assert parts[1]["transformer.h.0.mlp.c_fc.weight"].shape == (32, 64)


@pytest.mark.parametrize("layout", ["index", "bin"])
def test_every_published_layout_gives_the_same_shards(tmp_path, layout):
    single = write_small_model(tmp_path / "single", multi_query=True)
    other = write_small_model(tmp_path / layout, multi_query=True, layout=layout)
    assert CheckpointReader(other).format == ("bin" if layout == "bin" else "safetensors")
    shard_checkpoint(single, tmp_path / "a", 2)
    shard_checkpoint(other, tmp_path / "b", 2)
    for pa, pb in zip(part_tensors(tmp_path / "a", 2), part_tensors(tmp_path / "b", 2)):
        assert pa.keys() == pb.keys()
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_dtype_conversion_and_manifest(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True)
    manifest = shard_checkpoint(src, tmp_path / "out", 2, "bfloat16")
    assert manifest["world_size"] == 2 and manifest["dtype"] == "bfloat16"
    assert manifest["source"]["fingerprint"] == CheckpointReader(src).fingerprint()
    for rel, entry in manifest["files"].items():
        assert file_sha256(tmp_path / "out" / rel) == entry["sha256"], rel
    assert {"part_model/0/config.json", "part_model/1/model.safetensors.index.json"} <= set(manifest["files"])
    tensors = load_part(tmp_path / "out", 1, 2)[1]
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_second_run_with_matching_manifest_does_nothing(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True)
    shard_checkpoint(src, tmp_path / "out", 2)
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    messages = []
    shard_checkpoint(src, tmp_path / "out", 2, log=messages.append)
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp
    assert "nothing to do" in messages[0]


def test_other_shards_in_out_are_refused_unless_forced(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True)
    shard_checkpoint(src, tmp_path / "out", 2)
    with pytest.raises(ValueError, match="world_size is 2, wanted 4"):
        shard_checkpoint(src, tmp_path / "out", 4)
    shard_checkpoint(src, tmp_path / "out", 4, force=True)
    assert read_manifest(tmp_path / "out")["world_size"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary or old dirs left
    with pytest.raises(ValueError, match="cut for world size 4, not 2"):
        load_part(tmp_path / "out", 0, 2)


def test_interrupted_sharding_leaves_nothing_that_passes_for_a_shard_set(tmp_path, monkeypatch):
    src = write_small_model(tmp_path / "src", multi_query=True)
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if "part_model/1" in path:
            raise OSError("disk full (simulated)")
        return shard_mod.save_file.__wrapped__(tensors, path, metadata=metadata)

    from safetensors.torch import save_file
    failing_save.__wrapped__ = save_file
    monkeypatch.setattr(shard_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        shard_checkpoint(src, tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_world_size_that_does_not_divide_heads_is_refused_before_writing(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True)
    with pytest.raises(ValueError, match="world size 3 does not divide"):
        shard_checkpoint(src, tmp_path / "out", 3)
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints_name_the_problem(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True)
    weights = load_file(str(src / "model.safetensors"))
    weights["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(100, 64)
    from safetensors.torch import save_file
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.c_fc.weight has shape \[100, 64\].*\[128, 64\]"):
        CheckpointReader(src)
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="missing from the checkpoint: transformer.h.1.mlp.c_fc.weight"):
        CheckpointReader(src)
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        CheckpointReader(src)
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        CheckpointReader(src)
    raw = json.loads((src / "config.json").read_text())
    raw["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="model_type is 'gpt2'"):
        CheckpointReader(src)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_truncated_weights_and_code_in_a_pickle_are_refused(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a download cut half-way: header intact, data short
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        CheckpointReader(src)
    weights.unlink()
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": _RunsCodeWhenUnpickled(marker)}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: cannot be loaded as a weights-only PyTorch file"):
        CheckpointReader(src)
    assert not marker.exists(), "loading a checkpoint ran code from its pickle"


def test_damaged_shard_files_are_refused_at_load(tmp_path):
    src = write_small_model(tmp_path / "src", multi_query=True)
    shard_checkpoint(src, tmp_path / "out", 2)
    target = tmp_path / "out" / "part_model" / "1" / "model-00001-of-00001.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    target.write_bytes(bytes(data))
    load_part(tmp_path / "out", 0, 2)  # the other rank's files are intact
    with pytest.raises(ValueError, match="model-00001-of-00001.safetensors: sha256 differs from the manifest"):
        load_part(tmp_path / "out", 1, 2)
    target.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match=f"has {len(data) - 100} bytes, the manifest says {len(data)}"):
        load_part(tmp_path / "out", 1, 2, verify=False)
    target.unlink()
    with pytest.raises(FileNotFoundError, match="listed in the manifest but missing"):
        load_part(tmp_path / "out", 1, 2)


def _ensure(args):
    from starcoder_tp.shard import ensure_shards

    src, cache = args
    messages = []
    out = ensure_shards(src, 2, "float32", cache_dir=cache, log=messages.append)
    return str(out), messages


def test_two_runs_sharing_one_cache_cut_it_once(tmp_path):
    import multiprocessing as mp

    src = write_small_model(tmp_path / "src", multi_query=True)
    with mp.get_context("spawn").Pool(2) as pool:
        (out_a, log_a), (out_b, log_b) = pool.map(_ensure, [(src, tmp_path / "cache")] * 2)
    assert out_a == out_b
    cut = [m for m in log_a + log_b if "part(s)" in m]
    reused = [m for m in log_a + log_b if "nothing to do" in m]
    assert len(cut) == 1 and len(reused) == 1, (log_a, log_b)
    assert read_manifest(out_a)["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [Path(out_a).name]


def test_a_stuck_holder_of_the_cache_lock_gives_a_timeout_naming_it(tmp_path):
    import fcntl

    from starcoder_tp.shard import ensure_shards

    src = write_small_model(tmp_path / "src", multi_query=True)
    ensure_shards(src, 2, "float32", cache_dir=tmp_path / "cache")
    lock_path = next((tmp_path / "cache").glob(".*.lock"))
    with open(lock_path, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a separate open file description: conflicts even in-process
        held.write("pid 4242"), held.flush()
        messages = []
        with pytest.raises(TimeoutError, match=r"held by pid 4242 for more than 1s"):
            ensure_shards(src, 2, "float32", cache_dir=tmp_path / "cache", log=messages.append, lock_timeout_s=1)
        assert any("waiting for pid 4242" in m for m in messages)
