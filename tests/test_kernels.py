"""kernels.py: the choice from timings (faked here, so that the logic is checked apart from this
machine's speed), what is timed, the slowest rank's time, and the plan cache."""
import json

import pytest
import torch

from starcoder_tp import kernel_timing, kernels, layouts, panels
from starcoder_tp import linear as kernels_linear
from starcoder_tp.kernels import Choice, choose, fixed_choice, measure


def test_the_fastest_decode_layout_wins_then_the_fastest_prefill_kernel_it_can_run():
    c = choose({"plain": 2.26, "onednn": 1.27}, {"plain": 122.0, "onednn": 138.0, "unpack": 136.0})
    assert (c.decode, c.prefill) == ("onednn", "unpack"), "plain's faster prefill needs the plain layout"
    assert c.short == "unpack", "without short-prompt timings, the long ones decide both"
    c = choose({"plain": 0.66, "onednn": 0.72}, {"plain": 122.0, "onednn": 100.0, "unpack": 136.0})
    assert (c.decode, c.prefill) == ("plain", "plain")
    c = choose({"plain": 0.63, "onednn": 0.40, "fp32": 0.65}, {"plain": 15.5, "onednn": 16.3, "unpack": 18.5,
                                                              "fp32": 133.0})
    assert (c.decode, c.prefill) == ("onednn", "onednn")
    c = choose({"plain": 3.5, "onednn": 3.4, "fp32": 2.7}, {"plain": 427.0, "fp32": 63.0, "onednn": 400.0})
    assert (c.decode, c.prefill) == ("fp32", "fp32")
    assert c.decode_ms == {"plain": 3.5, "onednn": 3.4, "fp32": 2.7}, "the timings stay with the choice"


def test_a_weight_that_never_sees_prefill_rows_gets_its_layout_as_prefill_kernel():
    c = choose({"plain": 9.0, "onednn": 7.0}, {})
    assert (c.decode, c.prefill) == ("onednn", "onednn")
    c = choose({"plain": 9.0, "gemv": 6.0}, {})
    assert (c.decode, c.prefill) == ("gemv", "plain"), "gemv's layout is the plain weight"
    with pytest.raises(ValueError, match="no decode timings"):
        choose({}, {})


def test_a_choice_must_be_runnable_by_its_layout():
    with pytest.raises(ValueError, match="the 'plain' layout runs"):
        Choice("plain", "onednn")
    with pytest.raises(ValueError, match="plain/unpack/plain"):
        Choice("plain", "plain", "unpack")
    assert Choice("onednn", "unpack").short == "unpack", "short prefills default to the long kernel"


def test_the_plain_weight_can_run_onednn_at_prefill_so_a_one_row_kernel_keeps_a_fast_prefill():
    # The EPYC Zen 5's timings (ms, fp32, 1024x4096 at 1 / 64 / 512 rows): oneDNN given the plain
    # weight ran prefills as fast as its packed layout, so gemv's faster decode costs no prefill.
    decode = {"plain": 0.71, "onednn": 0.72, "gemv": 0.55}
    short = {"plain": 6.5, "onednn": 3.2, "unpack": 7.9, "onednn_plain": 3.3}
    long = {"plain": 41.0, "onednn": 19.0, "unpack": 22.0, "onednn_plain": 19.1}
    c = choose(decode, long, short, prompt_rows=128, steps=31)
    assert (c.decode, c.short, c.prefill) == ("gemv", "onednn_plain", "onednn_plain")
    no_plain_onednn = {k: v for k, v in short.items() if k != "onednn_plain"}
    c = choose(decode, {k: v for k, v in long.items() if k != "onednn_plain"}, no_plain_onednn, 128, 31)
    assert (c.decode, c.short) == ("onednn", "onednn"), "MKL's prefill at twice the time outweighs 31 faster steps"
    with pytest.raises(ValueError, match="the 'onednn' layout runs"):
        Choice("onednn", "onednn_plain")


def test_short_and_long_prefills_each_get_their_fastest_kernel():
    # Unpacking costs the same for 64 rows as for 512: it can lose short prompts and win long ones.
    c = choose({"plain": 2.3, "onednn": 1.3}, {"onednn": 138.0, "unpack": 130.0}, {"onednn": 5.0, "unpack": 9.0})
    assert (c.decode, c.short, c.prefill) == ("onednn", "onednn", "unpack")


def test_fixed_modes_fall_back_to_plain_where_the_weight_cannot_take_them():
    assert fixed_choice("fp32", torch.empty(4, 4)) == Choice("plain", "plain"), "fp32 weights have no fp32 path"
    assert fixed_choice("onednn", torch.empty(4, 4, dtype=torch.float64)) == Choice("plain", "plain")
    assert fixed_choice("fp32", torch.empty(4, 4, dtype=torch.bfloat16)) == Choice("fp32", "fp32")


def test_the_wide_onednn_layout_is_packed_for_at_least_its_rows_and_offered_only_below_them(monkeypatch):
    packed_for = []
    monkeypatch.setattr(layouts, "pack", lambda weight, rows: packed_for.append(rows) or weight)
    layouts.pack_wide(torch.empty(4, 4), 1)
    layouts.pack_wide(torch.empty(4, 4), layouts.WIDE_ROWS + 8)
    assert packed_for == [layouts.WIDE_ROWS, layouts.WIDE_ROWS + 8], "never packed for fewer rows than WIDE_ROWS"
    monkeypatch.undo()
    weight = torch.randn(8, 16)
    if layouts.pack(weight[:1], 1) is None:
        pytest.skip("oneDNN cannot pack fp32 weights on this CPU (or torch was built without it)")
    assert "onednn_wide" in kernels.decode_candidates(weight, 1)
    assert "onednn_wide" not in kernels.decode_candidates(weight, layouts.WIDE_ROWS), \
        "from WIDE_ROWS rows on, `onednn` is packed for as many: the same layout measured twice"
    assert fixed_choice("onednn_wide", weight, 1) == Choice("onednn_wide", "onednn_wide")
    with pytest.raises(ValueError, match="runs"):
        Choice("onednn_wide", "unpack")


def fake_clock(monkeypatch, ms_per_call: dict[str, float], min_calls_seen: list | None = None):
    """kernels.time_ms (kernel_timing's) with every candidate's call costing the given milliseconds
    (by name); each call's min_calls and candidates appended to `min_calls_seen`."""
    def time_ms(calls, on_progress=lambda: None, min_calls=1):
        if min_calls_seen is not None:
            min_calls_seen.append((min_calls, sorted(calls)))
        for call in calls.values():
            call()  # the real callables run once: they must work
        on_progress()
        return {name: ms_per_call[name] for name in calls}
    monkeypatch.setattr(kernels, "time_ms", time_ms)


def test_measure_times_every_candidate_of_every_shape_and_takes_the_slowest_ranks(monkeypatch):
    fake_clock(monkeypatch, {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "fp32": 0.5, "onednn_plain": 4.0})
    monkeypatch.setattr(kernels, "decode_candidates", lambda w, rows=1: ("plain", "onednn"))  # as on any oneDNN CPU
    reduced = []
    width = len(kernels.DECODE_SLOTS) + 2 * len(kernels.PREFILL_SLOTS)

    def slowest(t):
        reduced.append(len(t))
        if len(t) != 2 * width:  # the shapes' digest (every rank the same), a retiming
            return t
        other_rank = t.clone()
        other_rank[0] = other_rank[width] = 5.0  # another rank is slow on plain decode, at both shapes
        return torch.maximum(t, other_rank)

    weights = {kernels.shape_key(w): w for w in (torch.randn(8, 16), torch.randn(32, 16))}
    progress = []
    plan = measure(weights, 4, slowest, prefill={"32x16:float32"}, on_progress=lambda: progress.append(1))
    # 32x16's prefills are timed again: they trade its layout (plain runs them twice as fast as onednn's kernels)
    assert reduced == [2, 2 * width, width], "the shapes are checked, the whole plan, then 32x16's traded prefills"
    assert set(plan) == set(weights) and progress
    assert plan["32x16:float32"] == Choice("onednn", "onednn", "onednn", {"plain": 5.0, "onednn": 2.0},
                                           {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "onednn_plain": 4.0},
                                           {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "onednn_plain": 4.0})
    lm_head = plan["8x16:float32"]  # no prefill timings: it never sees prefill rows
    assert (lm_head.decode, lm_head.prefill, lm_head.prefill_ms) == ("onednn", "onednn", {})


def test_ranks_with_different_shapes_are_refused_before_any_timing(monkeypatch):
    fake_clock(monkeypatch, {})
    with pytest.raises(RuntimeError, match="the ranks hold different weight shapes"):
        measure({"8x16:float32": torch.randn(8, 16)}, 1, lambda t: t + 1, prefill=set())


def test_time_ms_alternates_rounds_prunes_the_hopeless_and_reports_medians(monkeypatch):
    calls = []
    cost = {"a": 0.010, "b": 0.012, "c": 0.100}  # seconds per call; c is > PRUNE_FACTOR x slower
    clock = [0.0]
    monkeypatch.setattr(kernel_timing, "perf_counter", lambda: clock[0])

    def call(name):
        def run():
            calls.append(name)
            clock[0] += cost[name]
        return run

    result = kernel_timing.time_ms({name: call(name) for name in cost})
    assert result == pytest.approx({"a": 10.0, "b": 12.0, "c": 100.0})
    assert calls[6] == "c", "one warm and one probe call each, then a second probe of the one past PRUNE_FACTOR"
    rounds = calls[7:]
    assert "c" not in rounds, "a candidate 10x slower than the best on two calls is not timed further"
    assert rounds == ["b", "a", "a", "b"], "after the probes (A B), one call per round (each >= ROUND_MIN_S): B A, A B"
    assert kernel_timing.time_ms({"only": call("a")}) == {"only": 0.0}, "one candidate: nothing to time"
    calls.clear()
    assert kernel_timing.time_ms({name: call(name) for name in cost}, min_calls=3) == pytest.approx(
        {"a": 10.0, "b": 12.0, "c": 100.0})
    assert calls[7:] == ["b"] * 3 + ["a"] * 6 + ["b"] * 3, "after the probes, three calls a round, each >= ROUND_MIN_S"
    cost["b"] = 0.011
    cost["c"] = 0.021  # just past PRUNE_FACTOR x a's time: pruned
    calls.clear()
    kernel_timing.time_ms({name: call(name) for name in cost})
    assert "c" not in calls[7:] and calls[6] == "c"
    cost["c"] = 0.019  # within it: timed with the others
    calls.clear()
    kernel_timing.time_ms({name: call(name) for name in cost})
    assert calls[6:].count("c") == 2 and len(calls) == 6 + 6, "probed, then ROUNDS - 1 rounds"


def test_a_candidate_slowed_on_its_probe_alone_is_timed_all_the_same(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(kernel_timing, "perf_counter", lambda: clock[0])
    made = {"a": 0, "b": 0}

    def call(name):
        def run():
            made[name] += 1
            clock[0] += 0.050 if (name == "b" and made[name] == 2) else 0.010  # b's probe hit by an interrupt
        return run

    result = kernel_timing.time_ms({name: call(name) for name in made})
    assert result == pytest.approx({"a": 10.0, "b": 10.0}), "b's second probe call was as fast as a: b stays in"
    assert made == {"a": 2 + 2, "b": 3 + 2}, "warm, probe (b: a second), two rounds more"


def test_the_probe_calls_are_the_first_rounds_samples(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(kernel_timing, "perf_counter", lambda: clock[0])
    made = {"a": 0, "b": 0}
    costs = {"a": [0.1, 0.010, 0.010, 0.030], "b": [0.1, 0.020, 0.020, 0.020]}  # warm, probe, two rounds

    def call(name):
        def run():
            clock[0] += costs[name][made[name]]
            made[name] += 1
        return run

    assert kernel_timing.time_ms({name: call(name) for name in made}) == pytest.approx({"a": 10.0, "b": 20.0})
    assert made == {"a": 4, "b": 4}, "three samples each: the probe and ROUNDS - 1 rounds"

def test_decode_candidates_run_several_calls_a_round_and_prefill_ones_do_not(monkeypatch):
    seen = []
    fake_clock(monkeypatch, {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "fp32": 0.5, "mkl_packed": 1.5, "gemv": 0.8,
                             "rowdot": 0.7, "onednn_plain": 4.0, "onednn_wide": 1.8, "panels": 0.9}, seen)
    measure({"8x8:float32": torch.randn(8, 8)}, 1, lambda t: t, {"8x8:float32"})
    decode_kinds = sorted(kernels.decode_candidates(torch.randn(8, 8)))
    assert seen[0] == (kernels.DECODE_MIN_CALLS, decode_kinds) and kernels.DECODE_MIN_CALLS > 1
    assert len(seen) == 3 and all(min_calls == 1 for min_calls, _ in seen[1:]), "the two prefill timings"


@pytest.mark.skipif(not panels.supports(torch.randn(16, 8)), reason="panels.c does not run on this CPU")
def test_at_one_row_panels_is_timed_for_every_weight_the_lm_head_too(monkeypatch):
    seen = []
    fake_clock(monkeypatch, {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "fp32": 0.5, "mkl_packed": 1.5, "gemv": 0.8,
                             "rowdot": 0.7, "onednn_plain": 4.0, "onednn_wide": 1.8, "panels": 0.4}, seen)
    weights = {kernels.shape_key(w): w for w in (torch.randn(16, 8), torch.randn(32, 8))}
    plan = measure(weights, 1, lambda t: t, prefill={"32x8:float32"})
    decode_timed = [kinds for min_calls, kinds in seen if min_calls == kernels.DECODE_MIN_CALLS]
    # 16x8 runs no prompt rows, as the lm_head: on Zen 4 panels read the lm_head's one row 1.5x faster than oneDNN
    assert ["panels" in kinds for kinds in decode_timed] == [True, True], "16x8 (no prompt rows), then 32x8"
    assert plan["16x8:float32"].decode == "panels" and plan["32x8:float32"].decode == "panels"


def test_a_cached_plan_is_reused_only_for_exactly_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path))
    weights = {"8x16:float32": torch.randn(8, 16)}
    key = kernels.plan_key(weights, 4, world_size=2)
    assert {"cpu_model", "cpu_isa", "cores", "torch", "onednn", "threads", "world_size", "rows", "shapes"} <= set(key)
    plan = {"8x16:float32": Choice("plain", "plain", "plain", {"plain": 1.0}, {"plain": 2.0}, {"plain": 3.0})}
    assert kernels.load_plan(key) is None
    kernels.save_plan(key, plan)
    assert kernels.load_plan(key) == plan
    for change in ({"rows": 8}, {"world_size": 1}, {"threads": key["threads"] + 1}, {"cpu_isa": "avx2"},
                   {"huge_pages": not key["huge_pages"]}):
        assert kernels.load_plan({**key, **change}) is None, change
    monkeypatch.setenv(kernels.THP_ENV, "1")
    with_huge = kernels.plan_key(weights, 4, world_size=2)
    monkeypatch.setenv(kernels.THP_ENV, "0")
    assert with_huge["huge_pages"] and not kernels.plan_key(weights, 4, world_size=2)["huge_pages"], \
        "a plan timed with 4 KiB pages is not one timed with 2 MiB pages"
    kernels.plan_path(key).write_text("{not json")
    assert kernels.load_plan(key) is None, "an unreadable cache is measured again, not trusted"
    kernels.plan_path(key).write_text(json.dumps({"key": key, "plan": {"8x16:float32": {"decode": "x"}}}))
    assert kernels.load_plan(key) is None
    kernels.plan_path(key).write_text(json.dumps({"key": key, "plan": {}}))
    assert kernels.load_plan(key) is None, "a plan that lacks a shape of the key"
    kernels.plan_path(key).write_text("[]")
    assert kernels.load_plan(key) is None


def test_a_model_measures_its_plan_once_per_machine_then_reads_it_from_the_cache(tmp_path, embedded_dir, prompts,
                                                                                  monkeypatch):
    from starcoder_tp.comm import TPGroup
    from starcoder_tp.device import Device
    from starcoder_tp.model import load_model
    from starcoder_tp.shard import shard_checkpoint
    from starcoder_tp.timing import timed_generate

    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))  # no plan from another test
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    first = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"))  # kernels="auto"
    assert first.kernels_summary() == "auto (chosen at the first request)", "no collective at load"
    assert timed_generate(first, Device("cpu"), prompts[:1], 2).kernels.startswith("auto (measured, batch 1, weighed for ")
    shapes = {m.shape_key() for m in first.modules() if isinstance(m, kernels_linear.Linear)}
    shapes.add(first.transformer.wte.shape_key())  # the lm_head, tied to the embedding
    assert set(first.kernel_plan) == shapes and all(c.decode_ms for c in first.kernel_plan.values())
    second = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"))
    assert timed_generate(second, Device("cpu"), prompts[:1], 2).kernels.startswith("auto (cached, batch 1, weighed for ")
    assert second.kernel_plan == first.kernel_plan
    out = timed_generate(second, Device("cpu"), (prompts * 2)[:2], 4)
    assert out.kernels.startswith("auto (measured, batch 2, weighed for "), "a new batch size is measured for its rows"
    assert len(list(tmp_path.glob("cache/kernels/*.json"))) == 2


@pytest.mark.parametrize("args, message", [
    (["--kernels", "onednn", "--no-prepack"], "--no-prepack (plain kernels) contradicts --kernels onednn"),
    (["--kernels", "fp32", "--compile"], "--kernels fp32 cannot be combined with --compile"),
])
def test_contradictory_kernel_options_are_refused_naming_both(args, message):
    import argparse

    from starcoder_tp.options import RUNTIME_OPTIONS, add_options, kernel_mode

    parser = argparse.ArgumentParser()
    add_options(parser.add_argument, RUNTIME_OPTIONS)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kernel_mode(parser.parse_args(args))
    assert kernel_mode(parser.parse_args(["--no-prepack"])) == "plain"
    assert kernel_mode(parser.parse_args([])) == "auto"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidates_of_the_mlps_first_linear_include_its_activation(dtype):
    """Timed as the model runs it: a plan that ignored the activation would not see that the
    packed layout fuses it (oneDNN's post-op) while the others pay a pass for it."""
    torch.manual_seed(0)
    weight = (torch.randn(48, 16) / 4).to(dtype)
    kinds = kernels.decode_candidates(weight)
    decode = kernel_timing.decode_calls(weight, 2, kinds, activation="gelu_pytorch_tanh", copies=2)
    prefill = kernel_timing.prefill_calls(weight, 2, kinds, 8, activation="gelu_pytorch_tanh")
    plain_decode, plain_prefill = kernel_timing.decode_calls(weight, 2, kinds), kernel_timing.prefill_calls(weight, 2, kinds, 8)
    for calls, plain in ((decode, plain_decode), (prefill, plain_prefill)):
        assert set(calls) == set(plain)
        for name in calls:
            # gelu's minimum is about -0.17; the bare products of these inputs go well below.
            assert plain[name]().min() < -0.5, name
            got = calls[name]()
            assert got.min() >= -0.2 and got.shape[-1] == 48, f"{name}: no activation applied"


def test_decode_candidates_are_timed_over_as_many_copies_as_a_step_reads(monkeypatch):
    monkeypatch.setattr(kernel_timing, "decode_set_bytes", lambda: 256 << 20)
    assert kernel_timing.decode_copies(16 << 20, 541 << 20) == 16, "capped at the decode set (256 MiB)"
    assert kernel_timing.decode_copies(4 << 20, 30 << 20) == 8, "the whole step's bytes, rounded up"
    assert kernel_timing.decode_copies(200 << 20, 100 << 20) == 1, "a weight larger than the step: itself"
    assert kernel_timing.decode_copies(100, 0) == 1, "no step bytes given: one copy, as before"
    with pytest.raises(ValueError, match="a weight of 0 bytes"):
        kernel_timing.decode_copies(0, 1)


@pytest.mark.parametrize("cache, expected", [(32 << 20, 64 << 20), (48 << 20, 96 << 20), (480 << 20, 256 << 20),
                                             (4 << 20, 64 << 20), (None, 256 << 20)])
def test_the_decode_set_is_two_last_level_caches_within_its_bounds(monkeypatch, cache, expected):
    monkeypatch.setattr(kernel_timing, "last_level_cache_bytes", lambda: cache)
    kernel_timing.decode_set_bytes.cache_clear()
    try:
        assert kernel_timing.decode_set_bytes() == expected
    finally:
        kernel_timing.decode_set_bytes.cache_clear()  # this machine's again for the tests after


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plain_prefill_kernels_run_on_a_copy_not_on_the_weight_given(monkeypatch, dtype):
    """The weight given may be the part file's mapping (load_model leaves a linear weight there until
    its lay-out): the plain kernels' prefills are timed on a copy placed as a laid-out plain weight."""
    weight = torch.randn(48, 16).to(dtype)
    seen = []
    real = {"linear": torch.nn.functional.linear, "packed": kernels_linear.packed_linear,
            "fp32": kernels_linear.fp32_linear}
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, *a: seen.append(w.data_ptr()) or real["linear"](x, w, *a))
    monkeypatch.setattr(kernels_linear, "packed_linear",
                        lambda x, w, *a: seen.append(w.data_ptr() if w.layout == torch.strided else None)
                        or real["packed"](x, w, *a))
    monkeypatch.setattr(kernels_linear, "fp32_linear", lambda x, w, *a: seen.append(w.data_ptr()) or real["fp32"](x, w, *a))
    calls = kernel_timing.prefill_calls(weight, 2, kernels.decode_candidates(weight, 2), 8)
    for name in {"plain", "fp32", "onednn_plain"} & set(calls):
        seen.clear()
        assert calls[name]().shape == (8, 48)
        assert seen and weight.data_ptr() not in seen, f"{name}: timed on the weight given itself"


@pytest.mark.skipif(layouts.pack_mkl(torch.ones(2, 2), 1) is None, reason="torch has no MKL packed sgemm here")
def test_mkls_packed_layout_is_an_fp32_candidate_and_runs_only_itself_at_prefill(monkeypatch):
    assert "mkl_packed" in kernels.decode_candidates(torch.randn(8, 16))
    assert "mkl_packed" not in kernels.decode_candidates(torch.randn(8, 16).bfloat16()), "MKL packs sgemm only"
    fake_clock(monkeypatch, {"plain": 3.0, "onednn": 2.0, "unpack": 0.5, "fp32": 9.0, "mkl_packed": 1.0,
                             "onednn_plain": 0.4})
    monkeypatch.setattr(kernels, "decode_candidates", lambda w, rows=1: ("plain", "onednn", "mkl_packed"))
    plan = measure({"32x16:float32": torch.randn(32, 16)}, 4, lambda t: t, prefill={"32x16:float32"})
    # unpack is the fastest prefill kernel, but MKL's layout cannot be unpacked: it runs itself.
    assert (plan["32x16:float32"].decode, plan["32x16:float32"].short, plan["32x16:float32"].prefill) == \
        ("mkl_packed", "mkl_packed", "mkl_packed")
    with pytest.raises(ValueError, match="the 'mkl_packed' layout runs \\['mkl_packed'\\]"):
        Choice("mkl_packed", "unpack")


def test_a_request_weighs_each_layouts_prefill_against_its_decode_steps():
    decode = {"plain": 1.0, "mkl_packed": 1.1}
    short = {"plain": 10.0, "fp32": 50.0, "mkl_packed": 6.0}  # ms at SHORT_ROWS (64) rows
    long = {"plain": 80.0, "fp32": 400.0, "mkl_packed": 78.0}  # ms at PREFILL_ROWS (512) rows
    assert choose(decode, long, short).decode == "plain", "no request: the decode step alone"
    # 64 prompt rows: mkl_packed's prefill is 4 ms shorter, its steps 0.1 ms longer: it costs less
    # below 40 steps; up to 52 it costs at most 2% (TIE_FRACTION) more, and its step is 10% behind
    # where plain's prefill is 67% behind (6 + 57.2 <= 1.02 x (10 + 52)); from 53 steps, plain.
    assert kernels.TIE_FRACTION == 0.02
    assert choose(decode, long, short, prompt_rows=64, steps=39).decode == "mkl_packed"
    assert choose(decode, long, short, prompt_rows=64, steps=52).decode == "mkl_packed"
    assert choose(decode, long, short, prompt_rows=64, steps=53).decode == "plain"
    # 128 rows still take the short timing, scaled: 8 ms; within 2% up to 105 steps (the edge itself left to rounding).
    assert choose(decode, long, short, prompt_rows=128, steps=104).decode == "mkl_packed"
    assert choose(decode, long, short, prompt_rows=128, steps=106).decode == "plain"
    # 1024 rows take the long timing, scaled: 156 against 160 ms, 2.5% apart. Up to 7 steps plain
    # costs over 2% more; from 8 the totals tie (mkl_packed's the least up to 39), and plain's prefill
    # is 2.6% behind where mkl_packed's step is 10% behind: plain. (Tie-broken by the faster prefill,
    # mkl_packed was kept up to 90 steps.)
    assert choose(decode, long, short, prompt_rows=1024, steps=7).decode == "mkl_packed"
    assert choose(decode, long, short, prompt_rows=1024, steps=8).decode == "plain"
    assert choose(decode, long, short, prompt_rows=1024, steps=39).decode == "plain"
    assert choose(decode, long, short, prompt_rows=1024, steps=89).decode == "plain"
    # The same tie where the prefills are 40% apart: the faster prefill, its step 10% behind.
    assert choose(decode, long, short, prompt_rows=64, steps=45).decode == "mkl_packed"
    # Equal prefills: the faster step.
    assert choose({"plain": 1.0, "onednn": 0.99}, {"plain": 5.0, "onednn": 5.0}, {"plain": 5.0, "onednn": 5.0},
                  prompt_rows=64, steps=10).decode == "onednn", "equal prefills: the cheaper request"
    # Batch 16 at 512 tokens on Zen 4, bf16 1024x1024 (RESULTS.md, "The tie on a request broken by the
    # phase further behind"): oneDNN's prefill 2.9% ahead and its total 1.1% ahead, its step 24% behind.
    zen4 = choose({"onednn": 0.221, "panels": 0.178}, {"onednn": 4.782, "panels": 4.923},
                  {"onednn": 0.605, "panels": 0.594}, prompt_rows=8192, steps=31)
    assert zen4.decode == "panels", zen4
    # A layout outside the tie, its prefill far faster and its steps far slower, is no yardstick for
    # the tied ones (measured against it, oneDNN's prefill would be 59% behind and panels' 64%).
    third = choose({"onednn": 0.221, "panels": 0.178, "plain": 5.0}, {"onednn": 4.782, "panels": 4.923, "plain": 3.0},
                   {"onednn": 0.605, "panels": 0.594, "plain": 0.4}, prompt_rows=8192, steps=31)
    assert third.decode == "panels", third
    # No steps: the prefill alone breaks the tie, however far behind the step.
    assert choose({"onednn": 0.221, "panels": 0.178}, {"onednn": 4.782, "panels": 4.923},
                  {"onednn": 0.605, "panels": 0.594}, prompt_rows=8192, steps=0).decode == "onednn"
    # A lone candidate (timed 0 ms, nothing to choose between) and 0 ms prefills divide by nothing.
    assert choose({"plain": 0.0}, {"plain": 0.0}, {"plain": 0.0}, prompt_rows=64, steps=3).decode == "plain"
    # The lm_head has no prefill timings: it runs its decode kernel on the prompts' last rows.
    assert choose({"plain": 1.0, "onednn": 0.9}, {}, {}, prompt_rows=64, steps=0).decode == "onednn"
    with pytest.raises(ValueError, match="a request of 0 prompt rows and 3 decode steps"):
        choose(decode, long, short, prompt_rows=0, steps=3)


@pytest.mark.skipif(layouts.pack_mkl(torch.ones(2, 2), 1) is None, reason="torch has no MKL packed sgemm here")
def test_a_model_lays_its_weights_out_again_when_a_request_weighs_otherwise(tmp_path, embedded_dir, prompts,
                                                                           monkeypatch):
    """Same batch, other request shapes: a short request takes the layout with the faster prefill,
    a long one the faster step, and the tokens are plain fp32's under both."""
    from starcoder_tp.comm import TPGroup
    from starcoder_tp.device import Device
    from starcoder_tp.model import load_model
    from starcoder_tp.shard import shard_checkpoint
    from starcoder_tp.timing import timed_generate

    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))
    # 1 ms of prefill per prompt row (at 64 rows, 64 ms) against 1 ms more per step.
    fake = Choice("plain", "plain", None, {"plain": 1.0, "mkl_packed": 2.0}, {"plain": 64.0, "mkl_packed": 0.0},
                  {"plain": 512.0, "mkl_packed": 0.0})
    lm_head = Choice("onednn", "onednn", None, {"plain": 1.0, "onednn": 0.5}, {}, {})  # decode timings only
    monkeypatch.setattr(kernels, "measure", lambda weights, *a, **k: {
        shape: lm_head if shape == model.transformer.wte.shape_key() else fake for shape in weights})
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"))
    assert model.config.tie_word_embeddings, "the embedded model's lm_head is the embedding, packed apart"
    prompt = prompts[:1]
    rows = len(prompt[0])
    layouts, ticks, lm_heads = [], [], []
    model.progress_hooks.append(lambda: ticks.append(1))  # the rank's heartbeat, while it re-lays weights out
    for new_tokens in (1, rows + 4, 1):  # 0 steps: the prefill decides; rows + 3 steps: the step does
        ticks.clear()
        out = timed_generate(model, Device("cpu"), prompt, new_tokens)
        layouts.append({m.packed_kind for m in model.modules() if isinstance(m, kernels_linear.Linear)})
        lm_heads.append(model.lm_head_packed)
        assert len(ticks) >= len([m for m in model.modules() if isinstance(m, kernels_linear.Linear)])
        assert f"weighed for {rows} prompt rows + {new_tokens - 1} steps" in out.kernels
        assert torch.equal(out.output_ids, timed_generate(plain, Device("cpu"), prompt, new_tokens).output_ids)
    assert layouts == [{"mkl_packed"}, {None}, {"mkl_packed"}]
    assert lm_heads[0] is not None and all(p is lm_heads[0] for p in lm_heads), "the tied lm_head's layout never changed"

