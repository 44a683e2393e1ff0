"""Parity and a small perf run on CUDA GPUs and Ascend NPUs; skipped, with the reason, where the
hardware is absent (as on the project's CPU machines and CI)."""
import importlib.util

import pytest
import torch

from starcoder_tp.testing.compare import check_topk_close
from starcoder_tp.device import Device
from starcoder_tp.suite.gate import measure_calibration
from starcoder_tp.suite.perf import Case, PerfOptions, PerfRunner
from starcoder_tp.testing.runners import GreedyOutput, HFRunner, TPRunner
from starcoder_tp.shard import ensure_shards


def _device_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if importlib.util.find_spec("torch_npu") is None:
        return 0
    import torch_npu  # noqa: F401

    return torch.npu.device_count() if torch.npu.is_available() else 0


ACCELERATORS = [pytest.param(kind, marks=pytest.mark.skipif(_device_count(kind) == 0,
                                                          reason=f"no {kind} device on this machine"))
                for kind in ("cuda", "npu")]


@pytest.mark.parametrize("kind", ACCELERATORS)
def test_tp_matches_the_reference_on_the_accelerator(kind, embedded_dir, prompts):
    world_size = 2 if _device_count(kind) >= 2 else 1
    runner = TPRunner(ensure_shards(embedded_dir, world_size, "float32"), world_size, Device(kind))
    try:
        out = runner.generate_greedy(prompts, 64, topk=5)
    finally:
        runner.close()
    reference = HFRunner(embedded_dir, "float32", f"{kind}:0").generate_greedy(prompts, 64, topk=5)
    # Different kernels on one device may reorder reductions: vLLM's top-5 rule, not identity.
    check_topk_close(outputs_0=reference, outputs_1=out, name_0=f"transformers-{kind}", name_1=f"tp{world_size}-{kind}")


@pytest.mark.parametrize("kind", ACCELERATORS)
def test_perf_case_on_the_accelerator_reports_device_memory(kind, embedded_dir, tmp_path):
    world_size = 2 if _device_count(kind) >= 2 else 1
    options = PerfOptions(model_dir=str(embedded_dir), device=kind, world_size=world_size, batch_sizes=(4,),
                          seq_in=(128,), seq_out=(32,), results_dir=str(tmp_path))
    runner = PerfRunner(options, log=lambda m: None).start()
    try:
        result = runner.measure(Case(4, 128, 32))
    finally:
        runner.close()
    assert result.first_token_ms > 0 and result.decode_ms_mean > 0
    assert len(result.peak_memory_bytes) == world_size and min(result.peak_memory_bytes) > 0


@pytest.mark.parametrize("kind", ACCELERATORS)
def test_the_gates_calibration_is_the_accelerators_not_the_hosts(kind):
    """--perf-normalize scales by these figures: an accelerator run's must be its device's. Any
    GPU or NPU copies and multiplies many times faster than one host thread (an H200: ~4000
    against ~11 GB/s); the host's own figures in its rows were the defect."""
    host = measure_calibration(samples=1)
    device = measure_calibration(samples=1, device=Device(kind), dtype="bfloat16")
    for figure in host:
        assert device[figure] > 5 * host[figure], (figure, device, host)


@pytest.mark.skipif(_device_count("cuda") == 0, reason="no cuda device on this machine")
def test_compiled_decode_on_cuda_replays_cuda_graphs_and_keeps_the_tokens(embedded_dir):
    from torch._dynamo.utils import counters

    from starcoder_tp.model import load_model
    from starcoder_tp.timing import timed_generate
    from starcoder_tp.comm import TPGroup

    shard_dir = ensure_shards(embedded_dir, 1, "float32")
    eager = load_model(shard_dir, TPGroup(0, 1), torch.device("cuda:0"), kernels="plain")
    compiled = load_model(shard_dir, TPGroup(0, 1), torch.device("cuda:0"), compile=True)
    vocab = eager.config.vocab_size
    counters.clear()
    # Batch 2 -> 3 -> 2 at one length: new caches of a shape compiled before must be the ones
    # the graph writes (a stale cache gives wrong tokens, not an error).
    for seed, batch in enumerate((2, 3, 2)):
        prompts = torch.randint(1, vocab, (batch, 24), generator=torch.Generator().manual_seed(seed)).tolist()
        runs = {name: timed_generate(model, Device("cuda"), prompts, 32, topk=5)
                for name, model in (("eager", eager), ("compiled", compiled))}
        as_greedy = {name: GreedyOutput(output_ids=r.output_ids.tolist(), topk_ids=r.topk_ids.tolist(),
                                        topk_logprobs=r.topk_logprobs.tolist()) for name, r in runs.items()}
        check_topk_close(outputs_0=as_greedy["eager"], outputs_1=as_greedy["compiled"], name_0="eager-cuda",
                         name_1=f"compiled-cuda-graphs-batch{batch}")
    inductor = dict(counters["inductor"])
    assert not inductor.get("cudagraph_skips"), f"CUDA graphs were skipped: {inductor}"
    assert inductor.get("cudagraph_recorded_non_static_inputs"), f"no CUDA graph was recorded: {inductor}"
