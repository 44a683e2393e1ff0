"""The forms the model's own code takes, measured per machine: the tanh GELU's (fused or split from
some size), the decode step's attention (attend.c or SDPA) and the causal prefill's where query heads
share K/V heads (blocks and softmax). Cached on disk like kernel plans, keyed on what they depend on."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Callable

import torch

from . import rowdot
from .activations import ACTIVATIONS, TANH_GELU, calibrate
from .cpu import cpu_cores, cpu_model, isa_flags
from .decode_attention import DECODE_FORM, REPEATS, calibrate_decode
from .files import cache_dir, write_atomic
from .kernels import PLAN_VERSION, key_dtype
from .malloc import THP_ENV


def calibrate_forms(weights: Mapping[str, torch.Tensor], activated: dict[str, str], tp, attention=None,
                    on_progress: Callable[[], None] = lambda: None) -> None:
    """The tanh GELU's form (activations.calibrate) where the model runs it in fp32; given the
    model's attention (an attention.Attention), the decode step's attention form in the model's
    dtype (decode_attention.calibrate_decode: attend.c or SDPA) and, for K/V heads shared by query
    heads, the causal prefill's (attention.calibrate_attention): in every kernel mode, before a plan is measured
    or looked up (the c_fc timings include the GELU); `on_progress` ticks between timed calls. Cached
    per machine like plans (measured per process, near-ties flipped the forms from one run to the
    next, and a latency gate named them as kernel changes). Every rank calls it in step. Of `weights`
    (shape key -> weight) only the keys are read."""
    from .attention import PREFILL_FORM, calibrate_attention  # (attention.py uses linear.py, which uses this module)

    dtypes = [key_dtype(key) for key in weights]  # (from the keys: no weight is read, none unpacked)
    fp32 = torch.float32 in dtypes
    dtype = torch.float32 if fp32 or not dtypes else dtypes[0]
    gelu = fp32 and any(ACTIVATIONS[a][0] is TANH_GELU for a in activated.values()) and not TANH_GELU.calibrated
    mqa = attention is not None and attention.local_heads > attention.local_kv_heads and not PREFILL_FORM.calibrated
    decode = attention is not None and not DECODE_FORM.calibrated
    if not (gelu or mqa or decode):
        return
    dtype_name = str(dtype).removeprefix("torch.")
    heads = [attention.local_heads, attention.local_kv_heads, attention.head_dim, dtype_name] if attention else None
    key = {"version": PLAN_VERSION, "forms": {"tanh_gelu": gelu, "mqa": heads if mqa else None,
                                              "decode": heads if decode else None,
                                              "decode_repeats": REPEATS if decode else None},
           "cpu_model": cpu_model(), "cpu_isa": isa_flags(), "cores": cpu_cores(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "world_size": tp.world_size, "kernels": rowdot.path(),
           "huge_pages": os.environ.get(THP_ENV, "") == "1"}  # as plan_key: timings depend on the page size
    path = cache_dir("forms", hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")
    try:
        stored = json.loads(path.read_text())
        forms = stored["forms"] if stored.get("key") == key else None
        split = forms["tanh_split_from"] if forms else None
        prefill_form = PREFILL_FORM.parse(forms["prefill_form"]) if forms and mqa else None
        ours = bool(forms["decode_ours"]) if forms else False
        shown = {name: f"cached: {forms[name]}" for name in ("tanh_gelu", "mqa", "decode")} if forms else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        forms = None
    # Every rank measures if any lacks them: the timings are reduced across ranks.
    if not tp.max_(torch.tensor([0.0 if forms is not None else 1.0], dtype=torch.float64)).item():
        if gelu:
            TANH_GELU.split_from, TANH_GELU.calibrated = split, shown["tanh_gelu"]
        if mqa:
            PREFILL_FORM.restore(prefill_form, dtype, shown["mqa"], attention.local_kv_heads)
        if decode:
            DECODE_FORM.ours, DECODE_FORM.calibrated = ours, shown["decode"]
        return
    measured = {"tanh_split_from": None, "prefill_form": None, "tanh_gelu": None, "mqa": None, "decode": None,
                "decode_ours": False}
    if gelu:
        measured.update(tanh_gelu=calibrate(tp.max_, on_progress), tanh_split_from=TANH_GELU.split_from)
    if mqa:
        measured.update(mqa=calibrate_attention(attention.local_heads, attention.head_dim, tp.max_, dtype,
                                                on_progress, kv_heads=attention.local_kv_heads),
                        prefill_form=PREFILL_FORM.state())
    if decode:
        measured.update(decode=calibrate_decode(*heads[:3], tp.max_, dtype, on_progress),
                        decode_ours=DECODE_FORM.ours)
    try:
        write_atomic(path, json.dumps({"key": key, "forms": measured}, indent=1, sort_keys=True))
    except OSError as err:
        print(f"[forms] could not cache the forms in {path}: {err}", file=sys.stderr)
