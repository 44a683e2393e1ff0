"""fusion_choice.py: where only some shapes' kernels in a measured plan keep a decode step's layers from
fusing, the step timed both ways (the plan, those shapes in panels and the layers fused), a request laid out
the way that costs it least; cached per machine, model, plan and batch. On the embedded model, with a plan
whose timings say rowdot for one shape."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from starcoder_tp import fused_step, fusion_choice, panel_asks, panels, rowdot
from starcoder_tp.comm import TPGroup
from starcoder_tp.files import cache_dir
from starcoder_tp.kernels import Choice
from starcoder_tp.linear import Linear
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint

TARGET = "256x1024:float32"  # the MLP's c_proj: the shape the faked plan times rowdot faster for


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, embedded_dir) -> Path:
    """A cache holding the embedded model's calibrated forms (GELU, attention: seconds to measure), and
    its shards."""
    if rowdot.library()[0] is None or not panels.supports(torch.empty(16, 2)):
        pytest.skip("panels and fused steps need AVX2 and a C compiler: this CPU or build does not run them")
    root = tmp_path_factory.mktemp("calibrated")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("STARCODER_TP_CACHE", str(root / "cache"))
        shard_checkpoint(embedded_dir, root / "s", 1, dtype="float32")
        load_model(root / "s", TPGroup(0, 1), torch.device("cpu"), kernels="panels").use_kernels("panels", 1)
    (root / "cache").mkdir(exist_ok=True)  # (forms this process calibrated before are not written again)
    return root


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path, calibrated):
    """A cache of the test's own (the forms calibrated), no step timings in the process, the panels' asks
    left alone."""
    shutil.copytree(calibrated / "cache", tmp_path / "cache")
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fusion_choice, "_TIMED", {})
    monkeypatch.setattr(panel_asks, "settle", lambda model, batch: None)
    monkeypatch.delenv(fused_step.ENV, raising=False)


def _timed_plan(model, rowdot_ms: float = 0.9, panels_prefill_ms: float = 12.0) -> dict[str, Choice]:
    """Measured-looking timings for each of `model`'s shapes: panels fastest but for TARGET, where rowdot
    timed faster at decode (its layout prefilling by plain weights)."""
    plan = {}
    for shape, choice in model.kernel_timings.items():
        if shape == TARGET:
            plan[shape] = Choice("rowdot", "plain", "plain", {"rowdot": rowdot_ms, "panels": 1.0},
                                 {"plain": 2.0, "panels": 2.0}, {"plain": 10.0, "panels": panels_prefill_ms})
        else:
            plan[shape] = Choice("panels", "panels", "panels", {"panels": 1.0}, {"panels": 1.0}, {"panels": 1.0})
    return plan


@pytest.fixture
def model(calibrated):
    model = load_model(calibrated / "s", TPGroup(0, 1), torch.device("cpu"), kernels="panels")
    model.use_kernels("panels", 1)
    model.kernel_mode, model.kernel_timings = "auto", _timed_plan(model)  # (as if measured)
    return model


def _faked(step_ms: dict[str, float], calls: list):
    def measured(model, batch, plan, shapes):
        calls.append((batch, shapes))
        return dict(step_ms)
    return measured


def test_the_blocking_shapes_are_those_off_panels_that_were_timed_in_panels(model):
    plan = _timed_plan(model)
    assert fusion_choice.blocking(model, plan) == [TARGET]
    untimed = {**plan, TARGET: Choice("rowdot", "plain", "plain", {"rowdot": 0.9}, {"plain": 1.0}, {"plain": 1.0})}
    assert fusion_choice.blocking(model, untimed) == [], "a shape never timed in panels: nothing to weigh"
    fixed = {**plan, TARGET: Choice("rowdot", "plain")}
    assert fusion_choice.blocking(model, fixed) == []
    lm_head = "6144x256:float32"
    assert fusion_choice.blocking(model, {**plan, lm_head: Choice("rowdot", "plain", None, {"rowdot": 1.0,
                                          "panels": 2.0})}) == [TARGET], "the lm_head is not a layer's"


@pytest.mark.parametrize("ways,fused", [({"plan": 2.0, "fused": 1.0}, True), ({"plan": 1.0, "fused": 2.0}, False),
                                        ({"plan": 1.0, "fused": 1.0}, False)])
def test_the_faster_step_is_laid_out_and_shown(model, monkeypatch, ways, fused):
    calls = []
    monkeypatch.setattr(fusion_choice, "_measured", _faked(ways, calls))
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
    assert calls == [(1, [TARGET])]
    assert model.fused is not False, "fused or not decided with the layout, before the first timed step"
    assert model.weighed_plan[TARGET].decode == "rowdot", "the plan's own choice is kept beside the layout"
    assert model.kernel_plan[TARGET].decode == ("panels" if fused else "rowdot")
    assert (model.fused_layers() is not None) == fused
    summary = model.kernels_summary()
    assert (f"panels for fusion: {TARGET} (step ms fused 1.00, plan 2.00)" in summary) == fused
    assert ("layers fused" in summary) == fused
    stored = list((cache_dir("forms")).glob("fusion-*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["step_ms"] == ways


def test_the_same_request_again_lays_nothing_out_and_times_nothing(model, monkeypatch):
    calls, layouts = [], []
    monkeypatch.setattr(fusion_choice, "_measured", _faked({"plan": 2.0, "fused": 1.0}, calls))
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
        real = model.lay_out
        monkeypatch.setattr(model, "lay_out", lambda plan, rows: layouts.append(plan) or real(plan, rows))
        model.setup_cache(1, 160, (8, 8))
        model.setup_cache(1, 160, (8, 9))  # another request: the plan weighed again, the timings reused
    assert len(calls) == 1 and layouts == [] and model.kernel_plan[TARGET].decode == "panels"


def test_a_request_weighs_the_prefill_of_every_weight_of_those_shapes_against_its_steps(model):
    """TARGET's panels prefill costs 2 ms more a weight at 512 rows (12 against 10), and the model has 4
    layers: 8 ms more for the request, against 1 ms a step saved fused."""
    plan = _timed_plan(model)
    fused = {**plan, TARGET: fusion_choice.in_panels(plan[TARGET], (512, 4))}
    assert fused[TARGET] == Choice("panels", "panels", "panels", {"panels": 1.0}, {"plain": 2.0, "panels": 2.0},
                                   {"plain": 10.0, "panels": 12.0})
    step_ms = {"plan": 3.0, "fused": 2.0}

    def way(request):
        return fusion_choice._way(model, plan, fused, [TARGET], step_ms, request)

    assert way((512, 7)) == "plan", "7 steps save 7 ms, the prefill of 4 weights costs 8 ms more"
    assert way((512, 9)) == "fused", "9 steps save 9 ms"
    assert way((32, 1)) == "fused", "a short prompt: the short timings, alike"
    assert way(None) == "fused", "no request: the step alone"
    step_ms["fused"] = 3.0
    assert way(None) == "plan" and way((32, 1)) == "plan", "a tie: the plan's own choice"
    assert fusion_choice.prefill_ms(plan[TARGET], 1024) == pytest.approx(20.0)
    assert fusion_choice.prefill_ms(plan[TARGET], 32) == pytest.approx(1.0)


def test_timed_once_per_machine_then_read_back_and_agreed_across_ranks(model, monkeypatch):
    calls = []
    monkeypatch.setattr(fusion_choice, "_measured", _faked({"plan": 2.0, "fused": 1.0}, calls))
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
        fusion_choice._TIMED.clear()  # (a new process)
        model.lay_out(model.weighed_plan, 1)
        fusion_choice.settle(model, 1)
        assert len(calls) == 1 and model.kernel_plan[TARGET].decode == "panels", "read back from the cache"
        fusion_choice._TIMED.clear()
        model.lay_out(model.weighed_plan, 1)
        real = model.tp.max_
        monkeypatch.setattr(model.tp, "max_", lambda t: torch.maximum(real(t), torch.tensor([1.0, 0.0][:t.numel()],
                                                                                          dtype=t.dtype)))
        fusion_choice.settle(model, 1)
    assert len(calls) == 2, "another rank without the timings makes every rank time"


@pytest.mark.parametrize("stored", [{"plan": 2.0}, {"plan": "2.0", "fused": 1.0}, [2.0, 1.0], {"plan": 2, "fused": 1},
                                    {"plan": float("nan"), "fused": 1.0}, {"plan": 2.0, "fused": float("inf")},
                                    {"plan": 2.0, "fused": -1.0}])
def test_cached_timings_not_of_both_ways_are_timed_again(model, monkeypatch, stored):
    calls = []
    monkeypatch.setattr(fusion_choice, "_measured", _faked({"plan": 2.0, "fused": 1.0}, calls))
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
        (path,) = cache_dir("forms").glob("fusion-*.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), "step_ms": stored}))
        fusion_choice._TIMED.clear()
        model.lay_out(model.weighed_plan, 1)
        fusion_choice.settle(model, 1)
    assert len(calls) == 2


def test_a_fixed_plan_or_one_kept_apart_by_more_than_kernels_is_not_timed(model, monkeypatch):
    monkeypatch.setattr(fusion_choice, "_measured", lambda *a: pytest.fail("nothing to time"))
    monkeypatch.setenv(fused_step.ENV, "0")
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
    assert model.kernel_plan[TARGET].decode == "rowdot" and fusion_choice.describe(model) == ""
    monkeypatch.delenv(fused_step.ENV)
    fusion_choice._TIMED.clear()
    model.kernel_mode = "panels"
    monkeypatch.setattr(model.tp, "max_", lambda t: pytest.fail("a fixed mode: no collective"))
    fusion_choice.settle(model, 1)


def test_a_model_times_its_own_step_both_ways_and_leaves_its_plan(model, monkeypatch):
    """The real step: each way timed (only that both were, is checked: the times are this machine's), the
    fused way's steps through fused_step.c, the layouts made twice, the plan laid out after."""
    monkeypatch.setattr(fusion_choice, "BUDGET_S", 1e9)  # (a busy machine's step must not skip the timing)
    with torch.inference_mode():
        with monkeypatch.context() as untimed:
            untimed.setattr(fusion_choice, "settle", lambda model, batch: None)
            model.setup_cache(1, 160, (8, 8))
        plan = model.weighed_plan
        assert model.kernel_plan == plan
        runs, layouts = [], []
        real_run, real_lay_out = fused_step.FusedStep.run, model.lay_out
        monkeypatch.setattr(fused_step.FusedStep, "run", lambda self, *a: runs.append(1) or real_run(self, *a))
        monkeypatch.setattr(model, "lay_out", lambda p, rows: layouts.append(p[TARGET].decode) or real_lay_out(p, rows))
        step_ms = fusion_choice._measured(model, 1, plan, [TARGET])
    assert set(step_ms) == {"plan", "fused"} and all(ms > 0 for ms in step_ms.values())
    assert layouts == ["panels", "rowdot"] and model.kernel_plan == plan and model.fused_layers() is None
    assert len(runs) == 2 * (fusion_choice.STEPS + 1), "the fused way's two rounds, fused"


def test_a_step_too_slow_to_time_in_the_budget_keeps_the_plan_untimed_and_uncached(model, monkeypatch):
    monkeypatch.setattr(fusion_choice, "BUDGET_S", 0.0)
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
    assert model.kernel_plan[TARGET].decode == "rowdot"
    assert not list(cache_dir("forms").glob("fusion-*.json")), "not timed: timed again next time"


def test_a_layout_that_still_does_not_fuse_is_not_timed_and_the_plan_goes_back(model, monkeypatch):
    """Where the shapes in panels fuse nothing after all (on some rank): no timing, the plan laid out again."""
    monkeypatch.setattr(fusion_choice, "BUDGET_S", 1e9)
    with torch.inference_mode():
        with monkeypatch.context() as untimed:
            untimed.setattr(fusion_choice, "settle", lambda model, batch: None)
            model.setup_cache(1, 160, (8, 8))
        plan = model.weighed_plan
        monkeypatch.setattr(model, "fused_layers", lambda: None)
        assert fusion_choice._measured(model, 1, plan, [TARGET]) is None
    assert model.kernel_plan == plan


def test_another_rank_without_a_candidate_makes_no_rank_time(model, monkeypatch):
    monkeypatch.setattr(fusion_choice, "_measured", lambda *a: pytest.fail("nothing to time"))
    real = model.tp.max_
    monkeypatch.setattr(model.tp, "max_", lambda t: torch.maximum(real(t), torch.tensor([0.0, 1.0][:t.numel()],
                                                                                      dtype=t.dtype)))
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
    assert model.kernel_plan[TARGET].decode == "rowdot" and model.fused_layers() is None


def test_a_request_whose_prefill_outweighs_its_steps_goes_back_to_the_plan_without_timing_again(model, monkeypatch):
    calls = []
    monkeypatch.setattr(fusion_choice, "_measured", _faked({"plan": 2.0, "fused": 1.0}, calls))
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
        assert model.fused_layers() is not None and fusion_choice.describe(model)
        model.setup_cache(1, 160, (512 * 100, 1))  # 4 weights' prefill 800 ms slower in panels, 1 ms saved
        assert model.kernel_plan[TARGET].decode == "rowdot" and model.fused_layers() is None
        assert fusion_choice.describe(model) == "" and "layers fused" not in model.kernels_summary()
        model.setup_cache(1, 160, (8, 8))
    assert model.fused_layers() is not None and len(calls) == 1


def test_another_thread_count_is_timed_again_from_the_plan(model, monkeypatch):
    calls = []
    monkeypatch.setattr(fusion_choice, "_measured", _faked({"plan": 2.0, "fused": 1.0}, calls))
    with torch.inference_mode():
        model.setup_cache(1, 160, (8, 8))
        laid = []
        real = model.lay_out
        monkeypatch.setattr(model, "lay_out", lambda plan, rows: laid.append(plan[TARGET].decode) or real(plan, rows))
        monkeypatch.setattr(fusion_choice.torch, "get_num_threads", lambda: 7)
        fusion_choice.settle(model, 1)
    assert len(calls) == 2 and laid == ["rowdot", "panels"], "the plan laid out, timed, then the faster way"


def test_a_model_whose_weights_alone_exceed_the_budget_runs_no_step(model, monkeypatch):
    """The plan's own timings (each weight's decode kernel) bound the step from below: past the budget, no
    step is run to find out (a large model's would take seconds)."""
    plan = _timed_plan(model)
    linears = sum(isinstance(m, Linear) for m in model.modules()) + 1  # (+ the tied lm_head)
    assert fusion_choice.weights_s(model, plan) == pytest.approx((linears - 4 + 4 * 0.9) / 1e3), \
        "1 ms a weight, 0.9 for TARGET's 4 (rowdot)"
    monkeypatch.setattr(fusion_choice, "decode_step", lambda *a: pytest.fail("no step to run"))
    steps = len(fusion_choice.ORDER) * (fusion_choice.STEPS + 1)
    monkeypatch.setattr(fusion_choice, "BUDGET_S", fusion_choice.weights_s(model, plan) * steps * 0.99)
    with torch.inference_mode():
        assert fusion_choice._measured(model, 1, plan, [TARGET]) is None
