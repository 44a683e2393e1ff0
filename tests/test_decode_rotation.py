"""The decode candidates' calls interleaved over copies of their own (kernel_timing.decode_calls,
Rotation): a step's bytes between two calls on one copy, with copies of about a step's bytes in all."""
import pytest
import torch

from starcoder_tp import gemv, kernel_timing, kernels, panels, rowdot
from starcoder_tp import linear as kernels_linear


def test_a_rotation_is_timed_one_call_of_each_in_turn_and_prunes_only_where_the_rest_keep_a_step(monkeypatch):
    calls = []
    cost = {"a": 0.0015, "b": 0.0025, "c": 0.015}  # seconds per call; c 10x a
    clock = [0.0]
    monkeypatch.setattr(kernel_timing, "perf_counter", lambda: clock[0])

    def call(name):
        def run():
            calls.append(name)
            clock[0] += cost[name]
        return run

    def rotation(copies_each):  # a step's bytes: three calls
        rot = kernel_timing.Rotation(3, copies_each)
        rot.update({name: call(name) for name in cost})
        return rot

    assert kernel_timing.time_ms(rotation(1)) == pytest.approx({"a": 1.5, "b": 2.5, "c": 15.0})
    assert calls[:9] == ["a", "b", "c"] * 3, "a warm call of each, then two first calls each (c over 2x a's)"
    assert calls[9:] == ["a", "b", "c"] * 6, \
        "c kept (with one copy each, a and b alone would call each copy again after one call), then two " \
        "rounds in the same order (no call twice in a row), each going round until a has run ROUND_MIN_S"
    calls.clear()
    kernel_timing.time_ms(rotation(1), min_calls=5)
    assert calls[9:] == ["a", "b", "c"] * 10, "min_calls calls of each a round"
    calls.clear()
    assert kernel_timing.time_ms(rotation(2)) == pytest.approx({"a": 1.5, "b": 2.5, "c": 15.0}), "c: its faster call"
    assert calls[9:] == ["a", "b"] * 6, "two copies each: a and b alone keep two calls between two on one copy"
    calls.clear()
    cost["c"] = 0.0029  # within PRUNE_FACTOR x a's time: no second first call
    kernel_timing.time_ms(rotation(2))
    assert calls[:6] == ["a", "b", "c"] * 2 and calls[6:] == ["a", "b", "c"] * 6
    lone = kernel_timing.Rotation(3, 1)
    lone["a"] = call("a")
    calls.clear()
    assert kernel_timing.time_ms(lone) == {"a": 0.0} and not calls, "one candidate: nothing to time"


def test_a_rotation_keeps_a_step_while_its_candidates_go_round_their_copies_in_as_many_calls():
    rot = kernel_timing.Rotation(6, 3)
    assert rot.keeps_a_step(["a", "b"]), "3 copies each, 2 candidates a turn: 6 calls between two on one copy"
    assert rot.keeps_a_step(["a", "b", "c"])
    assert not rot.keeps_a_step(["a"]), "3 calls: too few"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("copies", [1, 7, 16])
def test_interleaved_decode_calls_read_a_steps_copies_between_two_calls_on_one_copy(monkeypatch, dtype, copies):
    """The candidates' calls, one of each in turn as time_ms runs a Rotation, each on the next copy
    of its layout: between two calls on one copy at least `copies` - 1 calls on other copies (a
    timed call reads a weight the calls since the last on it have evicted: from memory, as the
    model's step), never the weight given, and about `copies` copies in all, not per layout."""
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
    kinds = kernels.decode_candidates(weight)
    assert len(kinds) >= 4, kinds  # (several layouts and several plain candidates, on any CPU we run)
    ticks = []
    calls = kernel_timing.decode_calls(weight, 2, kinds, copies=copies, on_progress=lambda: ticks.append(1))
    assert isinstance(calls, kernel_timing.Rotation) == (copies > 1) and list(calls) == list(kinds), \
        "interleaved where there is a rotation; one copy each: time_ms's rounds, as before"
    plain_kinds = {"plain", "fp32", "gemv", "rowdot"} & set(kinds)
    each = -(-copies // (len(kinds) - 1))  # (room to drop one)
    want_copies = each * len(kinds) if copies > 1 else 1 + len(kinds) - len(plain_kinds)  # (one plain copy shared)
    assert len(ticks) == want_copies, "a heartbeat tick per copy made"
    assert want_copies <= copies * len(kinds) / (len(kinds) - 1) + len(kinds), "about `copies` in all, not per layout"
    want = torch.nn.functional.linear(torch.ones(2, 16).to(dtype), weight)
    made = set()
    for dropped in [None, *kinds]:  # all the candidates, or all but one (time_ms may drop one)
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
