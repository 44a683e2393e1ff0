"""A lean tensor-parallel GPTBigCode (StarCoder) with a static KV cache.

Each rank holds its part as cut by shard.py: its query heads (plus the whole single K/V head
of multi-query attention), its slice of the MLP, its rows of the padded vocabulary. Two
all-reduces per layer (after the row-parallel `c_proj`s, before their replicated bias), one
in the vocabulary-parallel embedding, and a small all-gather for the distributed argmax.
Parameter names are Hugging Face's, so a part loads with `load_state_dict(strict=True)`.
"""
from __future__ import annotations

import itertools
import math
import sys
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import NATIVE_BF16_MATMUL, Linear, linear, pack_weight, packed_linear, prepack_model


# A compiled decode step reaches the all-reduce as one opaque operator, so that the step stays
# one graph at any depth. As a graph break it cost a graph per layer and stopped compiling after
# dynamo's recompile limit (8): at world size 2 a 12-layer model ran 61 graphs, and the layers
# past the limit ran eager. Operators take no Python objects, hence the key of a registered group.
_GROUPS: weakref.WeakValueDictionary[int, TPGroup] = weakref.WeakValueDictionary()
_group_keys = itertools.count()


@torch.library.custom_op("starcoder_tp::all_reduce_", mutates_args=("t",))
def _all_reduce_op(t: torch.Tensor, group: int) -> None:
    _GROUPS[group]._all_reduce(t)


@_all_reduce_op.register_fake
def _(t: torch.Tensor, group: int) -> None:
    return None


def _drop_compiled_code() -> None:
    """Forget every graph compiled in this process, and free what they hold.

    The compiled decode step guards on the identity of the KV caches (freezing makes them part
    of the graph), so new caches always mean a new compile. Kept, the old graphs cost twice:
    past dynamo's recompile limit (8) every later case ran eager, silently (a suite run under
    --compile measured eager steps from its 9th case on); and each held its own frozen copy of
    the weights (bench-size model, fp32: a rank's memory grew 1481 -> 2048 -> 2613 -> 3177 MB
    over four cases). Inductor keeps its generated modules, which hold those copies as
    constants, in sys.modules; they go too. With this, the frozen weight tensors alive stayed
    at one compile's worth (33) over seven cases, and memory at 1481 -> 1489 -> 1495 MB for
    the first three (then it grew by 120-370 MB a case: the allocator keeping freed memory, as
    the live frozen tensors did not grow). Other compiled code in the process recompiles when
    next called.
    """
    torch._dynamo.reset()
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    PyCodeCache.cache_clear()
    root = cache_dir()
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(root):
            del sys.modules[name]


class TPGroup:
    """Rank, world size and the collectives the model needs; no-ops at world size 1.

    Collectives go through torch.distributed (gloo, nccl, hccl), or through a shared-memory
    communicator (shm_comm.ShmComm) when the ranks share one CPU host.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, shm=None):
        self.rank, self.world_size, self.shm = rank, world_size, shm
        self.key = next(_group_keys)
        _GROUPS[self.key] = self

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            if torch.compiler.is_compiling():
                torch.ops.starcoder_tp.all_reduce_(t, self.key)
            else:  # eager: no op dispatch on the hot path
                self._all_reduce(t)
        return t

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self.shm is not None:
            self.shm.all_reduce_(t)
        else:
            dist.all_reduce(t)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[N, *t.shape]: every rank's `t`, in rank order."""
        if self.world_size == 1:
            return t.unsqueeze(0)
        return self._all_gather(t)

    @torch.compiler.disable
    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.shm is not None:
            return self.shm.all_gather(t)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    def barrier(self, device: torch.device) -> None:
        """Every rank waits here for the others (a one-element all-reduce: microseconds on shm)."""
        if self.world_size > 1:
            self._all_reduce(torch.zeros(1, device=device))

    def all_reduce_max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            if self.shm is not None:
                t.copy_(self.shm.all_gather(t).amax(dim=0))
            else:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def _activation(name: str):
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    return F.relu


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.head_dim = config.head_dim
        self.local_heads = config.n_head // tp.world_size
        self.local_kv_heads = 1 if config.multi_query else self.local_heads
        self.multi_query = config.multi_query
        qkv_rows = (self.local_heads + 2 * self.local_kv_heads) * self.head_dim
        self.c_attn = Linear(config.n_embd, qkv_rows)
        self.c_proj = Linear(self.local_heads * self.head_dim, config.n_embd)
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.k_cache: torch.Tensor | None = None  # [B, KV, S_max, D]
        self.v_cache: torch.Tensor | None = None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [B, T, E] -> q [B, T, H, D], k and v [B, T, KV, D]
        b, t, _ = x.shape
        h, d = self.local_heads, self.head_dim
        qkv = self.c_attn(x)
        if self.multi_query:
            q = qkv[..., : h * d].view(b, t, h, d)
            k = qkv[..., h * d : (h + 1) * d].view(b, t, 1, d)
            v = qkv[..., (h + 1) * d :].view(b, t, 1, d)
            return q, k, v
        per_head = qkv.view(b, t, h, 3 * d)  # HF's per-head interleaved [q_h | k_h | v_h]
        return per_head[..., :d], per_head[..., d : 2 * d], per_head[..., 2 * d :]

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        # Row-parallel: partial sums all-reduced, then the bias added once.
        return self.tp.all_reduce_(self.c_proj(out, add_bias=False)) + self.c_proj.bias

    def forward(self, x: torch.Tensor, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B, T, E]; start: first cache slot written; mask: [B, 1, T*G or 1, S] with S = start + T,
        # or None when no slot is padding (then T > 1 only at start 0: plain causal attention)
        b, t, _ = x.shape
        h, kv, d = self.local_heads, self.local_kv_heads, self.head_dim
        q, k, v = self._qkv(x)
        end = start + t
        self.k_cache[:, :, start:end] = k.transpose(1, 2)
        self.v_cache[:, :, start:end] = v.transpose(1, 2)
        keys, values = self.k_cache[:, :, :end], self.v_cache[:, :, :end]  # [B, KV, S, D]
        if mask is None:
            # No padding: SDPA's own causal masking (flash path, no mask in memory). The K/V
            # head is broadcast to the query heads by expand, a view: nothing is repeated.
            q = q.transpose(1, 2)  # [B, H, T, D]
            keys, values = keys.expand(b, h, end, d), values.expand(b, h, end, d)
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, scale=self.scale)
            out = out.transpose(1, 2).reshape(b, t, h * d)
        else:
            # Padding: fold the G query heads that share a K/V head into the query length and
            # mask explicitly, so the single K/V head of multi-query attention is never repeated.
            g = h // kv
            q = q.reshape(b, t, kv, g, d).permute(0, 2, 1, 3, 4).reshape(b, kv, t * g, d)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            out = out.view(b, kv, t, g, d).permute(0, 2, 1, 3, 4).reshape(b, t, h * d)
        return self._output(out)

    def forward_static(self, x: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One decode step with the same shapes at every position, for torch.compile: the new
        K/V written at `slot` ([1] long, a tensor, not a Python int), attention over the whole
        static cache, the slots not yet written masked out.
        x: [B, 1, E]; mask: [B, 1, 1, S_max] bool."""
        b = x.shape[0]
        h, kv, d = self.local_heads, self.local_kv_heads, self.head_dim
        q, k, v = self._qkv(x)
        self.k_cache.index_copy_(2, slot, k.transpose(1, 2))
        self.v_cache.index_copy_(2, slot, v.transpose(1, 2))
        g = h // kv
        q = q.reshape(b, kv, g, d)  # the G query heads of a K/V head as its query length
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, scale=self.scale)
        return self._output(out.reshape(b, 1, h * d))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.tp = tp
        local_inner = config.n_inner // tp.world_size
        self.c_fc = Linear(config.n_embd, local_inner)
        self.c_proj = Linear(local_inner, config.n_embd)
        self.act = _activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.c_fc(x))
        return self.tp.all_reduce_(self.c_proj(hidden, add_bias=False)) + self.c_proj.bias


class Block(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, tp)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, tp)

    def forward(self, x: torch.Tensor, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), start, mask)
        return x + self.mlp(self.ln_2(x))

    def forward_static(self, x: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.forward_static(self.ln_1(x), slot, mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        local_vocab = config.padded_vocab_size(tp.world_size) // tp.world_size
        self.wte = nn.Embedding(local_vocab, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, tp) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class TPGPTBigCode(nn.Module):
    """One rank's part of a GPTBigCodeForCausalLM."""

    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.config, self.tp = config, tp
        self.transformer = Transformer(config, tp)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.n_embd, self.transformer.wte.num_embeddings, bias=False)
        self.local_vocab = self.transformer.wte.num_embeddings
        self.vocab_start = tp.rank * self.local_vocab
        # Padding rows past the real vocabulary must never win the argmax.
        self.valid_local_vocab = max(0, min(self.local_vocab, config.vocab_size - self.vocab_start))
        self.cache_batch = 0
        self.cache_len = 0
        self.lm_head_packed: torch.Tensor | None = None
        self.pack_rows: int | None = None  # set by prepack: the decode batch the weights are packed for
        self.pack_force = False
        self.compiled_decode = None  # set by compile_decode: decode steps go through decode_static
        self.step_hook = None  # called after every decode step (a heartbeat where layer hooks do not run)

    def prepack(self, force: bool = False, rows: int = 1) -> int:
        """Pre-pack the linear weights for oneDNN, for decode steps of `rows` rows, where it pays
        (every one with `force`; see linear.py); the lm_head tied to the embedding gets a packed
        copy, since the embedding still needs the plain rows. From then on `setup_cache` re-packs
        for each new batch size. Returns how many weights are packed."""
        count = prepack_model(self, force, rows)
        if self.config.tie_word_embeddings:
            self.lm_head_packed = None  # the old copy goes before the new one is made
            self.lm_head_packed = pack_weight(self.transformer.wte.weight, force, rows)
            count += self.lm_head_packed is not None
        self.pack_rows, self.pack_force = rows, force
        return count

    def compile_decode(self, mode: str | None = None) -> None:
        """Run decode steps through torch.compile (inductor) of `decode_static`. Compiling takes
        seconds to minutes per batch size and cache length (11-25 s each on the bench-size model
        here); what it buys depends on the machine (benchmarks/speed.py, profile_step.py). Not
        with pre-packed weights: inductor packs the weights itself (freezing), and cannot take
        oneDNN's opaque tensors."""
        if next(self.packed_weights(), None) is not None:
            raise ValueError("compile_decode: the model's weights are pre-packed; load it with prepack=False")
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights as constants: inductor re-lays them out for its GEMMs
        weight = self.transformer.ln_f.weight
        if mode is None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not NATIVE_BF16_MATMUL:
            # bf16 without bf16 arithmetic: linear.py's fp32 path, traced, would be folded into
            # fp32 copies of the weights (twice the model's memory more: bench-size model resident
            # 3.0 GB after a batch-16 case, against 1.8 GB this way). Instead the linears stay bf16
            # and inductor's own GEMM (max-autotune) converts in registers; side by side
            # (speed.py) its decode step took 23.8 ms at batch 1 (eager 38.3) and 161 at batch 16
            # (eager 194), where the folded fp32 path had taken 33 and 143 in separate runs.
            mode = "max-autotune-no-cudagraphs"
            # Its tables of kernel timings (several per case) would bury the suite's own output.
            inductor_config.autotune_num_choices_displayed = 0
            inductor_config.max_autotune_report_choices_stats = False
        if mode is None and weight.device.type == "cuda" and self.tp.world_size == 1:
            # CUDA graphs (inductor's cudagraph trees): at decode batch sizes a step is hundreds of
            # small kernels whose launches cost more than their work; a graph replays them as one.
            # Not yet run on a GPU (none lent to this project so far); not at world size > 1
            # until the all-reduce (nccl) has been seen captured inside such a graph.
            mode = "reduce-overhead"
        self.compiled_decode = torch.compile(self.decode_static, mode=mode)

    def packed_weights(self):
        """The oneDNN-packed weights (empty when not pre-packed)."""
        yield from (m.packed for m in self.modules() if getattr(m, "packed", None) is not None)
        if self.lm_head_packed is not None:
            yield self.lm_head_packed

    def setup_cache(self, batch: int, max_seq_len: int) -> None:
        """Allocate the static KV cache once; later calls with a fitting shape reuse it. A
        pre-packed model is re-packed for a new batch size here (outside any timed region)."""
        if self.pack_rows is not None and self.pack_rows != batch:
            self.prepack(self.pack_force, batch)
        if batch == self.cache_batch and max_seq_len <= self.cache_len:
            return
        if self.compiled_decode is not None and self.cache_batch:
            _drop_compiled_code()  # the compiled step of the old caches can never run again
        weight = self.transformer.ln_f.weight
        for block in self.transformer.h:
            attn = block.attn
            shape = (batch, attn.local_kv_heads, max_seq_len, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            attn.v_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.cache_batch, self.cache_len = batch, max_seq_len

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # input_ids, position_ids: [B, T] -> [B, T, E]
        wte = self.transformer.wte.weight
        if self.tp.world_size == 1:
            tokens = F.embedding(input_ids, wte)
        else:
            local = input_ids - self.vocab_start
            outside = (local < 0) | (local >= self.local_vocab)
            tokens = F.embedding(local.masked_fill(outside, 0), wte)
            tokens.masked_fill_(outside.unsqueeze(-1), 0.0)
            self.tp.all_reduce_(tokens)
        return tokens + self.transformer.wpe(position_ids)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, start: int,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Run T new tokens written at cache slots [start, start+T); returns this rank's logits
        for the last position, [B, local_vocab] (padding columns at -inf).

        key_valid: [B, S_max] bool, False for left-padding slots; None when there is no padding
        (then no mask is built: causal attention by SDPA itself, the fast path).
        """
        b, t = input_ids.shape
        end = start + t
        if key_valid is None and t > 1 and start > 0:  # SDPA's is_causal aligns top-left: wrong here
            key_valid = torch.ones((b, end), dtype=torch.bool, device=input_ids.device)
        mask = None if key_valid is None else self._attention_mask(key_valid[:, :end], start, t)
        x = self.embed(input_ids, position_ids)
        for block in self.transformer.h:
            x = block(x, start, mask)
        return self._logits(self.transformer.ln_f(x[:, -1]))

    def decode_static(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor,
                      key_valid: torch.Tensor) -> torch.Tensor:
        """One decode step whose shapes do not change from step to step (what torch.compile and
        CUDA graphs need): token, position [B, 1]; slot [1] long, the cache slot written;
        key_valid [B, S_max] bool, False on left padding. Returns this rank's logits [B, V_local]."""
        slots = torch.arange(key_valid.shape[1], device=key_valid.device)
        mask = (key_valid & (slots <= slot))[:, None, None, :]  # [B, 1, 1, S_max]
        x = self.embed(token, position)
        for block in self.transformer.h:
            x = block.forward_static(x, slot, mask)
        return self._logits(self.transformer.ln_f(x[:, -1]))

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        # last: [B, E] -> [B, V_local]
        if self.lm_head_packed is not None:
            logits = packed_linear(last, self.lm_head_packed, None)  # [B, V_local]
        elif self.config.tie_word_embeddings:
            logits = linear(last, self.transformer.wte.weight)
        else:
            logits = self.lm_head(last)
        if self.valid_local_vocab < self.local_vocab:
            logits[:, self.valid_local_vocab :] = float("-inf")
        return logits

    def _attention_mask(self, key_valid: torch.Tensor, start: int, t: int) -> torch.Tensor:
        # key_valid: [B, S]. Query i (slot start+i) sees valid slots <= its own, and always
        # itself, so that a padding row is never fully masked (SDPA would give NaN).
        b, s = key_valid.shape
        slots = torch.arange(s, device=key_valid.device)
        query_slots = torch.arange(start, start + t, device=key_valid.device).unsqueeze(-1)  # [T, 1]
        mask = (key_valid[:, None, :] & (slots <= query_slots)) | (slots == query_slots)  # [B, T, S]
        if t == 1:
            return mask.unsqueeze(1)  # [B, 1, 1, S]: broadcast over the folded query heads
        g = self.transformer.h[0].attn.local_heads // self.transformer.h[0].attn.local_kv_heads
        return mask[:, None, :, None, :].expand(b, 1, t, g, s).reshape(b, 1, t * g, s)

    def pick_greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """The global argmax over the vocabulary shards, without gathering the logits: [B].

        Ties go to the lowest token id, as torch.argmax over the full logits does.
        """
        local_idx = logits.argmax(dim=-1)  # [B]
        if self.tp.world_size == 1:
            return local_idx
        local_val = logits.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1)
        packed = torch.stack([local_val.double(), (local_idx + self.vocab_start).double()], dim=-1)  # [B, 2]
        gathered = self.tp.all_gather(packed)  # [N, B, 2]
        best_rank = gathered[..., 0].argmax(dim=0)  # [B]; first maximum = lowest rank = lowest id
        return gathered[best_rank, torch.arange(logits.shape[0], device=logits.device), 1].long()

    def topk(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global top-k (log-probabilities, token ids), [B, k] each; for comparisons in tests."""
        local_max = logits.float().max(dim=-1, keepdim=True).values
        global_max = self.tp.all_reduce_max_(local_max.clone())
        sum_exp = self.tp.all_reduce_((logits.float() - global_max).exp().sum(-1, keepdim=True))
        logprobs = logits.float() - global_max - sum_exp.log()
        vals, idx = logprobs.topk(min(k, self.local_vocab), dim=-1)
        packed = torch.cat([vals.double(), (idx + self.vocab_start).double()], dim=-1)  # [B, 2k]
        gathered = self.tp.all_gather(packed)  # [N, B, 2k]
        kk = vals.shape[-1]
        all_vals = gathered[..., :kk].permute(1, 0, 2).reshape(logits.shape[0], -1)
        all_ids = gathered[..., kk:].permute(1, 0, 2).reshape(logits.shape[0], -1)
        top_vals, pos = all_vals.topk(k, dim=-1)
        return top_vals.float(), all_ids.gather(-1, pos).long()
