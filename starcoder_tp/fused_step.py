"""A decode step's layers by one call of our library (fused_step.c) where every piece of them runs
our kernels already: the linears in panels (panels.py), the attention by attend.c
(decode_attention.py). The same kernels, on the same inputs, with the same roundings as the layers
run op by op; what goes is the Python between them (~90 us a layer at batch 1 in the bench-size
model, more with its caches evicted by the weights' stream). At world size 1 one call runs every
layer; between ranks, one call per row-parallel linear, the all-reduce between them (comm.py).

It takes GPTBigCode's layers as the model holds them: learned positions (no RoPE), fused q/k/v rows
[q | k | v] (multi-query, or grouped), no sliding window, an activation panels.c applies, every
linear laid out in panels for the decode batch, attend.c chosen for the decode attention, a
decode step with no mask (no left padding) and an int slot. Anything else runs op by op, as does
everything with STARCODER_TP_FUSED_STEP=0 (`why_not` says which). A fused step runs no layer
hooks: the heartbeat ticks once per step (parallel.Heartbeat), as for a compiled step.
"""
from __future__ import annotations

import ctypes
import os

import torch

from . import decode_attention, panels, rowdot
from .activations import ACTIVATIONS

ENV = "STARCODER_TP_FUSED_STEP"  # "0": every step op by op (A/B timing, a suspected kernel)
DIMS = (  # fused_step.c's dims[], in order
    "batch", "embd", "heads", "kv_heads", "head_dim", "inner", "kv_b", "kv_h", "act", "dot", "bf16")


def _layer_tensors(block) -> tuple:
    """A block's tensors in fused_step.c's order (its SLOTS): the linears' weights in panels."""
    attn, mlp = block.attn, block.mlp
    return (block.ln_1.weight, block.ln_1.bias, attn.c_attn.packed, attn.c_attn.bias, attn.k_cache, attn.v_cache,
            attn.c_proj.packed, attn.c_proj.bias, block.ln_2.weight, block.ln_2.bias, mlp.c_fc.packed, mlp.c_fc.bias,
            mlp.c_proj.packed, mlp.c_proj.bias)


def _library():
    lib, _ = rowdot.library()
    if lib is None:
        return None
    if not getattr(lib.fused_step, "argtypes", None):
        lib.fused_step.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long] + [ctypes.c_void_p] * 6 + [
            ctypes.c_long, ctypes.c_float, ctypes.c_float]
        lib.fused_step.restype = ctypes.c_int
    return lib


def why_not(model) -> str | None:
    """Why `model`'s decode steps at its present layout and cache run op by op; None where they fuse."""
    config, attn = model.config, model.transformer.h[0].attn
    dtype = model.transformer.ln_f.weight.dtype
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if model.transformer.ln_f.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return f"not a CPU fp32 or bf16 model ({model.transformer.ln_f.weight.device.type}, {dtype})"
    if _library() is None:
        return f"our kernels' library is not built ({rowdot.library()[1]})"
    if model.compiled_decode is not None:
        return "the decode step is compiled"
    if model.inv_freq is not None or attn.interleaved or model.window is not None:
        return "rotary positions, per-head interleaved q/k/v or a sliding window"
    _, post_op, algorithm = ACTIVATIONS[config.activation_function]
    if not panels.fuses(post_op, algorithm):
        return f"panels.c does not apply {config.activation_function}"
    if not decode_attention.DECODE_FORM.ours:
        return "the decode attention runs SDPA"
    if attn.head_dim % 16 or attn.local_heads % attn.local_kv_heads:
        return f"attend.c does not take {attn.local_heads} heads of {attn.head_dim} over {attn.local_kv_heads} K/V heads"
    for block in model.transformer.h:
        for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            if linear.decode_kernel != "panels":
                return f"a linear's decode kernel is {linear.decode_kernel}, not panels"
            if linear.packed_kind != "panels":
                return "a linear's weight is not laid out in panels"
    if attn.k_cache is None or model.kernel_rows != model.cache_batch:
        return "no cache, or one laid out for another batch than the kernels"
    return None


class FusedStep:
    """The pointers, shape and scratch of one layout and cache: made again when either changes
    (TPCausalLM invalidates it), and it holds what it points to."""

    def __init__(self, model):
        config, blocks, tp = model.config, model.transformer.h, model.tp
        attn = blocks[0].attn
        self.dtype = model.transformer.ln_f.weight.dtype
        self.batch, self.cache_len, self.tp, self.lib = model.cache_batch, model.cache_len, tp, _library()
        held = [t for block in blocks for t in _layer_tensors(block) if t is not None]
        assert all(t.is_contiguous() and t.dtype == self.dtype for t in held), "fused_step: a tensor out of layout"
        pointers = [None if t is None else t.data_ptr() for block in blocks for t in _layer_tensors(block)]
        self.held, self.layers = held, (ctypes.c_void_p * len(pointers))(*pointers)
        _, post_op, algorithm = ACTIVATIONS[config.activation_function]
        heads, kv_heads, head_dim = attn.local_heads, attn.local_kv_heads, attn.head_dim
        inner = blocks[0].mlp.c_fc.out_features
        dims = dict(batch=self.batch, embd=config.n_embd, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                    inner=inner, kv_b=attn.k_cache.stride(0), kv_h=attn.k_cache.stride(1),
                    act=panels.ACTIVATIONS[(post_op, algorithm)],
                    dot=int(self.dtype == torch.bfloat16 and decode_attention.bf16_dot()),
                    bf16=int(self.dtype == torch.bfloat16))
        self.dims = (ctypes.c_long * len(DIMS))(*(dims[name] for name in DIMS))
        per_row = 2 * config.n_embd + (heads + 2 * kv_heads) * head_dim + heads * head_dim + inner
        self.scratch = torch.empty(self.batch * per_row, dtype=self.dtype)
        self.partial = torch.empty(self.batch, 1, config.n_embd, dtype=self.dtype)
        self.proj_biases = [None if m.bias is None else m.bias.data_ptr()
                            for block in blocks for m in (block.attn.c_proj, block.mlp.c_proj)]
        self.segments = 2 * len(blocks)
        self.eps, self.scale = config.layer_norm_epsilon, attn.scale

    def takes(self, x: torch.Tensor, start: int | torch.Tensor) -> bool:
        """Whether this step is one it runs: one token per sequence of the cache's batch, an int slot
        inside the cache (the caller has checked there is no mask and no rotary)."""
        return (isinstance(start, int) and x.shape[1] == 1 and x.shape[0] == self.batch and 0 <= start < self.cache_len
                and x.dtype == self.dtype and decode_attention.DECODE_FORM.ours and not torch.compiler.is_compiling())

    def run(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Every layer on x [B, 1, E] for the token at cache slot `start`; returns the residual after them."""
        x = x.clone(memory_format=torch.contiguous_format)  # the residual, written in place
        call, scratch, dims = self.lib.fused_step, self.scratch.data_ptr(), self.dims
        if self.tp.world_size == 1:
            self._check(call(self.layers, 0, self.segments, x.data_ptr(), None, None, None, scratch, dims, start,
                             self.eps, self.scale), start)
            return x
        incoming = bias = None
        for segment in range(self.segments + 1):  # the last call adds the last segment's sum and no more
            run = min(segment + 1, self.segments)
            self._check(call(self.layers, segment, run, x.data_ptr(), incoming, bias,
                             self.partial.data_ptr() if run > segment else None, scratch, dims, start,
                             self.eps, self.scale), start)
            if run > segment:
                incoming = self.tp.all_reduce_(self.partial).data_ptr()
                bias = self.proj_biases[segment]
        return x

    def _check(self, code: int, start: int) -> None:
        if code == -1:
            raise MemoryError(f"fused_step: attend.c could not allocate its scratch for {start + 1} keys")
        assert code == 0, f"fused_step.c refused its arguments ({code})"
