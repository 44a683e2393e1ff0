"""A lean tensor-parallel StarCoder (GPTBigCode) and StarCoder2 with a static KV cache.

Each rank holds its part as cut by shard.py: its query heads and the K/V heads they use (the
whole single K/V head of multi-query attention), its slice of the MLP, its rows of the padded
vocabulary. Two all-reduces per layer (after the row-parallel `c_proj`s, before their
replicated bias), one in the vocabulary-parallel embedding, and a small all-gather for the
distributed argmax. The modules carry GPTBigCode's Hugging Face names, so a part loads with
`load_state_dict(strict=True)`; StarCoder2's names are mapped onto them at load
(starcoder2.py), where its positions become rotary instead of learned.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from .attention import Attention, attention_mask
from .comm import TPGroup
from .config import ModelConfig
from .embedding import Embedding
from . import argmax, forms, fused_step, fusion_choice, kernels, layouts, malloc, panel_asks, plan_weights
from .setup_phases import timed
from .compiled import compile_step, drop_compiled_code
from .kernels import KERNEL_MODES, Choice
from .linear import Linear, run_kernel
from .shard import load_part, part_tensor_reader
from .starcoder2 import RotaryCache, inverse_frequencies, rotary_tables, runtime_state


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.tp = tp
        local_inner = config.n_inner // tp.world_size
        self.c_fc = Linear(config.n_embd, local_inner, bias=config.use_bias)
        self.c_proj = Linear(local_inner, config.n_embd, bias=config.use_bias)
        self.activation = config.activation_function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj.row_parallel(self.c_fc.forward_activated(x, self.activation), self.tp)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, tp)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, tp)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor, mask: torch.Tensor | None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), start, mask, rotary)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        local_vocab = config.padded_vocab_size(tp.world_size) // tp.world_size
        self.wte = Embedding(local_vocab, config.n_embd)
        if config.rope_theta is None:  # learned positions (GPTBigCode); StarCoder2's are rotary
            self.wpe = nn.Embedding(config.n_positions, config.n_embd, _weight=torch.empty(config.n_positions, config.n_embd))
        self.h = nn.ModuleList(Block(config, tp) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class TPCausalLM(nn.Module):
    """One rank's part of a GPTBigCodeForCausalLM or a Starcoder2ForCausalLM."""

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
        self.cache_batch = self.cache_len = 0
        self.lm_head_packed: torch.Tensor | None = None  # the tied lm_head's packed copy (layouts.PACKERS)
        self.lm_head_kernel = "plain"
        self.kernel_mode = "plain"  # kernels.KERNEL_MODES; set by use_kernels
        self.setup_s: dict[str, float] = {}  # the last setup_cache's phases, seconds (setup_phases.py)
        self.kernel_rows: int | None = None  # the decode batch the kernels are laid out for
        self.kernel_plan: dict[str, Choice] = {}  # the kernels laid out
        self.weighed_plan: dict[str, Choice] = {}  # the plan's own choice for the request (fusion_choice)
        self.kernel_timings: dict[str, Choice] = {}  # the plan as measured (or fixed), before weighing
        self.kernel_request: tuple[int, int] | None = None  # (prompt rows, decode steps) it was weighed for
        self.kernel_plan_source = "fixed"  # "measured", "cached" or "fixed"
        self.progress_hooks: list = []  # called while kernels are measured and laid out (a rank's heartbeat)
        self.compiled_decode = None  # set by compile_decode: decode steps run the fixed-shape step compiled
        self.fused: fused_step.FusedStep | None | bool = False  # the layers in one call (False: not decided yet)
        self.window = config.sliding_window
        self.inv_freq: torch.Tensor | None = None  # [D / 2] fp32, set by load_model for RoPE models
        self.rotary_cache: RotaryCache | None = None  # their cos and sin at every cache slot, with the cache

    def use_kernels(self, mode: str = "auto", rows: int = 1, request: tuple[int, int] | None = None) -> int:
        """Choose every linear weight's kernels for decode batches of `rows` rows (kernels.py: `auto` measures,
        or takes this machine's cached plan; else one kernel for all) and lay the weights out for them; then
        `setup_cache` does it again for each new batch size. Every rank calls this in step (the GELU's and
        attention's forms are measured across ranks, with `auto` the kernels); a `request` (prompt rows, steps)
        weighs each layout's prefill against its steps (kernels.weigh). Returns how many are packed."""
        if mode not in kernels.KERNEL_MODES:
            raise ValueError(f"kernels mode {mode!r} is not one of {list(kernels.KERNEL_MODES)}")
        weights, prefill, activated, step_bytes = plan_weights.by_shape(
            self, self.config.activation_function, self.transformer.wte if self.config.tie_word_embeddings else None)
        if self.transformer.ln_f.weight.device.type != "cpu":
            mode = "plain"  # the kernels chosen here are CPU ones
        else:
            with timed(self.setup_s, "forms"):
                forms.calibrate_forms(weights, activated, self.tp, self.transformer.h[0].attn, self._tick)
        if mode == "auto":
            with timed(self.setup_s, "kernel plan"):
                self.kernel_timings, self.kernel_plan_source = kernels.cached_or_measured(
                    weights, rows, self.tp, prefill, activated, self._tick, step_bytes)
        else:
            self.kernel_timings = {s: kernels.fixed_choice(mode, w, rows) for s, w in weights.items()}
            self.kernel_plan_source = "fixed"
        del weights  # the copies of packed weights read back for a measurement or a fixed mode's trial
        self.kernel_mode = mode
        with timed(self.setup_s, "lay-out"):
            return self.lay_out(self._weighed(request, rows), rows)

    def _weighed(self, request: tuple[int, int] | None, rows: int) -> dict[str, Choice]:
        """The plan to lay out for `request` at `rows` decode rows: measured timings weighed for it (fixed
        modes: as they are), kept as `weighed_plan`; then, where this process timed the step fused against
        it, the faster way for the request (fusion_choice.applied)."""
        self.kernel_request = request if self.kernel_mode == "auto" else None
        self.weighed_plan = {shape: kernels.weigh(choice, *request) if self.kernel_request else choice
                             for shape, choice in self.kernel_timings.items()}
        return fusion_choice.applied(self, self.weighed_plan, rows, self.kernel_request)

    def lay_out(self, plan: dict[str, Choice], rows: int) -> int:
        """Lay every weight out for `plan` at `rows` decode rows; returns how many are packed."""
        previous, self.kernel_plan, count, self.fused = self.kernel_plan, plan, 0, False
        for linear in [m for m in self.modules() if isinstance(m, Linear)]:
            count += linear.use_kernels(plan[linear.shape_key()], rows)
            self._tick()  # re-packing a large model, and reading MKL's layouts back from disk, takes a while
        if self.config.tie_word_embeddings:
            wte, key = self.transformer.wte, self.transformer.wte.shape_key()
            decode = plan[key].decode
            if layouts.relaid(decode, self.kernel_rows, rows) or key not in previous or previous[key].decode != decode:
                plain = wte.held_plain()  # (unpacked where the embedding read the old panels)
                self.lm_head_packed = None  # the old copy goes before the new one is made
                if decode in layouts.PACKERS:
                    self.lm_head_packed = layouts.PACKERS[decode](plain, rows)
                wte.share(self.lm_head_packed if decode == "panels" else None)
            self.lm_head_kernel = "plain" if decode in layouts.PACKERS and self.lm_head_packed is None else decode
            count += self.lm_head_packed is not None
        self.kernel_rows = rows
        return count

    def _tick(self) -> None:
        """The rank's heartbeat (progress_hooks) through long work outside the layers' forwards."""
        for hook in self.progress_hooks:
            hook()

    def kernels_summary(self) -> str:
        """The plan in one line: mode, where it came from, each shape's decode/prefill kernel."""
        if self.compiled_decode is not None:
            return "compiled"
        if self.kernel_rows is None:
            return f"{self.kernel_mode} (chosen at the first request)"
        weighed = "" if self.kernel_request is None else (
            f", weighed for {self.kernel_request[0]} prompt rows + {self.kernel_request[1]} steps")
        return (f"{self.kernel_mode} ({self.kernel_plan_source}, batch {self.kernel_rows}{weighed}): "
                f"{kernels.describe(self.kernel_plan)}{argmax.describe(self.kernel_rows, self.local_vocab)}"
                f"{fusion_choice.describe(self)}{panel_asks.describe()}{fused_step.describe(self.fused_layers())}"
                f"{self.tp.describe()}")

    def compile_decode(self, mode: str | None = None) -> None:
        """Run decode steps through torch.compile (inductor) of the fixed-shape step (`forward` with a tensor
        `start`): compiled.compile_step. Compiling takes seconds to minutes per batch size and cache length;
        what it buys depends on the machine (benchmarks/RESULTS.md)."""
        self.compiled_decode, self.fused = compile_step(self, mode), False

    def packed_weights(self):
        """The packed weights, oneDNN's or MKL's (empty when not pre-packed)."""
        yield from (m.packed for m in self.modules() if getattr(m, "packed", None) is not None)
        if self.lm_head_packed is not None:
            yield self.lm_head_packed

    def setup_cache(self, batch: int, max_seq_len: int, request: tuple[int, int] | None = None) -> None:
        """Allocate the static KV cache once; later calls with a fitting shape reuse it. A pre-packed model is
        re-packed here (outside any timed region) for a new batch size, and with measured kernels for a `request`
        (prompt rows, decode steps) whose weighed layouts differ from those laid out (kernels.weigh; only those
        weights). Where only some shapes' kernels keep the layers from fusing, the step is timed fused against the
        plan, and the panels' asks for this batch are settled (fusion_choice.settle, panel_asks.settle: 1-2 s
        each, once per machine, model, plan and batch). Each phase's seconds go to `setup_s`."""
        self.setup_s = {}
        if self.kernel_mode != "plain" and self.kernel_rows != batch:
            self.use_kernels(self.kernel_mode, batch, request)
        elif self.kernel_mode == "auto" and request is not None and request != self.kernel_request:
            if (plan := self._weighed(request, batch)) != self.kernel_plan:
                with timed(self.setup_s, "lay-out"):
                    self.lay_out(plan, batch)
        with timed(self.setup_s, "cache"):
            if batch != self.cache_batch or max_seq_len > self.cache_len:
                self._allocate_cache(batch, max_seq_len)
        cpu = self.transformer.ln_f.weight.device.type == "cpu"
        with timed(self.setup_s, "fused step"):
            if cpu:  # fusion against the plan, timed (it may lay some weights out again)
                fusion_choice.settle(self, batch)
            self.fused_layers()  # (decided here, with the layout and the cache, before the timed steps)
        if cpu:  # the panels' asks, timed on the step as it will run
            with timed(self.setup_s, "panels' asks"):
                panel_asks.settle(self, batch)

    def _allocate_cache(self, batch: int, max_seq_len: int) -> None:
        if self.compiled_decode is not None and self.cache_batch:
            drop_compiled_code()  # the compiled step of the old caches can never run again
        self.fused = False  # (it holds the old caches: they go as the new ones come)
        weight = self.transformer.ln_f.weight
        for block in self.transformer.h:
            attn = block.attn
            shape = (batch, attn.local_kv_heads, max_seq_len, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            attn.v_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.cache_batch, self.cache_len = batch, max_seq_len
        if self.inv_freq is not None:
            self.rotary_cache = None  # (the old tables go before the new ones come)
            self.rotary_cache = RotaryCache(max_seq_len, self.inv_freq, weight.dtype)
        if weight.device.type == "cpu":  # the greedy pick's form at this batch (pick_greedy)
            argmax.calibrate(batch, self.local_vocab, weight.dtype)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # input_ids, position_ids: [B, T] -> [B, T, E]
        wte = self.transformer.wte
        if self.tp.world_size == 1:
            tokens = wte(input_ids)
        else:
            tokens = self.tp.all_reduce_(wte.shard_rows(input_ids, self.vocab_start))
        return tokens if self.inv_freq is not None else tokens + self.transformer.wpe(position_ids)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, start: int | torch.Tensor,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Run T new tokens written at cache slots start .. start + T - 1; returns this rank's
        logits for the last position, [B, V_local] (padding columns at -inf).

        input_ids, position_ids: [B, T]. key_valid: [B, S_max] bool, False on left padding;
        None when there is none (then no mask is built: causal attention by SDPA itself, the
        fast path). `start` as a [1] long tensor (with key_valid given) is the fixed-shape step
        that torch.compile and CUDA graphs need: the same shapes at every position, attention
        over the whole cache with the slots not written yet masked.
        """
        b, t = input_ids.shape
        if isinstance(start, int):
            end = start + t
            # SDPA's is_causal aligns top-left (wrong past slot 0) and knows no window.
            needs_mask = (t > 1 and start > 0) or (self.window is not None and end > self.window)
            if key_valid is None and needs_mask:
                key_valid = torch.ones((b, end), dtype=torch.bool, device=input_ids.device)
            mask = None if key_valid is None else attention_mask(
                key_valid[:, :end], torch.arange(start, end, device=input_ids.device), self.window)
        else:
            mask = attention_mask(key_valid, start + torch.arange(t, device=start.device), self.window)
        x = self.embed(input_ids, position_ids)
        rotary = None
        if self.inv_freq is not None:
            # (a compiled step, whose `start` is a tensor, computes them in its graph as before: the tables as its
            # inputs could be copied at every CUDA graph replay)
            rotary = (self.rotary_cache(position_ids) if self.rotary_cache is not None and isinstance(start, int)
                      else rotary_tables(position_ids, self.inv_freq, x.dtype))
        # (the int `start` first: a compiled step, whose `start` is a tensor, never reads self.fused)
        if (isinstance(start, int) and t == 1 and mask is None
                and (fused := self.fused_layers()) is not None and fused.takes(x, start)):
            x = fused.run(x, start, rotary)
        else:
            for block in self.transformer.h:
                x = block(x, start, mask, rotary)
        return self._logits(self.transformer.ln_f(x[:, -1]))

    def fused_layers(self) -> fused_step.FusedStep | None:
        """The decode steps' layers in calls of fused_step.c, or None where they run op by op: decided for each
        layout and cache (setup_cache, outside the timed steps), made again where it went stale."""
        if self.fused is False or (self.fused is not None and self.fused.stale()):
            self.fused = fused_step.FusedStep(self) if fused_step.why_not(self) is None else None
        return self.fused

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        # last: [B, E] -> [B, V_local]
        if self.config.tie_word_embeddings:
            logits = run_kernel(self.lm_head_kernel, last, self.transformer.wte.weight, self.lm_head_packed, None)
        else:
            logits = self.lm_head(last)
        if self.valid_local_vocab < self.local_vocab:
            logits[:, self.valid_local_vocab :] = float("-inf")
        return logits

    def pick_greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """The global argmax over the vocabulary shards, without gathering the logits: [B] (argmax.pick)."""
        return argmax.pick(logits, self.tp, self.vocab_start)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, vocab_size]: the whole vocabulary's logits, the same bits on every rank (sampling)."""
        if self.tp.world_size == 1:
            return logits[:, : self.config.vocab_size]
        gathered = self.tp.all_gather(logits.contiguous())  # [N, B, local_vocab]
        return gathered.permute(1, 0, 2).reshape(logits.shape[0], -1)[:, : self.config.vocab_size]

    def top_logprobs(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely tokens over the whole vocabulary: (log-probabilities, token ids),
        [B, k] each; what the comparisons with a reference check."""
        local_max = logits.float().max(dim=-1, keepdim=True).values
        global_max = self.tp.max_(local_max.clone())
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


def load_model(shard_dir: str | Path, tp: TPGroup, device: torch.device, kernels: str = "auto",
               compile: bool = False) -> TPCausalLM:
    """Build this rank's model straight from its part (on the meta device, then the loaded tensors are
    assigned: the weights exist once in memory). `kernels` (kernels.KERNEL_MODES) chooses the linear
    weights' kernels and layouts at the first request and at each new batch size (setup_cache; every
    rank in step). With `compile`, decode steps run through torch.compile, which lays out the weights
    itself: `kernels` must then be 'auto' or 'plain'. On the CPU the weights are copied out of the part
    file's mapping: the linear ones and a tied embedding as setup_cache lays them out (with `compile` or
    'plain', at load)."""
    if compile and kernels not in ("auto", "plain"):
        raise ValueError(f"kernels {kernels!r} cannot be combined with compile (inductor chooses its own GEMMs)")
    raw_config, state = load_part(shard_dir, tp.rank, tp.world_size, device="cpu" if device.type == "npu" else device)
    config = ModelConfig.from_hf_dict(raw_config, source=f"{shard_dir}/part_model/{tp.rank}/config.json")
    # The file's tensors, held while compared (runtime_state's joined ones are not); on the CPU only: there
    # they are the file's mapping, elsewhere memory that runtime_state frees a layer at a time.
    loaded = list(state.values()) if device.type == "cpu" else []
    if config.model_type == "starcoder2":
        state = runtime_state(state, config)
    with torch.device("meta"):
        model = TPCausalLM(config, tp)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"part {tp.rank} of {shard_dir}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ValueError(f"part {tp.rank} of {shard_dir}: tensor {name} has shape {list(state[name].shape)}, "
                             f"expected {list(ref.shape)} for rank {tp.rank} of {tp.world_size}")
    laid_out: set[str] = set()
    if device.type == "npu":
        state = {name: t.to(device) for name, t in state.items()}
    elif device.type == "cpu":  # out of the file's mapping, where the kernels read them slower
        # A linear weight that setup_cache will lay out stays there until then: a copy made at load
        # would be one more fresh copy of most of the model, faulted in, dropped at the lay-out
        # (RESULTS.md, "Start-up: the linear weights laid out from the part's mapping").
        if not compile and kernels != "plain":
            laid_out = {f"{name}.weight" for name, module in model.named_modules()
                        if isinstance(module, Linear) and any(state[f"{name}.weight"] is t for t in loaded)}
            if config.tie_word_embeddings and any(state["transformer.wte.weight"] is t for t in loaded):
                laid_out.add("transformer.wte.weight")  # (the tied lm_head's lay-out: embedding.py)
        state = {**malloc.owned_copies({k: v for k, v in state.items() if k not in laid_out}),
                 **{k: v for k, v in state.items() if k in laid_out}}
    model.load_state_dict(state, assign=True, strict=True)
    del state, loaded
    if device.type == "cpu":  # for the packed layouts that cannot be unpacked (Linear.plain_source)
        read = part_tensor_reader(shard_dir, tp.rank, config.model_type)
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                module.plain_source = functools.partial(read, f"{name}.weight")
                module.in_file = f"{name}.weight" in laid_out
        model.transformer.wte.in_file = "transformer.wte.weight" in laid_out
    if config.rope_theta is not None:
        model.inv_freq = inverse_frequencies(config).to(device)
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels mode {kernels!r} is not one of {list(KERNEL_MODES)}")
    if compile:
        model.compile_decode()
    else:
        # The weights stay plain until the first request's batch size is known (setup_cache):
        # `auto` measures then, with every rank in the request, under its heartbeat and its
        # request timeout (at load, a collective would run under the shorter rank timeout).
        model.kernel_mode = kernels
    return model.eval()
