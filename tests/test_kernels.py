"""kernels.py: the choice from timings (faked here, so that the logic is checked apart from this
machine's speed), what is timed, the slowest rank's time, and the plan cache."""
import json

import pytest
import torch

from starcoder_tp import kernels
from starcoder_tp import linear as kernels_linear
from starcoder_tp.kernels import Choice, choose, fixed_choice, measure


def test_the_fastest_decode_layout_wins_then_the_fastest_prefill_kernel_it_can_run():
    c = choose({"plain": 2.26, "onednn": 1.27}, {"plain": 122.0, "onednn": 138.0, "unpack": 136.0})
    assert (c.decode, c.prefill) == ("onednn", "unpack"), "plain's faster prefill needs the plain layout"
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
    with pytest.raises(ValueError, match="no decode timings"):
        choose({}, {})


def test_a_choice_must_be_runnable_by_its_layout():
    with pytest.raises(AssertionError):
        Choice("plain", "onednn")


def test_fixed_modes_fall_back_to_plain_where_the_weight_cannot_take_them():
    assert fixed_choice("fp32", torch.empty(4, 4)) == Choice("plain", "plain"), "fp32 weights have no fp32 path"
    assert fixed_choice("onednn", torch.empty(4, 4, dtype=torch.float64)) == Choice("plain", "plain")
    assert fixed_choice("fp32", torch.empty(4, 4, dtype=torch.bfloat16)) == Choice("fp32", "fp32")


def fake_clock(monkeypatch, ms_per_call: dict[str, float]):
    """kernels.time_ms with every candidate's call costing the given milliseconds (by name)."""
    def time_ms(calls, on_progress=lambda: None):
        for call in calls.values():
            call()  # the real callables run once: they must work
        on_progress()
        return {name: ms_per_call[name] for name in calls}
    monkeypatch.setattr(kernels, "time_ms", time_ms)


def test_measure_times_every_candidate_of_every_shape_and_takes_the_slowest_ranks(monkeypatch):
    fake_clock(monkeypatch, {"plain": 1.0, "onednn": 2.0, "unpack": 3.0, "fp32": 0.5})
    other_rank = {"plain": 5.0}  # another rank is slow on plain: the max over ranks must see it
    reduced = []

    def slowest(t):
        reduced.append(len(t))
        return torch.maximum(t, torch.tensor([other_rank.get(n, 0.0) for n in order]))

    weights = {kernels.shape_key(w): w for w in (torch.randn(8, 16), torch.randn(32, 16))}
    can_pack = kernels.pack(torch.ones(2, 2), 1) is not None
    decode = ["plain", "onednn"] if can_pack else ["plain"]
    prefill = ["plain", "onednn", "unpack"] if can_pack else ["plain"]
    # Both shapes' decode timings, then prefill only for the first (the second: an lm_head).
    order = [*decode, *prefill, *decode]
    progress = []
    plan = measure(weights, 4, slowest, prefill={"32x16:float32"}, on_progress=lambda: progress.append(1))
    assert reduced == [len(order)], "one reduction across ranks for the whole plan"
    assert set(plan) == set(weights) and progress
    if can_pack:
        assert plan["32x16:float32"] == Choice("onednn", "onednn", {"plain": 5.0, "onednn": 2.0},
                                               {"plain": 5.0, "onednn": 2.0, "unpack": 3.0})
        assert (plan["8x16:float32"].decode, plan["8x16:float32"].prefill) == ("onednn", "onednn")


def test_time_ms_alternates_rounds_and_reports_each_candidates_median(monkeypatch):
    calls = []
    kernels_time = iter(range(10_000))
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: next(kernels_time) * 0.01)  # every read: 10 ms later
    result = kernels.time_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")})
    assert set(result) == {"a", "b"}
    rounds = calls[2:]  # after one warm call each
    assert rounds[:kernels.MIN_CALLS] == ["a"] * kernels.MIN_CALLS
    assert rounds[kernels.MIN_CALLS:3 * kernels.MIN_CALLS] == ["b"] * 2 * kernels.MIN_CALLS, "A B, B A: alternating"
    assert len(rounds) == kernels.ROUNDS * 2 * kernels.MIN_CALLS
    assert result["a"] == pytest.approx(10.0)


def test_a_cached_plan_is_reused_only_for_exactly_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path))
    weights = {"8x16:float32": torch.randn(8, 16)}
    key = kernels.plan_key(weights, 4, world_size=2)
    assert {"cpu_model", "cpu_isa", "cores", "torch", "onednn", "threads", "world_size", "rows", "shapes"} <= set(key)
    plan = {"8x16:float32": Choice("plain", "plain", {"plain": 1.0}, {"plain": 2.0})}
    assert kernels.load_plan(key) is None
    kernels.save_plan(key, plan)
    assert kernels.load_plan(key) == plan
    for change in ({"rows": 8}, {"world_size": 1}, {"threads": key["threads"] + 1}, {"cpu_isa": "avx2"}):
        assert kernels.load_plan({**key, **change}) is None, change
    kernels.plan_path(key).write_text("{not json")
    assert kernels.load_plan(key) is None, "an unreadable cache is measured again, not trusted"
    kernels.plan_path(key).write_text(json.dumps({"key": key, "plan": {"8x16:float32": {"decode": "x"}}}))
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
    assert first.kernels_summary().startswith("auto (measured, batch 1): ")
    shapes = {m.shape_key() for m in first.modules() if isinstance(m, kernels_linear.Linear)}
    shapes.add(kernels.shape_key(first.transformer.wte.weight))  # the lm_head, tied to the embedding
    assert set(first.kernel_plan) == shapes and all(c.decode_ms for c in first.kernel_plan.values())
    second = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"))
    assert second.kernels_summary().startswith("auto (cached, batch 1): ") and second.kernel_plan == first.kernel_plan
    out = timed_generate(second, Device("cpu"), (prompts * 2)[:2], 4)
    assert out.kernels.startswith("auto (measured, batch 2): "), "a new batch size is measured for its rows"
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
