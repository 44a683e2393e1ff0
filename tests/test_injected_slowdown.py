"""The gate tests' injected slowdown: a busy-wait of a fraction of the step's own forward time
(faults.BusyWait), as `--inject-*-slowdown N%` gives it; a fixed delay sized from an earlier run
was a smaller slowdown once the machine's load rose. Clock and busy-wait are faked: what is
checked is how long the hook asks to wait, not how fast this machine is."""
import argparse
import types

import pytest

from starcoder_tp.generate import StepHooks
from starcoder_tp.group_spec import GroupSpec
from starcoder_tp.options import add_options
from starcoder_tp.suite import faults
from starcoder_tp.suite.ab import ABRunner
from starcoder_tp.suite.faults import BusyWait
from starcoder_tp.suite.options import BENCH_OPTIONS, perf_options, slowdown
from starcoder_tp.suite.perf import PerfOptions
from starcoder_tp.suite.serve import RemoteGroup


@pytest.fixture
def clock(monkeypatch):
    """faults' clock set by the test (seconds), and the busy-waits it was asked for (ms)."""
    now, waits = [0.0], []
    monkeypatch.setattr(faults, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(faults, "spin", waits.append)
    return now, waits


def run_step(hook: BusyWait, step: int, forward_s: float, now: list) -> None:
    hook.step_begin(step)
    now[0] += forward_s
    hook.before_pick(step)
    hook.step_end(step)


def test_a_fraction_waits_that_fraction_of_each_steps_own_forward(clock):
    now, waits = clock
    hook = BusyWait(decode_fraction=0.5)
    for forward_s in (0.010, 0.030, 0.020):  # the load changes between steps: the wait follows it
        run_step(hook, 1, forward_s, now)
    assert waits == pytest.approx([5.0, 15.0, 10.0])


def test_prefill_and_decode_fractions_each_in_their_own_steps(clock):
    now, waits = clock
    run_step(BusyWait(prefill_fraction=2.0), 1, 0.010, now)
    run_step(BusyWait(decode_fraction=2.0), 0, 0.010, now)
    assert waits == [], "a prefill fraction in a decode step, a decode fraction in the prefill"
    run_step(BusyWait(prefill_fraction=2.0), 0, 0.010, now)
    run_step(BusyWait(decode_ms=3.0, decode_fraction=1.0), 4, 0.010, now)  # both: added
    assert waits == pytest.approx([20.0, 13.0])


@pytest.mark.parametrize("amounts", [{"decode_fraction": -0.1}, {"prefill_fraction": float("nan")},
                                     {"decode_fraction": float("inf")}, {"prefill_ms": -1.0}])
def test_a_negative_or_non_finite_amount_is_refused_naming_it(amounts):
    with pytest.raises(ValueError, match="injected delays must be finite and >= 0") as err:
        BusyWait(**amounts)
    assert str(next(iter(amounts.values()))) in str(err.value)


def test_a_hook_with_a_fraction_is_truthy_and_one_without_is_not():
    assert not BusyWait() and BusyWait(decode_fraction=0.5) and BusyWait(prefill_fraction=0.5)


@pytest.mark.parametrize("text, expected", [("50%", 0.5), ("0%", 0.0), ("200%", 2.0), (" 12.5% ", 0.125)])
def test_the_option_reads_a_percentage(text, expected):
    assert slowdown(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["50", "0.5", "-5%", "nan%", "inf%", "x%", "%"])
def test_the_option_refuses_anything_else_naming_it(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a percentage >= 0%") as err:
        slowdown(text)
    assert repr(text) in str(err.value)


def test_the_suites_options_carry_the_fractions_to_side_a_only(embedded_dir, tmp_path):
    options = PerfOptions(model_dir=str(embedded_dir), inject_prefill_fraction=0.25, inject_decode_fraction=0.5,
                          results_dir=str(tmp_path), rounds=10)
    assert options.faults() == BusyWait(prefill_fraction=0.25, decode_fraction=0.5)
    with pytest.raises(ValueError, match="injected delays"):
        PerfOptions(model_dir=str(embedded_dir), inject_decode_fraction=-1.0)
    ref = types.SimpleNamespace(path=tmp_path, label="ref", describe=lambda: "ref")
    runner = ABRunner(options, types.SimpleNamespace(ref=ref), log=lambda m: None, log_path=tmp_path / "log")
    assert runner.sides["A"].options.faults() == options.faults()
    assert not runner.sides["B"].options.faults(), "side B is the reference: never slowed"


def test_side_bs_protocol_refuses_a_fraction_naming_it(tmp_path):
    group = RemoteGroup(tmp_path, GroupSpec(str(tmp_path), 1), "ref", tmp_path / "log")  # (never started)
    with pytest.raises(ValueError, match=r"side B \(ref\): .* not a slowdown fraction \(prefill 0.0, decode 0.5\)"):
        group.generate([[5] * 4], 2, hooks=(BusyWait(decode_fraction=0.5),))
    with pytest.raises(ValueError, match=r"carries no StepHooks hook"):
        group.generate([[5] * 4], 2, hooks=(StepHooks(),))


@pytest.mark.parametrize("args, expected", [
    (["--inject-decode-slowdown", "50%"], BusyWait(decode_fraction=0.5)),
    (["--inject-prefill-slowdown", "25%", "--inject-decode-delay-ms", "3"], BusyWait(prefill_fraction=0.25,
                                                                                   decode_ms=3.0)),
])
def test_the_command_lines_options_reach_the_hook(args, expected, tmp_path):
    parser = argparse.ArgumentParser()
    add_options(parser.add_argument, BENCH_OPTIONS)
    ns = parser.parse_args(["--results-dir", str(tmp_path), *args])
    assert perf_options(ns).faults() == expected


def test_a_fraction_without_the_steps_start_is_an_error_naming_the_step(clock):
    with pytest.raises(RuntimeError, match="step 3 reached before_pick without step_begin"):
        BusyWait(decode_fraction=0.5).before_pick(3)
