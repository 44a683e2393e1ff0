"""A decode step's layers by one call of our library (fused_step.c) where every piece of them runs
our kernels already: the linears in panels (panels.py), the attention by attend.c
(decode_attention.py). The same kernels, on the same inputs, each output rounded where the layers
run op by op round it (only the LayerNorm's moments are summed otherwise); what goes is the Python
between them (0.7 ms of a batch-1 step in the bench-size model, more with its caches evicted by the
weights' stream: RESULTS.md, "Layers in one call"). At world size 1 one call runs every
layer; between ranks, one call per row-parallel linear, the all-reduce between them (comm.py).
Where the decode attention was measured faster with SDPA (decode_attention.DECODE_FORM), attend.c does
not run on this CPU (it needs AVX-512) or does not take the heads, the attention runs between two calls,
as the layers run it (attention.attend).

It takes GPTBigCode's and StarCoder2's layers as the model holds them: learned or rotary positions (the
step's cos and sin passed in), fused q/k/v rows [q | k | v] (multi-query, or grouped), a sliding window only
where the cache fits inside it (no key ever falls out of it), an activation panels.c applies, every
linear laid out in panels for the decode batch, a decode step with no mask (no left padding) and an
int slot. Anything else runs op by op, as does everything with STARCODER_TP_FUSED_STEP=0 (`why_not`
says which). A fused step runs no layer hooks: the heartbeat ticks once per step
(rank.Heartbeat), as for a compiled step.
"""
from __future__ import annotations

import ctypes
import os

import torch

from . import decode_attention, panels, rowdot
from .attention import attend
from .activations import ACTIVATIONS
from .linear import Linear

ENV = "STARCODER_TP_FUSED_STEP"  # "0": every step op by op (A/B timing, a suspected kernel); "1" (default): fuse
DIMS = (  # fused_step.c's dims[], in order
    "layers", "batch", "embd", "heads", "kv_heads", "head_dim", "inner", "kv_b", "kv_h", "act", "dot", "bf16")


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
            ctypes.c_long, ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
        lib.fused_step.restype = ctypes.c_int
    return lib


def _calls(layers: int, attention_inside: bool, between_ranks: bool,
           proj_biases: list[int | None]) -> list[tuple[int, int, str | None, int | None]]:
    """fused_step.c's calls for a step: (first phase, end, then, bias) with `then` what the caller does
    after it: "attend" (the attention, where it runs outside), "sum" (the all-reduce of a c_proj's
    partial, whose bias the next call adds) or nothing. Phases: 4 a layer (fused_step.c)."""
    calls, first = [], 0
    for phase in range(4 * layers):
        if phase % 4 == 1 and not attention_inside:
            first = phase + 1  # (phase 1: the caller runs the attention)
        elif phase % 4 == 0 and not attention_inside:
            calls.append((first, phase + 1, "attend", None))
        elif phase % 4 >= 2 and between_ranks:
            calls.append((first, phase + 1, "sum", proj_biases[2 * (phase // 4) + phase % 4 - 2]))
            first = phase + 1
    calls.append((first, 4 * layers, None, None))  # the rest; between ranks, the last sum folded in
    return calls


def why_not(model) -> str | None:
    """Why `model`'s decode steps at its present layout and cache run op by op; None where they fuse."""
    config, attn = model.config, model.transformer.h[0].attn
    dtype = model.transformer.ln_f.weight.dtype
    wanted = os.environ.get(ENV, "1")
    if wanted not in ("0", "1"):
        raise ValueError(f"{ENV}={wanted!r}: expected 0 (every decode step op by op) or 1 (fuse where possible)")
    if wanted == "0":
        return f"{ENV}=0"
    if model.transformer.ln_f.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return f"not a CPU fp32 or bf16 model ({model.transformer.ln_f.weight.device.type}, {dtype})"
    if _library() is None:
        return f"our kernels' library is not built ({rowdot.library()[1]})"
    if model.compiled_decode is not None:
        return "the decode step is compiled"
    if attn.interleaved:
        return "per-head interleaved q/k/v rows (multi-head GPTBigCode)"
    if model.inv_freq is not None and attn.head_dim % 2:
        return f"rotary positions on a head_dim of {attn.head_dim} (fused_step.c rotates even ones)"
    if model.window is not None and model.cache_len > model.window:
        return f"a sliding window ({model.window}) shorter than the cache ({model.cache_len} slots)"
    _, post_op, algorithm = ACTIVATIONS[config.activation_function]
    if not panels.fuses(post_op, algorithm):
        return f"panels.c does not apply {config.activation_function}"
    for linear in linears(model):
        if linear.decode_kernel != "panels":
            return f"a linear's decode kernel is {linear.decode_kernel}, not panels"
        if linear.packed_kind != "panels":
            return "a linear's weight is not laid out in panels"
    if attn.k_cache is None or model.kernel_rows != model.cache_batch or any(
            model.cache_batch * linear.in_features > linear.decode_numel for linear in linears(model)):
        return "no cache, or one whose batch the linears are not laid out for"
    if any(t is not None and not (t.is_contiguous() and t.dtype == dtype)
           for block in model.transformer.h for t in _layer_tensors(block)):
        return f"a layer's tensor is not contiguous {dtype} (a LayerNorm kept in fp32?)"
    return None


def linears(model) -> list:
    return [linear for block in model.transformer.h
            for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]


def describe(fused: "FusedStep | None") -> str:
    """'; layers fused' for a model's fused step (',attention-between' where the attention runs between two
    calls), '' for None (op by op): its place in the plan's line."""
    if fused is None:
        return ""
    return "; layers fused" + ("" if fused.attention_inside else ",attention-between")


def _attention_inside(model) -> bool:
    """Whether fused_step.c runs the attention (attend.c) where the layers would: measured faster than SDPA,
    and a step's queries and cache it takes (decode_attention.supports, on views shaped as the step's)."""
    attn, b = model.transformer.h[0].attn, model.cache_batch
    qkv = attn.k_cache.new_empty(b, 1, (attn.local_heads + 2 * attn.local_kv_heads) * attn.head_dim)
    q = qkv[..., :attn.local_heads * attn.head_dim].view(b, 1, attn.local_heads, attn.head_dim)
    return decode_attention.DECODE_FORM.ours and decode_attention.supports(q, attn.k_cache, attn.v_cache, None)


class FusedStep:
    """The pointers, shape and scratch of one layout and cache: made again when either changes
    (TPCausalLM invalidates it), and it holds what it points to."""

    def __init__(self, model):
        config, blocks, tp = model.config, model.transformer.h, model.tp
        attn = blocks[0].attn
        self.dtype = model.transformer.ln_f.weight.dtype
        self.batch, self.cache_len, self.tp, self.lib = model.cache_batch, model.cache_len, tp, _library()
        tensors = [t for block in blocks for t in _layer_tensors(block)]
        self.held = [t for t in tensors if t is not None]
        assert all(t.is_contiguous() and t.dtype == self.dtype for t in self.held), "why_not lets no other through"
        self.layers = (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])
        self.layouts_made = Linear.layouts_made
        _, post_op, algorithm = ACTIVATIONS[config.activation_function]
        heads, kv_heads, head_dim = attn.local_heads, attn.local_kv_heads, attn.head_dim
        inner = blocks[0].mlp.c_fc.out_features
        dims = dict(layers=len(blocks), batch=self.batch, embd=config.n_embd, heads=heads, kv_heads=kv_heads,
                    head_dim=head_dim, inner=inner, kv_b=attn.k_cache.stride(0), kv_h=attn.k_cache.stride(1),
                    act=panels.ACTIVATIONS[(post_op, algorithm)],
                    dot=int(self.dtype == torch.bfloat16 and decode_attention.bf16_dot()),
                    bf16=int(self.dtype == torch.bfloat16))
        self.dims = (ctypes.c_long * len(DIMS))(*(dims[name] for name in DIMS))
        per_row = 2 * config.n_embd + (heads + 2 * kv_heads) * head_dim + heads * head_dim + inner
        self.scratch = torch.empty(self.batch * per_row, dtype=self.dtype)
        self.partial = torch.empty(self.batch, 1, config.n_embd, dtype=self.dtype)
        self.sum_partial = tp.bound_all_reduce_(self.partial)  # (its checks made once: 2 calls a layer)
        self.decode_ours = decode_attention.DECODE_FORM.ours
        # fused_step.c's scratch: [B, E] normalised rows, [B, QKV] q/k/v, [B, H * D] attention output, ...
        offset = config.n_embd * self.batch
        qkv = self.scratch[offset:offset + self.batch * (heads + 2 * kv_heads) * head_dim].view(self.batch, 1, -1)
        self.q = qkv[..., :heads * head_dim].view(self.batch, 1, heads, head_dim)  # [B, 1, H, D]
        offset += qkv.numel()
        self.attended = self.scratch[offset:offset + self.batch * heads * head_dim].view(self.batch, 1, -1)
        self.attentions = [block.attn for block in blocks]
        self.attention_inside = _attention_inside(model)
        biases = [m.bias for block in blocks for m in (block.attn.c_proj, block.mlp.c_proj)]
        self.calls = _calls(len(blocks), self.attention_inside, tp.world_size > 1,
                            [None if b is None else b.data_ptr() for b in biases])
        self.eps, self.scale, self.head_dim = config.layer_norm_epsilon, attn.scale, head_dim
        self.rotary = model.inv_freq is not None

    def takes(self, x: torch.Tensor, start: int) -> bool:
        """Whether this decode step is one it runs: the cache's batch, a slot inside the cache (the caller has
        checked it is one token a sequence at an int slot, eager, with no mask)."""
        return x.shape[0] == self.batch and 0 <= start < self.cache_len and x.dtype == self.dtype

    def stale(self) -> bool:
        """Whether a weight was laid out again since it was made (Linear.use_kernels, whichever model's: a
        count), or the decode attention's form changed: then it is made again before the next step. (A
        request's setup_cache makes it again first, outside the timed steps.)"""
        return Linear.layouts_made != self.layouts_made or decode_attention.DECODE_FORM.ours != self.decode_ours

    def run(self, x: torch.Tensor, start: int,
            rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Every layer on x [B, 1, E] for the token at cache slot `start`, `rotary` the step's (cos, sin)
        [B, 1, 1, D] where the model's positions are rotary; returns the residual after them."""
        x = x.clone(memory_format=torch.contiguous_format)  # the residual, written in place
        cos = sin = None
        if rotary is not None:  # (starcoder2.rotary_tables': the model's dtype, contiguous: no copy made here)
            rotary = tuple(t.contiguous() for t in rotary)
            assert all(t.dtype == self.dtype and t.numel() == self.batch * self.head_dim for t in rotary)
            cos, sin = (t.data_ptr() for t in rotary)
        assert (cos is not None) == self.rotary, "a model with rotary positions rotates every step"
        call, scratch, dims, partial = self.lib.fused_step, self.scratch.data_ptr(), self.dims, self.partial.data_ptr()
        residual = x.data_ptr()
        incoming = bias = None
        for first, end, then, then_bias in self.calls:
            into = partial if then == "sum" else None
            code = call(self.layers, first, end, residual, incoming, bias, into, scratch, dims, start, self.eps,
                        self.scale, cos, sin)
            self._check(code, start)
            incoming = bias = None
            if then == "sum":
                self.sum_partial()  # (in place)
                incoming, bias = partial, then_bias
            elif then == "attend":
                attn = self.attentions[end // 4]
                self.attended.copy_(attend(self.q, attn.k_cache[:, :, :start + 1], attn.v_cache[:, :, :start + 1],
                                           None, self.scale))
        return x

    def _check(self, code: int, start: int) -> None:
        if code == -1:
            raise MemoryError(f"fused_step: attend.c could not allocate its scratch for {start + 1} keys")
        if code != 0:  # (why_not lets through nothing the C refuses; if it did, not a step's worth of wrong logits)
            raise RuntimeError(f"fused_step.c refused its arguments ({code}) at slot {start}")
