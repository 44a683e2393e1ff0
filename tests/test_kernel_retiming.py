"""kernels.measure's timings taken again: a shape whose candidate ran far below its speed elsewhere
(kernel_timing.suspect_shapes), and a prefill timing that trades a weight's layout against its step
(kernels.traded). Timings are faked, so that the logic is checked apart from this machine's speed."""
import torch

from starcoder_tp import kernel_timing, kernels
from starcoder_tp.kernel_timing import suspect_shapes
from starcoder_tp.kernels import measure, traded


def test_a_shape_whose_decode_candidate_ran_far_below_its_speed_elsewhere_is_suspect():
    # ms per call of 16x16, 32x16, 64x16 fp32 weights (1, 2, 4 KiB): each candidate reads all at one speed
    even = {"16x16:float32": {"plain": 1.0, "onednn": 0.5}, "32x16:float32": {"plain": 2.0, "onednn": 1.0},
            "64x16:float32": {"plain": 4.0, "onednn": 2.0}}
    sizes = {"16x16:float32": 1024, "32x16:float32": 2048, "64x16:float32": 4096}
    assert suspect_shapes(even, sizes) == []
    uneven = {**even, "32x16:float32": {"plain": 3.9, "onednn": 1.0}}  # a candidate 1.95x slower there: as shapes differ
    assert suspect_shapes(uneven, sizes) == []
    disturbed = {**even, "32x16:float32": {"plain": 2.0, "onednn": 9.0}}  # onednn at 1/9 of its speed elsewhere
    assert suspect_shapes(disturbed, sizes) == ["32x16:float32"]
    two_shapes = {s: even[s] for s in ("16x16:float32", "32x16:float32")}
    assert suspect_shapes({**two_shapes, "32x16:float32": {"plain": 20.0, "onednn": 9.0}}, sizes) == [], "no median of two"
    lone = {s: {"plain": 0.0} for s in even}  # a lone candidate is not timed (0.0)
    assert suspect_shapes({**lone, "16x16:float32": {"plain": 0.0}}, sizes) == []


def test_a_slow_prefill_kernel_is_suspect_only_where_at_its_best_speed_it_would_be_its_layouts_figure():
    sizes = {"16x16:float32": 1024, "32x16:float32": 2048, "64x16:float32": 4096}
    # unpack reads 1024 bytes/ms at best (16x16), onednn 2048; 32x16's unpack at 1/8 of that
    ms = {"16x16:float32": {"onednn": 0.5, "unpack": 1.0}, "32x16:float32": {"onednn": 1.0, "unpack": 16.0},
          "64x16:float32": {"onednn": 2.0, "unpack": 4.5}}
    onednn_layout = {shape: [kernels.PREFILL_KERNELS["onednn"]] for shape in sizes}
    assert suspect_shapes(ms, sizes) == ["32x16:float32"], "without groups: every slow candidate"
    assert suspect_shapes(ms, sizes, onednn_layout) == [], "at 2.0 ms it would still lose to onednn's 1.0"
    close = {**ms, "32x16:float32": {"onednn": 2.5, "unpack": 16.0}}  # onednn slower there: unpack could lead
    assert suspect_shapes(close, sizes, onednn_layout) == ["32x16:float32"]
    alone = {shape: [("onednn", "unpack"), ("unpack",)] for shape in sizes}  # a layout that runs unpack alone
    assert suspect_shapes(ms, sizes, alone) == ["32x16:float32"], "its own layout's figure, whatever the rest"
    assert suspect_shapes(ms, sizes, {}) == ["32x16:float32"], "a shape without groups: each candidate its own"


def test_a_suspect_shapes_decode_candidates_are_timed_again_in_step_and_their_faster_timings_kept(monkeypatch):
    monkeypatch.setattr(kernels, "decode_candidates", lambda w, rows=1: ("plain", "onednn"))
    first, again = {"plain": 1.5, "onednn": 10.0}, {"plain": 1.6, "onednn": 1.0}  # 16x16's onednn disturbed, then not
    decode_answers = [first, {"plain": 3.0, "onednn": 2.0}, {"plain": 6.0, "onednn": 4.0}, again]
    prefills = []

    def time_ms(calls, on_progress=lambda: None, min_calls=1):
        if min_calls == kernel_timing.DECODE_MIN_CALLS:
            return dict(decode_answers.pop(0))
        prefills.append(sorted(calls))
        # Each shape's short and long prefill in turn, ms as its bytes; any later timing far faster: kept if taken.
        return {name: float(2 ** ((len(prefills) - 1) // 2)) if len(prefills) <= 6 else 0.01 for name in calls}
    monkeypatch.setattr(kernels, "time_ms", time_ms)
    reduced = []
    weights = {kernels.shape_key(w): w for w in (torch.randn(16, 16), torch.randn(32, 16), torch.randn(64, 16))}
    plan = measure(weights, 1, lambda t: reduced.append(len(t)) or t, prefill=set(weights))
    width = len(kernels.DECODE_SLOTS) + 2 * len(kernels.PREFILL_SLOTS)
    assert reduced == [2, 3 * width, width], "one more reduction: the suspect shape's retiming"
    assert not decode_answers, "16x16 (sorted first) timed twice, the others once"
    assert len(prefills) == 3 * 2, "its prefills not again: only the suspect part is timed again"
    assert plan["16x16:float32"].decode == "onednn"
    assert plan["16x16:float32"].decode_ms == {"plain": 1.5, "onednn": 1.0}, "each candidate's faster timing"
    assert plan["16x16:float32"].prefill_ms == {name: 1.0 for name in prefills[1]}, "its first prefill timings kept"
    assert plan["64x16:float32"].decode_ms == {"plain": 6.0, "onednn": 4.0}


def measured_with_prefills(monkeypatch, answers: list[dict[str, float]]) -> tuple[dict, list]:
    """measure() of 16x16, 32x16 and 64x16 fp32 weights whose prefill timings are `answers`, taken in
    call order (a lone decode candidate: not timed); (the plan, the decode timings' kinds in turn)."""
    decodes = []

    def time_ms(calls, on_progress=lambda: None, min_calls=1):
        if min_calls == kernel_timing.DECODE_MIN_CALLS:
            decodes.append(sorted(calls))
            return {name: 0.0 for name in calls}  # (a lone candidate is not timed)
        assert sorted(calls) == sorted(answers[0]), "the prefill kernels of the decode layout"
        return answers.pop(0)
    monkeypatch.setattr(kernels, "time_ms", time_ms)
    weights = {kernels.shape_key(w): w for w in (torch.randn(16, 16), torch.randn(32, 16), torch.randn(64, 16))}
    return measure(weights, 1, lambda t: t, prefill=set(weights)), decodes


def test_a_shape_whose_prefill_kernel_ran_far_below_its_speed_elsewhere_is_timed_again_too(monkeypatch):
    monkeypatch.setattr(kernels, "decode_candidates", lambda w, rows=1: ("plain",))  # a lone decode candidate
    # Prefill timings in call order: the short and the long prefill of 16x16, 32x16, 64x16 (ms
    # proportional to the weight), then 16x16's long one again: its first has onednn_plain disturbed.
    answers = [{"plain": 1.0, "onednn_plain": 0.5}, {"plain": 8.0, "onednn_plain": 40.0},
               {"plain": 2.0, "onednn_plain": 1.0}, {"plain": 16.0, "onednn_plain": 8.0},
               {"plain": 4.0, "onednn_plain": 2.0}, {"plain": 32.0, "onednn_plain": 16.0},
               {"plain": 8.5, "onednn_plain": 4.0}]
    plan, decodes = measured_with_prefills(monkeypatch, answers)
    assert not answers, "three shapes' short and long prefills, then 16x16's long one again (its short one not)"
    assert len(decodes) == 3, "nor its decode"
    assert plan["16x16:float32"].prefill == "onednn_plain", "not plain, which the disturbance made look faster"
    assert plan["16x16:float32"].prefill_ms == {"plain": 8.0, "onednn_plain": 4.0}, "each kernel's faster figure"
    assert plan["16x16:float32"].short_ms == {"plain": 1.0, "onednn_plain": 0.5}


def test_a_prefill_kernel_slow_where_it_loses_to_its_layouts_other_kernel_anyway_is_not_timed_again(monkeypatch):
    monkeypatch.setattr(kernels, "decode_candidates", lambda w, rows=1: ("onednn",))  # its kernels: onednn, unpack
    # unpack at 32x16's short prefill 8x slower than on the other shapes, but at its best (1024
    # bytes/ms) still behind onednn there: no shape is timed again (as 1024x4096 on the EPYC Zen 4 VM).
    answers = [{"onednn": 0.5, "unpack": 1.0}, {"onednn": 4.0, "unpack": 8.0},
               {"onednn": 1.0, "unpack": 16.0}, {"onednn": 8.0, "unpack": 16.0},
               {"onednn": 2.0, "unpack": 4.0}, {"onednn": 16.0, "unpack": 32.0}]
    plan, _ = measured_with_prefills(monkeypatch, answers)
    assert not answers, "each shape timed once"
    assert plan["32x16:float32"].short == "onednn" and plan["32x16:float32"].short_ms["unpack"] == 16.0


def test_a_prefill_timing_trades_where_the_layouts_taken_run_it_over_the_fraction_behind_its_fastest():
    # The EPYC Zen 4's plan of 2048x1024 fp32 at batch 16, world size 2 (ms): panels decoded fastest, and its
    # 512-row prefill read 10% behind oneDNN's, where other plans read it ahead.
    decode = {"onednn": 0.835, "onednn_wide": 0.860, "panels": 0.708, "plain": 1.51}
    prefill = {"onednn": 19.70, "onednn_wide": 19.72, "panels": 21.73, "plain": 23.69, "unpack": 25.10}
    assert traded(decode, prefill)
    near = 19.70 * (1 + kernels.TRADE_FRACTION)
    assert not traded(decode, {**prefill, "panels": near * 0.999}), "within the fraction: as plans differ"
    assert traded(decode, {**prefill, "panels": near * 1.001})
    # panels is taken into account where it is not the fastest decode: it is the fused step's layout
    wide_first = {**decode, "onednn_wide": 0.70}
    assert not traded(wide_first, prefill), "onednn_wide, the fastest decode, runs the fastest prefill itself"
    assert traded(wide_first, {**prefill, "onednn_wide": 23.0}), "neither onednn_wide nor panels keeps up"
    assert not traded(wide_first, {**prefill, "onednn_wide": 23.0, "panels": 19.9}), "panels does"
    # a layout's own prefill kernels count (onednn's: unpack too); a layout not taken does not
    assert not traded({"onednn": 1.0, "plain": 2.0}, {"unpack": 10.0, "onednn": 12.0, "plain": 11.0})
    assert traded({"onednn": 1.0, "plain": 2.0}, {"unpack": 12.0, "onednn": 12.0, "plain": 10.0})
    assert not traded({}, prefill) and not traded(decode, {}), "nothing timed: nothing traded"
    assert not traded({"plain": 0.0}, {"plain": 0.0}), "lone candidates, not timed"


def test_a_traded_prefill_is_timed_again_and_the_layout_weighed_from_each_kernels_faster_figure(monkeypatch):
    monkeypatch.setattr(kernels, "decode_candidates", lambda w, rows=1: ("plain", "onednn"))
    decodes, prefills = [], []

    def time_ms(calls, on_progress=lambda: None, min_calls=1):
        if min_calls == kernel_timing.DECODE_MIN_CALLS:
            decodes.append(sorted(calls))
            return {"plain": 2.0, "onednn": 1.0}  # onednn's layout decodes fastest, every shape
        prefills.append(sorted(calls))
        # plain, onednn_plain, onednn, unpack at one speed: ms as the shape's bytes (none of them suspect)
        ms = {name: 10.0 * 2 ** min((len(prefills) - 1) // 2, 2) for name in calls}
        if len(prefills) == 2:  # 16x16's long prefill, disturbed: oneDNN's layout's kernels 15% behind plain's
            ms.update(onednn=11.5, unpack=11.6)
        elif len(prefills) == 3:  # 32x16's short prefill, likewise
            ms.update(onednn=23.0, unpack=23.2)
        elif len(prefills) == 7:  # 16x16's long one taken again: oneDNN's layout ahead
            ms = {name: 10.0 for name in calls} | {"onednn": 9.5, "plain": 10.5}
        elif len(prefills) == 8:  # 32x16's short one again: at one speed
            ms = {name: 20.0 for name in calls}
        return ms
    monkeypatch.setattr(kernels, "time_ms", time_ms)
    reduced = []
    weights = {kernels.shape_key(w): w for w in (torch.randn(16, 16), torch.randn(32, 16), torch.randn(64, 16))}
    plan = measure(weights, 1, lambda t: reduced.append(len(t)) or t, prefill=set(weights))
    width = len(kernels.DECODE_SLOTS) + 2 * len(kernels.PREFILL_SLOTS)
    assert len(prefills) == 3 * 2 + 2 and len(decodes) == 3, "16x16's long and 32x16's short prefill again, no more"
    assert reduced == [2, 3 * width, 2 * width]
    first = {name: 10.0 for name in prefills[1]} | {"onednn": 11.5, "unpack": 11.6}
    assert plan["16x16:float32"].prefill_ms == {name: 10.0 for name in prefills[1]} | {"onednn": 9.5}
    assert plan["16x16:float32"].short_ms == {name: 10.0 for name in prefills[0]}
    assert plan["32x16:float32"].short_ms == {name: 20.0 for name in prefills[2]}, "its faster figures"
    assert plan["32x16:float32"].prefill_ms == {name: 20.0 for name in prefills[3]}
    # A 4096-row prompt and 3 steps: from the first timings alone the layout would have been plain's.
    first_choice = kernels.Choice("onednn", "onednn", None, {"plain": 2.0, "onednn": 1.0}, None, first)
    assert kernels.weigh(first_choice, 4096, 3).decode == "plain"
    assert (kernels.weigh(plan["16x16:float32"], 4096, 3).decode, plan["16x16:float32"].prefill) == ("onednn",
                                                                                                    "onednn")
