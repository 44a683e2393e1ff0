"""torch.compile of the decode step (--compile): the fixed-shape step gives the eager tokens,
in one process and across two ranks, and stays one graph (collectives included) in bf16 and at
depths past dynamo's recompile limit."""
import gc
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from starcoder_tp.testing.build_models import hf_config, random_weights
from starcoder_tp.device import Device
from starcoder_tp.model import load_model
from starcoder_tp.timing import timed_generate
from starcoder_tp.comm import TPGroup
from starcoder_tp.parallel import GroupSpec, WorkerGroup
from starcoder_tp.shard import shard_checkpoint

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="torch.compile on CPU (inductor) needs a C++ compiler, none is installed")


@pytest.fixture(scope="module")
def ws1(tmp_path_factory, embedded_dir):
    out = tmp_path_factory.mktemp("compile") / "s1"
    shard_checkpoint(embedded_dir, out, 1)
    return out


def random_prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).tolist()


def test_compiled_decode_gives_the_eager_tokens_across_requests(ws1):
    eager = load_model(ws1, TPGroup(0, 1), torch.device("cpu"))
    compiled = load_model(ws1, TPGroup(0, 1), torch.device("cpu"), compile=True)
    assert compiled.compiled_decode is not None
    vocab = eager.config.vocab_size
    ragged = random_prompts(vocab, 2, 24, seed=3)
    ragged[0] = ragged[0][:9]  # left padding: the mask over the static cache must hide it
    # Two requests of one shape (the second must not see the first's cache), a ragged one, and
    # a shorter one that reuses the longer cache (its unused slots must stay masked).
    for prompts in (random_prompts(vocab, 2, 16, seed=1), random_prompts(vocab, 2, 16, seed=2), ragged,
                    random_prompts(vocab, 2, 8, seed=5)):
        want = timed_generate(eager, Device("cpu"), prompts, 10)
        got = timed_generate(compiled, Device("cpu"), prompts, 10)
        assert torch.equal(got.output_ids, want.output_ids), (got.output_ids, want.output_ids)
        assert len(got.decode_ms) == 9 and all(t > 0 for t in got.decode_ms)


def test_every_new_cache_shape_is_compiled_past_dynamos_recompile_limit(ws1):
    # A suite run under --compile allocates new caches case after case; past dynamo's recompile
    # limit (8) the step used to run eager from then on, silently. Here 10 cache shapes in turn
    # (batch 1 -> 2 -> 1 at one length included: new caches of a shape compiled before).
    # Each compile also froze its own copy of the weights (oneDNN tensors), which must go with it.
    eager = load_model(ws1, TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    compiled = load_model(ws1, TPGroup(0, 1), torch.device("cpu"), compile=True)
    vocab = eager.config.vocab_size
    shapes = [(1, 8), (2, 8), (1, 8), (1, 12), (2, 12), (1, 16), (2, 16), (3, 8), (3, 12), (1, 20)]
    frozen = []
    for seed, (batch, length) in enumerate(shapes):
        graphs = counters["stats"]["unique_graphs"]
        prompts = random_prompts(vocab, batch, length, seed=seed)
        got = timed_generate(compiled, Device("cpu"), prompts, 4)
        assert counters["stats"]["unique_graphs"] == graphs + 1, \
            f"case {seed} (batch {batch}, {length} tokens): the decode step was not compiled"
        want = timed_generate(eager, Device("cpu"), prompts, 4)
        assert torch.equal(got.output_ids, want.output_ids), (seed, got.output_ids, want.output_ids)
        gc.collect()
        frozen.append(sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.layout == torch._mkldnn))
    assert frozen[-1] <= frozen[0], f"frozen weight tensors alive after each case: {frozen}"


def test_two_ranks_with_compiled_decode_match_one_eager_rank(ws1, embedded_dir, tmp_path):
    shard_checkpoint(embedded_dir, tmp_path / "s2", 2)
    eager = load_model(ws1, TPGroup(0, 1), torch.device("cpu"))
    prompts = random_prompts(eager.config.vocab_size, 2, 12, seed=4)
    want = timed_generate(eager, Device("cpu"), prompts, 8).output_ids
    with WorkerGroup(GroupSpec(str(tmp_path / "s2"), 2, compile=True)) as group:
        result, _ = group.generate(prompts, 8)
    assert torch.equal(result.output_ids, want), (result.output_ids, want)


def test_compile_refuses_prepacked_weights(ws1):
    model = load_model(ws1, TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    if model.use_kernels("onednn") == 0:
        pytest.skip("oneDNN cannot pack weights on this machine")
    with pytest.raises(ValueError, match=r"pre-packed or fp32\); load it with kernels='plain'"):
        model.compile_decode()


def tiny_checkpoint(out, seed: int, **sizes):
    """A small StarCoder-shaped checkpoint (2 layers unless `sizes` say otherwise), random weights."""
    raw = hf_config(**{**dict(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=256), **sizes})
    out.mkdir()
    (out / "config.json").write_text(json.dumps(raw))
    save_file(random_weights(raw, seed=seed), str(out / "model.safetensors"))
    return out


class LoopbackComm:
    """Stands in for the shared-memory communicator of rank 0 of 2 in one process: records the
    all-reduces (leaving the tensor as is), so a test can see them run inside a compiled step."""

    def __init__(self):
        self.all_reduces = 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        self.all_reduces += 1
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t, t])


def graphs_and_breaks(run) -> tuple[int, int]:
    """How many graphs dynamo compiled and how many graph breaks it hit while `run()` ran."""
    torch._dynamo.reset()
    counters.clear()
    run()
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_compiled_step_of_a_deep_model_at_two_ranks_is_one_graph(tmp_path):
    """Deeper than dynamo's recompile limit (8): with the all-reduce as a graph break, each layer
    needed its own graphs and the layers past the limit silently ran eager (61 graphs here)."""
    shard_checkpoint(tiny_checkpoint(tmp_path / "model", seed=7, n_layer=12), tmp_path / "s2", 2)
    comm = LoopbackComm()
    model = load_model(tmp_path / "s2", TPGroup(0, 2, shm=comm), torch.device("cpu"), compile=True)
    prompts = random_prompts(model.config.vocab_size, 2, 8, seed=1)
    graphs, breaks = graphs_and_breaks(lambda: timed_generate(model, Device("cpu"), prompts, 5))
    assert (graphs, breaks) == (1, 0)
    # Per step: the embedding's all-reduce, two per layer and the greedy pick's (its board of
    # candidates, eager). The prefill (eager) does them once, then the 4 decode steps through the
    # compiled step; plus the one barrier (a one-element all-reduce) before the first-token clock starts.
    assert comm.all_reduces == 1 + 5 * (1 + 2 * 12 + 1)


def test_compiled_bf16_step_is_one_graph(embedded_dir, tmp_path):
    """Batch 4: on CPUs without bf16 arithmetic the linears take the fp32 path (linear.py),
    whose CPU probe was a graph break in every linear (46 per step on the bench-size model)."""
    shard_checkpoint(embedded_dir, tmp_path / "bf16", 1, dtype="bfloat16")
    model = load_model(tmp_path / "bf16", TPGroup(0, 1), torch.device("cpu"), compile=True)
    prompts = random_prompts(model.config.vocab_size, 4, 8, seed=2)
    assert graphs_and_breaks(lambda: timed_generate(model, Device("cpu"), prompts, 4)) == (1, 0)


def decode_logits(model, step) -> torch.Tensor:
    """Logits of one fixed-shape decode step after an eager prefill of 8 tokens, batch 2."""
    model.setup_cache(2, 16)
    ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model.forward(ids[:, :8], torch.arange(8).expand(2, 8), 0)
    return step(ids[:, 8:], torch.full((2, 1), 8), torch.tensor([8]), torch.ones(2, 16, dtype=torch.bool)).float()


def test_compiled_bf16_steps_of_two_models_of_one_shape_each_use_their_own_weights(tmp_path):
    """The second compile is a hit in inductor's FX graph cache (same graph), which must restore
    this model's frozen weights. In torch 2.13 a bare bf16 F.linear module compiled with
    max-autotune and freezing (as compile_decode does for bf16 on CPUs without bf16 arithmetic)
    got the first module's weights from the cache; the decode step does not, which this checks."""
    for seed in (1, 2):
        shard_checkpoint(tiny_checkpoint(tmp_path / f"m{seed}", seed, n_embd=256, n_inner=1024), tmp_path / f"s{seed}", 1, dtype="bfloat16")
        model = load_model(tmp_path / f"s{seed}", TPGroup(0, 1), torch.device("cpu"), compile=True)
        eager, compiled = decode_logits(model, model.forward), decode_logits(model, model.compiled_decode)
        torch.testing.assert_close(compiled, eager, rtol=0.05, atol=0.05 * eager.abs().max().item())
