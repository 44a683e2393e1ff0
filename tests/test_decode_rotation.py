"""The decode candidates' calls interleaved over copies of their own (kernel_timing.decode_calls,
Rotation): a step's bytes between two calls on one copy, with about K / (K - 1) steps' bytes of
copies in all for K >= 3 candidates (one step's for two), not a step's for each."""
import pytest
import torch

from starcoder_tp import gemv, kernel_timing, kernels, panels, rowdot
from starcoder_tp import linear as kernels_linear


def fake_calls(monkeypatch, cost: dict[str, list[float]], calls: list[str]):
    """Callables costing, on a fake clock, the seconds of `cost[name]` in turn (its last for the
    rest), each call's name appended to `calls`."""
    clock, made = [0.0], dict.fromkeys(cost, 0)
    monkeypatch.setattr(kernel_timing, "perf_counter", lambda: clock[0])

    def call(name):
        def run():
            calls.append(name)
            clock[0] += cost[name][min(made[name], len(cost[name]) - 1)]
            made[name] += 1
        return run
    return {name: call(name) for name in cost}


def rotation(copies: int, each: int, calls: dict) -> kernel_timing.Rotation:
    rot = kernel_timing.Rotation(copies, each)
    rot.update(calls)
    return rot


def test_a_rotation_is_timed_one_call_of_each_in_turn_and_prunes_only_where_the_rest_keep_a_step(monkeypatch):
    calls = []
    # seconds per call: c is 10x a's time after its warm call (20x on its first timed one)
    cost = {"a": [0.0015], "b": [0.0025], "c": [0.0015, 0.030, 0.015]}
    fake = fake_calls(monkeypatch, cost, calls)
    assert kernel_timing.time_ms(rotation(3, 1, fake)) == pytest.approx({"a": 1.5, "b": 2.5, "c": 15.0})
    assert calls[:9] == ["a", "b", "c"] * 3, "a warm turn (one copy each), then two first calls each (c over 2x a's)"
    assert calls[9:] == ["a", "b", "c"] * 6, \
        "c kept (with one copy each, a and b alone would call each copy again after one call), then two " \
        "rounds in the same order (no call twice in a row), each going round until a has run ROUND_MIN_S"
    calls.clear()
    kernel_timing.time_ms(rotation(3, 1, fake), min_calls=5)
    assert calls[9:] == ["a", "b", "c"] * 10, "min_calls calls of each a round"

    calls.clear()
    fake = fake_calls(monkeypatch, {**cost, "c": [0.0015, 0.0015, 0.030, 0.015]}, calls)  # (two warm calls)
    assert kernel_timing.time_ms(rotation(3, 2, fake)) == pytest.approx({"a": 1.5, "b": 2.5, "c": 15.0}), \
        "c dropped: the faster of its first two calls (30 and 15 ms)"
    assert calls[:6] == ["a", "b", "c"] * 2, "two copies each: two warm turns"
    assert calls[6:12] == ["a", "b", "c"] * 2 and calls[12:] == ["a", "b"] * 6, \
        "a and b alone keep two calls between two on one copy: c dropped after its first two calls"

    calls.clear()
    fake = fake_calls(monkeypatch, {**cost, "c": [0.0029]}, calls)  # within PRUNE_FACTOR x a's time
    kernel_timing.time_ms(rotation(3, 2, fake))
    assert calls[6:] == ["a", "b", "c"] * 7, "one first call each, then two rounds"

    calls.clear()
    # a's first call slowed: the best is taken over both first turns (1.5 ms), so c (4.5 at best) goes
    slowed = {"a": [0.001, 0.001, 0.004, 0.0015], "b": [0.0025], "c": [0.001, 0.001, 0.006, 0.0045]}
    fake = fake_calls(monkeypatch, slowed, calls)
    assert kernel_timing.time_ms(rotation(3, 2, fake))["c"] == pytest.approx(4.5)
    assert calls[12:] == ["a", "b"] * 6

    calls.clear()
    lone = rotation(3, 1, fake_calls(monkeypatch, {"a": [0.001]}, calls))
    assert kernel_timing.time_ms(lone) == {"a": 0.0} and not calls, "one candidate: nothing to time"


def test_of_two_slow_candidates_the_slowest_is_dropped_first_and_of_two_candidates_neither(monkeypatch):
    calls = []
    cost = {"a": [0.0015], "b": [0.0015], "c": [0.006], "d": [0.009]}
    fake = fake_calls(monkeypatch, cost, calls)
    # a step: 5 calls; two copies each: three candidates keep 6 calls apart, two only 4
    result = kernel_timing.time_ms(rotation(5, 2, fake))
    assert result == pytest.approx({"a": 1.5, "b": 1.5, "c": 6.0, "d": 9.0})
    assert calls[8:16] == ["a", "b", "c", "d"] * 2 and calls[16:] == ["a", "b", "c"] * 6, \
        "d, the slowest, dropped; c then kept, as a and b alone would come round too soon"

    calls.clear()
    pair = {"a": [0.0015], "c": [0.015]}
    kernel_timing.time_ms(rotation(4, 2, fake_calls(monkeypatch, pair, calls)))
    assert calls[4:] == ["a", "c"] * 8, "of two candidates neither is dropped: one alone has half the copies"


def test_a_rotation_keeps_a_step_while_its_candidates_go_round_their_copies_in_as_many_calls():
    rot = kernel_timing.Rotation(6, 3)
    assert rot.keeps_a_step(["a", "b"]), "3 copies each, 2 candidates a turn: 6 calls between two on one copy"
    assert rot.keeps_a_step(["a", "b", "c"])
    assert not rot.keeps_a_step(["a"]), "3 calls: too few"


def test_no_timed_call_finds_its_copy_fewer_than_a_steps_calls_since_its_last_call_or_its_making(monkeypatch):
    """time_ms over real decode calls: before each timed call, at least `copies` - 1 calls on other
    copies since the last call on its copy, or since the first call at all (the copies are made one
    candidate after the other: the last made were written just before)."""
    weight, copies = torch.randn(48, 16), 9
    kinds = kernels.decode_candidates(weight)
    kinds = kinds if len(kinds) >= 3 else ("plain", "fp32", *kinds[1:])  # (three at least: one may be dropped)
    seen: list[tuple[int, bool]] = []
    timing = [False]
    real_linear, real_packed = torch.nn.functional.linear, kernels_linear.packed_linear
    seconds: dict[int, float] = {}  # by callable: each candidate 1 ms a call, the last 5 ms (dropped: room for one)

    def timed(call):
        timing[0] = True
        try:
            call()
        finally:
            timing[0] = False
        return seconds[id(call)]
    monkeypatch.setattr(kernel_timing, "_timed", timed)
    record = [True]

    def spy(fn):
        def wrapped(x, w, *args, **kw):
            if record[0]:
                record[0] = False  # (a kernel may call another inside: one record a call)
                seen.append((w.data_ptr() if w.layout == torch.strided else id(w), timing[0]))
                try:
                    return fn(x, w, *args, **kw)
                finally:
                    record[0] = True
            return fn(x, w, *args, **kw)
        return wrapped
    monkeypatch.setattr(torch.nn.functional, "linear", spy(real_linear))
    monkeypatch.setattr(kernels_linear, "packed_linear", spy(real_packed))
    for module, name in ((kernels_linear, "mkl_linear"), (kernels_linear, "fp32_linear"), (gemv, "linear"),
                         (rowdot, "linear")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    real_bound = panels.Bound.__call__
    monkeypatch.setattr(panels.Bound, "__call__", lambda self, x: spy(lambda x, w: real_bound(self, x))(x, self.packed))
    calls = kernel_timing.decode_calls(weight, 1, kinds, copies=copies)
    seconds.update({id(call): 0.001 for call in calls.values()})
    seconds[id(calls[kinds[-1]])] = 0.005
    kernel_timing.time_ms(calls, min_calls=2)
    rounds_turns = 2 * 4  # two rounds of 4 ms at 1 ms a call
    assert sum(t for _, t in seen) == 2 * len(kinds) + rounds_turns * (len(kinds) - 1), \
        "two first turns (the last over 2x), then the last dropped: a run with pruning among real copies"
    last: dict[int, int] = {}
    for i, (ptr, was_timed) in enumerate(seen):
        if was_timed:
            apart = i - last.get(ptr, 0) - 1
            assert apart >= copies - 1, f"timed call {i} found its copy {apart} calls on"
        last[ptr] = i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("copies", [1, 7, 16])
@pytest.mark.parametrize("candidates", ["all", "two"])
def test_interleaved_decode_calls_read_a_steps_copies_between_two_calls_on_one_copy(monkeypatch, dtype, copies,
                                                                                    candidates):
    """The candidates' calls, one of each in turn as time_ms runs a Rotation, each on the next copy
    of its layout: between two calls on one copy at least `copies` - 1 calls on other copies (a
    timed call reads a weight the calls since the last on it have evicted: from memory, as the
    model's step), never the weight given, and about K / (K - 1) x `copies` copies in all for K
    candidates, not `copies` per layout: every candidate this CPU has, or two (whose copies are
    each half a step's, neither to be dropped)."""
    weight = torch.randn(48, 16).to(dtype)
    seen: list[int] = []
    real = {"linear": torch.nn.functional.linear, "packed": kernels_linear.packed_linear,
            "mkl": kernels_linear.mkl_linear, "fp32": kernels_linear.fp32_linear, "gemv": gemv.linear,
            "rowdot": rowdot.linear, "panels": panels.Bound.__call__}

    def spy(fn, arg):
        def wrapped(*args, **kw):
            if not spying[0]:
                return fn(*args, **kw)
            spying[0] = False  # (fp32_linear may run F.linear inside: one record a call)
            w = args[arg]
            seen.append(w.data_ptr() if w.layout == torch.strided else id(w))
            try:
                return fn(*args, **kw)
            finally:
                spying[0] = True
        return wrapped
    spying = [True]
    monkeypatch.setattr(torch.nn.functional, "linear", spy(real["linear"], 1))
    for module, name, fn in ((kernels_linear, "packed_linear", "packed"), (kernels_linear, "mkl_linear", "mkl"),
                             (kernels_linear, "fp32_linear", "fp32"), (gemv, "linear", "gemv"),
                             (rowdot, "linear", "rowdot")):
        monkeypatch.setattr(module, name, spy(real[fn], 1))
    monkeypatch.setattr(panels.Bound, "__call__", lambda self, x: seen.append(self.packed.data_ptr())
                        or real["panels"](self, x))
    kinds = kernels.decode_candidates(weight) if candidates == "all" else ("plain", "fp32")
    ticks = []
    calls = kernel_timing.decode_calls(weight, 2, kinds, copies=copies, on_progress=lambda: ticks.append(1))
    assert isinstance(calls, kernel_timing.Rotation) == (copies > 1) and list(calls) == list(kinds), \
        "interleaved where there is a rotation; one copy each: time_ms's rounds, as before"
    plain_kinds = {"plain", "fp32", "gemv", "rowdot"} & set(kinds)
    each = -(-copies // (len(kinds) - 1 if len(kinds) >= 3 else len(kinds)))  # (room to drop one of three or more)
    want_copies = each * len(kinds) if copies > 1 else 1 + len(kinds) - len(plain_kinds)  # (one plain copy shared)
    assert len(ticks) == want_copies, "a heartbeat tick per copy made"
    want = torch.nn.functional.linear(torch.ones(2, 16).to(dtype), weight)
    made = set()
    for dropped in [None, *(kinds if len(kinds) >= 3 else [])]:  # all, or all but one (time_ms may drop one)
        names = [kind for kind in kinds if kind != dropped]
        if copies > 1:
            assert calls.keeps_a_step(names)
        seen.clear()
        for _ in range(2 * copies + 2):  # as time_ms turns over a Rotation
            for name in names:
                assert calls[name]().shape == want.shape
        assert len(seen) == (2 * copies + 2) * len(names), "one record a call"
        assert weight.data_ptr() not in seen, "timed on the weight given itself, not a copy"
        last: dict[int, int] = {}
        for i, ptr in enumerate(seen):
            if ptr in last:
                assert i - last[ptr] - 1 >= copies - 1, f"call {i} on a copy read {i - last[ptr] - 1} calls before"
            last[ptr] = i
        made |= set(last)
    assert len(made) == want_copies
