"""Decode steps through torch.compile (inductor): the fixed-shape step compiled, and the compiled
code forgotten when the caches it was traced with go (TPCausalLM.compile_decode, _allocate_cache)."""
from __future__ import annotations

import sys

import torch

from .linear import NATIVE_BF16_MATMUL, Linear


def drop_compiled_code() -> None:
    """Forget every graph compiled in this process, and free what they hold.

    The compiled decode step guards on the identity of the KV caches (freezing makes them part of
    the graph), so new caches always mean a new compile. Kept, the old graphs cost twice: past
    dynamo's recompile limit (8) every later case ran eager, silently, and each held its own frozen
    copy of the weights. Inductor keeps its generated modules, which hold those copies as constants,
    in sys.modules; they go too. Other compiled code in the process recompiles when next called.
    """
    torch._dynamo.reset()
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    PyCodeCache.cache_clear()
    root = cache_dir()
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(root):
            del sys.modules[name]


def compile_step(model, mode: str | None = None):
    """`model.forward` through torch.compile, in the mode that pays for the model's device and dtype
    (None: chosen here). Not with pre-packed weights: inductor packs the weights itself (freezing), and
    cannot take oneDNN's opaque tensors."""
    if any(m.decode_kernel != "plain" or m.short_kernel != "plain" or m.prefill_kernel != "plain"
           for m in model.modules() if isinstance(m, Linear)) or model.lm_head_kernel != "plain":
        # Packed weights are opaque to inductor; the fp32 path, traced, would be folded into fp32 copies.
        raise ValueError("compile_decode: the model's linears run other kernels than plain F.linear "
                         "(pre-packed or fp32); load it with kernels='plain'")
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights as constants: inductor re-lays them out for its GEMMs
    weight = model.transformer.ln_f.weight
    if mode is None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not NATIVE_BF16_MATMUL:
        # bf16 without bf16 arithmetic: linear.py's fp32 path, traced, would be folded into fp32 copies of
        # the weights (twice the memory more). The linears stay bf16; inductor's GEMM converts in registers.
        mode = "max-autotune-no-cudagraphs"
        # Its tables of kernel timings (several per case) would bury the suite's own output.
        inductor_config.autotune_num_choices_displayed = 0
        inductor_config.max_autotune_report_choices_stats = False
    if mode is None and weight.device.type == "cuda" and model.tp.world_size == 1:
        # CUDA graphs (inductor's cudagraph trees): a decode step is hundreds of small kernels whose launches
        # cost more than their work; a graph replays them as one. Not at world size > 1 until nccl is seen captured.
        mode = "reduce-overhead"
    return torch.compile(model.forward, mode=mode)
