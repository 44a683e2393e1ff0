"""panel_asks.py: one-row panels calls asking for their weight ahead, non-temporal, at the distance
the model's own decode step ran fastest with, and blocks of rows asking for the next block into L1 or
L2 as the step at that batch ran fastest (panels.c): the same bits under every choice, the choice's
logic on faked step times, the timing's order and reduction, and when a model measures, reads the
cache or leaves it off."""
import json
import types

import pytest
import torch

from starcoder_tp import panels, panel_asks, rowdot
from starcoder_tp.comm import TPGroup
from starcoder_tp.kernels import Choice
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint

from test_panels import each

# The asks are AVX-512's panels kernels' (panels.c): panels_avx2.c's leave the stream to the hardware's
# prefetcher, and settle measures nothing where the path runs those.
needs_asks = pytest.mark.skipif(not rowdot.runs_at_least("avx512"),
                                reason="the asks are AVX-512's panels kernels': this CPU or build does not run them")


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch, tmp_path):
    """The process's choices as a fresh process has them, and a cache of the test's own; the library
    asking nothing ahead, and its blocks into L1, before and after."""
    monkeypatch.setattr(panel_asks, "ASKS", panel_asks.Asks())
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))
    panel_asks.reset()
    yield
    panel_asks.reset()


@each()
@pytest.mark.parametrize("n,k", [(16, 2), (48, 1030), (112, 4098), (64, 96)])
def test_asking_ahead_changes_no_bit(dtype, n, k):
    """Asks are hints: the same sums at any distance, including far past the weight's end."""
    torch.manual_seed(0)
    weight, b, x = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), torch.randn(1, k).to(dtype)
    packed = panels.pack(weight)
    panel_asks.set_bytes(0)
    expected = panels.linear(x, packed, b)
    for ahead in (64, 4096, 1 << 24):
        panel_asks.set_bytes(ahead)
        assert torch.equal(panels.linear(x, packed, b), expected), ahead


@pytest.mark.parametrize("setter,export,held,value", [("set_bytes", "panels_row_ahead", "bytes", 4096),
                                                      ("set_l2", "panels_block_asks", "l2", 1)])
def test_the_library_holds_the_choice_it_was_given(setter, export, held, value):
    lib, _ = rowdot.library()
    if lib is None:
        pytest.skip("the kernels' library is not built here (no C compiler)")
    getattr(panel_asks, setter)(value)
    assert getattr(lib, export)(0) == value and getattr(panel_asks.ASKS, held) == value
    assert getattr(lib, export)(0) == 0


@each()
@pytest.mark.parametrize("n,k,rows", [(112, 1030, 2), (112, 4098, 17), (64, 96, 16), (80, 2050, 5)])
def test_blocks_asking_into_l2_change_no_bit(dtype, n, k, rows):
    """Block asks are hints too: the same sums into L1 or L2, K whole and in chunks (a K past 1024
    steps), every row block shape, each shape with a next block to ask for (more than 3 panels)."""
    torch.manual_seed(0)
    weight, b, x = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), torch.randn(rows, k).to(dtype)
    packed = panels.pack(weight)
    expected = panels.linear(x, packed, b)
    panel_asks.set_l2(1)
    assert torch.equal(panels.linear(x, packed, b), expected)


@pytest.mark.parametrize("bad", [2, -1, True, 1.0, "1"])
def test_a_block_choice_that_is_neither_level_is_refused_by_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        panel_asks.set_l2(bad)


@pytest.mark.parametrize("bad", [-64, 100, 63])
def test_a_distance_that_is_not_whole_lines_is_refused_by_value(bad):
    with pytest.raises(ValueError, match=str(bad)):
        panel_asks.set_bytes(bad)


def test_the_fastest_is_taken_only_past_the_margin_and_ties_go_shorter():
    assert panel_asks.choose({0: 10.0, 2048: 9.7, 3072: 9.5, 4096: 9.4}) == 4096
    assert panel_asks.choose({0: 10.0, 2048: 9.95, 3072: 9.92, 4096: 10.3}) == 0, "within 1%: nothing ahead"
    assert panel_asks.choose({0: 10.0, 2048: 9.5, 3072: 9.5, 4096: 9.8}) == 2048
    assert panel_asks.choose({0: 9.0, 2048: 9.5, 3072: 9.6, 4096: 9.8}) == 0


def test_each_candidate_is_timed_after_one_untimed_step_in_turn_and_the_slowest_rank_taken(monkeypatch):
    """A fake clock that each step moves by its candidate's cost: the step times come out exactly, the
    order rotates each round, every timed block follows a step of its own, and the library asks for
    nothing ahead afterwards."""
    cost = {0: 10.0, 2048: 9.0, 3072: 8.0, 4096: 8.5}
    drift = [1.1, 5.0, 1.0, 1.2]  # each round's factor: the median (1.15) is neither mean, first nor last
    clock, seen = [0.0], []

    def step():
        seen.append(panel_asks.ASKS.bytes)
        clock[0] += cost[panel_asks.ASKS.bytes] * drift[(len(seen) - 1) // (per * len(cost))] / 1e3

    monkeypatch.setattr(panel_asks.time, "perf_counter", lambda: clock[0])
    ticks, per = [], panel_asks.STEPS + 1
    step_ms = panel_asks.measure(step, lambda t: t * 2, lambda: ticks.append(1), rounds=4)
    assert step_ms == pytest.approx({a: 2 * 1.15 * ms for a, ms in cost.items()}), \
        "the median of the rounds, the slowest rank's (here: doubled)"
    blocks = [seen[i:i + per] for i in range(0, len(seen), per)]
    assert all(len(set(block)) == 1 for block in blocks) and len(blocks) == 4 * len(cost)
    firsts = [blocks[r * len(cost)][0] for r in range(4)]
    assert firsts == list(panel_asks.ROW.candidates), "each round starts one candidate further"
    assert len(ticks) == len(blocks) and panel_asks.ASKS.bytes == 0


def test_the_block_levels_are_timed_in_turn_and_left_into_l1(monkeypatch):
    cost, clock, seen = {0: 10.0, 1: 9.0}, [0.0], []

    def step():
        seen.append((panel_asks.ASKS.l2, panel_asks.ASKS.bytes))
        clock[0] += cost[panel_asks.ASKS.l2] / 1e3

    monkeypatch.setattr(panel_asks.time, "perf_counter", lambda: clock[0])
    step_ms = panel_asks.measure(step, lambda t: t, rounds=3, knob=panel_asks.BLOCK)
    assert step_ms == pytest.approx(cost) and panel_asks.choose(step_ms) == 1
    per = panel_asks.STEPS + 1
    assert [seen[i][0] for i in range(0, len(seen), per)] == [0, 1, 1, 0, 0, 1], "rotated each round"
    assert {ahead for _, ahead in seen} == {0} and panel_asks.ASKS.l2 == 0


class _Ranks:
    """tp.max_ over this rank and a faked other rank's values (what it lacks, how slow it is)."""

    def __init__(self, other: list[float] | None = None):
        self.world_size, self.other, self.calls = 1, other, 0

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.other is None or len(self.other) != t.numel():
            return t
        return torch.maximum(t, torch.tensor(self.other, dtype=t.dtype))


class _Stub:
    """What settle reads of a model: its mode, plan, config, ranks and dtype."""

    def __init__(self, mode="auto", decode="panels", tp=None):
        self.config = types.SimpleNamespace(model_type="gpt_bigcode", n_layer=2, n_embd=64, n_head=4, n_inner=256)
        prefill = "panels" if decode == "panels" else "onednn"
        self.kernel_mode, self.kernel_plan = mode, {"64x64:float32": Choice(decode, prefill)}
        self.tp = tp or _Ranks()
        self.transformer = types.SimpleNamespace(ln_f=types.SimpleNamespace(weight=torch.zeros(64)))


def test_a_step_with_its_layers_fused_is_another_step_to_time():
    fused, op_by_op = _Stub(), _Stub()
    fused.fused = object()  # a fused_step.FusedStep
    row = panel_asks.ROW
    assert panel_asks._key(fused, "p", row, 1) != panel_asks._key(op_by_op, "p", row, 1)


def test_each_batch_and_knob_is_its_own_choice():
    model, block = _Stub(), panel_asks.BLOCK
    keys = [panel_asks._key(model, "p", panel_asks.ROW, 1), panel_asks._key(model, "p", block, 4),
            panel_asks._key(model, "p", block, 16)]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 3


def test_a_fixed_plan_or_no_panels_ask_for_nothing(monkeypatch):
    monkeypatch.setattr(panel_asks, "_measured", lambda model, batch=1: pytest.fail("nothing to measure"))
    for model, batch in ((_Stub(mode="panels"), 1), (_Stub(mode="panels"), 4), (_Stub(decode="onednn"), 1),
                         (_Stub(decode="onednn"), 16)):
        panel_asks.set_bytes(4096)
        panel_asks.set_l2(1)
        panel_asks.settle(model, batch)
        assert (panel_asks.ASKS.bytes, panel_asks.ASKS.l2, panel_asks.describe()) == (0, 0, "")
        # A fixed mode is the same on every rank: no collective; a plan without panels may not be (a
        # rank's own cached plan): agreed on by one.
        assert model.tp.calls == (model.kernel_mode == "auto")


@pytest.mark.parametrize("path,dtype", [("avx2", torch.float32), ("avx2", torch.bfloat16), ("avx512", torch.bfloat16)])
def test_panels_run_by_avx2s_kernels_ask_for_nothing(path, dtype, monkeypatch):
    """The asks are AVX-512's kernels' (panels.c): where the path taken runs AVX2's (panels_avx2.c: a CPU
    without AVX-512, or bf16 without AVX512_BF16), there is nothing to measure."""
    if rowdot.library()[0] is None:
        pytest.skip("the kernels' library is not built here (no C compiler)")
    monkeypatch.setattr(rowdot, "path", lambda: path)
    monkeypatch.setattr(panel_asks, "_measured", lambda model, batch=1: pytest.fail("nothing to measure"))
    model = _Stub()
    model.transformer.ln_f.weight = torch.zeros(64, dtype=dtype)
    panel_asks.set_bytes(4096)
    panel_asks.settle(model, 1)
    assert (panel_asks.ASKS.bytes, panel_asks.ASKS.l2, panel_asks.describe()) == (0, 0, "")


@pytest.mark.parametrize("batch", [1, 4])
def test_one_rank_without_panels_makes_every_rank_ask_for_nothing(batch, monkeypatch):
    monkeypatch.setattr(panel_asks, "_measured", lambda model, batch=1: pytest.fail("nothing to measure"))
    panel_asks.set_bytes(4096)
    panel_asks.set_l2(1)
    panel_asks.settle(_Stub(tp=_Ranks(other=[0.0, 1.0])), batch)
    assert (panel_asks.ASKS.bytes, panel_asks.ASKS.l2, panel_asks.describe()) == (0, 0, "")


@needs_asks
def test_measured_once_per_machine_then_read_back_and_kept_per_model(monkeypatch):
    measured = []
    monkeypatch.setattr(panel_asks, "_measured",
                        lambda model, batch=1: measured.append(model) or (3072, "step ms faked"))
    model = _Stub()
    panel_asks.settle(model, 1)
    assert measured == [model] and panel_asks.ASKS.bytes == 3072
    assert panel_asks.describe() == "; row-ahead 3072" and "measured" in panel_asks.ASKS.chosen
    calls = model.tp.calls
    panel_asks.settle(model, 1)
    assert model.tp.calls == calls, "the same model and plan again: settled, no collective"
    panel_asks.set_bytes(0)
    other = _Stub()
    panel_asks.settle(other, 1)
    assert measured == [model] and panel_asks.ASKS.bytes == 3072 and "cached" in panel_asks.ASKS.chosen
    lacking = _Stub(tp=_Ranks(other=[1.0, 0.0]))
    panel_asks.settle(lacking, 1)
    assert measured == [model, lacking], "a rank without the cached choice makes every rank measure"


@needs_asks
def test_several_rows_set_the_block_asks_per_batch_and_one_row_the_distance(monkeypatch):
    measured, choices = [], {1: 3072, 4: 1, 8: 0}

    def faked(model, batch=1):
        measured.append(batch)
        return choices[batch], "step ms faked"

    monkeypatch.setattr(panel_asks, "_measured", faked)
    model = _Stub()
    panel_asks.settle(model, 4)
    assert (panel_asks.ASKS.l2, panel_asks.ASKS.bytes, panel_asks.describe()) == (1, 0, "; block-asks L2")
    panel_asks.settle(model, 1)
    assert (panel_asks.ASKS.l2, panel_asks.ASKS.bytes, panel_asks.describe()) == (0, 3072, "; row-ahead 3072"), \
        "one row: the blocks (its prefill's) back into L1"
    panel_asks.settle(model, 4)
    assert panel_asks.ASKS.l2 == 1 and "cached" in panel_asks.ASKS.chosen and measured == [4, 1]
    panel_asks.settle(model, 8)
    assert (panel_asks.ASKS.l2, panel_asks.describe()) == (0, "; block-asks L1") and measured == [4, 1, 8]


@needs_asks
@pytest.mark.parametrize("batch,stored", [(1, 100), (1, -64), (1, True), (1, 4096.0), (1, "4096"), (4, 2),
                                          (4, True), (4, 1.0), (4, "1"), (4, 2048)])
def test_a_cached_value_not_of_the_candidates_is_measured_again(batch, stored, monkeypatch):
    knob = panel_asks.knob_for(batch)
    first, again = knob.candidates[1], knob.candidates[-1]
    monkeypatch.setattr(panel_asks, "_measured", lambda model, batch=1: (first, "step ms faked"))
    panel_asks.settle(_Stub(), batch)
    (path,) = (panel_asks.cache_dir("forms")).glob(f"{knob.name}-*.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "value": stored}))
    panel_asks.reset()
    measured = []
    monkeypatch.setattr(panel_asks, "_measured", lambda model, batch=1: measured.append(model) or (again, "faked"))
    panel_asks.settle(_Stub(), batch)
    value = panel_asks.ASKS.bytes if batch == 1 else panel_asks.ASKS.l2
    assert len(measured) == 1 and value == again


@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_times_its_own_step_at_its_batch_and_shows_the_choice(batch, tmp_path, embedded_dir, monkeypatch):
    """The real step, every candidate of the batch's knob timed (its time is whatever this machine gives:
    only that each was timed, and that the choice is one of them, is checked), the choice in the plan's
    line and the cache, steps of the batch's rows, the timed slot written in every sequence."""
    if rowdot.library()[0] is None:
        pytest.skip("the kernels' library is not built here (no C compiler)")
    if not panels.supports(torch.empty(16, 2)) or not rowdot.runs_at_least("avx512"):
        pytest.skip("the asks are AVX-512's panels kernels': this CPU or build does not run them")
    shard_checkpoint(embedded_dir, tmp_path / "s", 1, dtype="float32")
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="panels")
    monkeypatch.setattr(panel_asks, "BUDGET_S", 1e9)  # (a busy machine's step must not skip the timing)
    with torch.inference_mode():
        model.setup_cache(batch, 160, (8, 8))
    assert panel_asks.describe() == "", "a fixed plan asks for nothing ahead"
    model.kernel_mode = "auto"  # (as if measured: panels laid out for every linear)
    timed = []
    real = panel_asks.measure
    monkeypatch.setattr(panel_asks, "measure", lambda *a, **k: timed.append(real(*a, **k)) or timed[-1])
    panel_asks.ASKS.settled_for = None
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    panel_asks.settle(model, batch)
    assert shapes and set(shapes) == {(batch, 1)}, "steps of the batch's rows"
    knob = panel_asks.knob_for(batch)
    value = panel_asks.ASKS.bytes if batch == 1 else panel_asks.ASKS.l2
    assert len(timed) == 1 and set(timed[0]) == set(knob.candidates) and value in knob.candidates
    assert f"{knob.name} {knob.label(value)}" in model.kernels_summary()
    (stored,) = (tmp_path / "cache" / "forms").glob(f"{knob.name}-*.json")
    assert json.loads(stored.read_text())["value"] == value
    written = model.transformer.h[0].attn.k_cache[:, :, 128].flatten(1).abs().sum(1)
    assert bool((written > 0).all()), "every sequence's slot 128 was timed"


@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_whose_weights_alone_are_too_slow_for_two_rounds_runs_no_step(batch, monkeypatch):
    """The plan's timings of its weights bound a step from below: past two rounds in the budget, no step
    of a large model is run to find out, at every start (nothing is cached of a "not timed")."""
    knob = panel_asks.knob_for(batch)
    two_rounds = len(knob.candidates) * (panel_asks.STEPS + 1) * 2  # steps
    model = _Stub()
    monkeypatch.setattr(panel_asks, "decode_step", lambda *a: pytest.fail("no step to run"))
    monkeypatch.setattr(panel_asks, "weights_s", lambda m, plan: plan is model.kernel_plan and
                        panel_asks.BUDGET_S / two_rounds * 1.01)
    value, how = panel_asks._measured(model, batch)
    assert value == 0 and how == f"not timed, the plan's weights take {panel_asks.BUDGET_S / two_rounds * 1.01e3:.0f} ms a step"
    monkeypatch.undo()
    monkeypatch.setattr(panel_asks, "decode_step", lambda *a: pytest.fail("no step to run"))
    other = _Stub(tp=_Ranks(other=[panel_asks.BUDGET_S]))  # (no timings here; another rank's are slow)
    other.modules, other.config.tie_word_embeddings = lambda: [], False
    assert panel_asks._measured(other, batch)[1].startswith("not timed, the plan's weights take"), \
        "the slowest rank's weights decide, on every rank alike"
    ran = []
    monkeypatch.setattr(panel_asks, "weights_s", lambda m, plan: panel_asks.BUDGET_S / two_rounds * 0.99)
    monkeypatch.setattr(panel_asks, "decode_step", lambda *a: ran.append(1) or (lambda: None))
    monkeypatch.setattr(panel_asks, "first_step_s", lambda m, step: 1e9)
    assert panel_asks._measured(model, batch)[1].startswith("not timed, a step took") and ran, \
        "within the budget by the weights: a step is run, and it decides"


@pytest.mark.parametrize("batch", [1, 4])
def test_a_step_too_slow_for_two_rounds_in_the_budget_is_not_timed(batch, monkeypatch):
    """A model whose step is that slow is dominated by its weights: the default, said so, no rounds run
    (the budget counts the batch's knob's candidates)."""
    clock, slots = [0.0], []
    monkeypatch.setattr(panel_asks.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(panel_asks, "measure", lambda *a, **k: pytest.fail("no rounds fit the budget"))
    knob = panel_asks.knob_for(batch)
    two_rounds = len(knob.candidates) * (panel_asks.STEPS + 1) * 2  # steps

    class Slow:
        tp, cache_len, kernel_plan = _Ranks(), 64, {}
        transformer = _Stub().transformer
        config = types.SimpleNamespace(tie_word_embeddings=False)

        def modules(self):
            return []

        def __call__(self, ids, position, slot):
            slots.append(slot)
            clock[0] += panel_asks.BUDGET_S / two_rounds * 1.1

    value, how = panel_asks._measured(Slow(), batch)
    assert value == 0 and how.startswith("not timed") and slots == [63, 63], \
        "a cold step, then one timed, at a slot the cache has"

    def fast(self, ids, position, slot):
        clock[0] += panel_asks.BUDGET_S / two_rounds * 0.9

    rounds_run = []

    def measure(step, slowest, tick, rounds, knob):
        rounds_run.append(rounds)
        return {a: 1.0 - 0.05 * i for i, a in enumerate(knob.candidates)}

    Slow.__call__, Slow._tick = fast, lambda self: None
    monkeypatch.setattr(panel_asks, "measure", measure)
    assert panel_asks._measured(Slow(), batch) == (knob.candidates[-1], "step ms " + ", ".join(
        f"{knob.label(a)}: {1.0 - 0.05 * i:.2f}" for i, a in enumerate(knob.candidates))) and rounds_run == [2], \
        "two rounds fit: timed, two rounds"


def test_the_slot_the_timing_writes_changes_no_token(tmp_path, embedded_dir):
    """The timed steps write their K/V into one slot of the cache (slot 128 of a longer cache); a
    request whose tokens reach past it writes it before reading it: the same tokens as on a fresh
    cache."""
    if not panels.supports(torch.empty(16, 2)):
        pytest.skip("panels need AVX2 and a C compiler: this CPU or build does not run them")
    from starcoder_tp.device import Device
    from starcoder_tp.timing import timed_generate

    shard_checkpoint(embedded_dir, tmp_path / "s", 1, dtype="float32")
    fresh = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="panels")
    timed = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="panels")
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    with torch.inference_mode():
        timed.setup_cache(1, 256)
        panel_asks._measured(timed)
    assert timed.transformer.h[0].attn.k_cache[0, :, 128].abs().sum() > 0, "the timing wrote slot 128"
    a = timed_generate(fresh, Device("cpu"), prompt, 150, max_seq_len=256)
    b = timed_generate(timed, Device("cpu"), prompt, 150, max_seq_len=256)
    assert torch.equal(a.output_ids, b.output_ids)
