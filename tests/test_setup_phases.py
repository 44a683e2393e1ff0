"""A request's set-up says where its seconds went: each phase of TPCausalLM.setup_cache timed, the
phases carried with the result, and logged by the perf suite and the generate CLI."""
import pytest
import torch

from starcoder_tp import setup_phases
from starcoder_tp.comm import TPGroup
from starcoder_tp.device import Device
from starcoder_tp.files import EMBEDDED_MODEL_DIR
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.suite import perf
from starcoder_tp.suite.perf import Case, PerfOptions, PerfRunner
from starcoder_tp.timing import timed_generate

PLAN_PHASES = {"forms", "kernel plan", "lay-out"}  # a new batch size's: use_kernels
EVERY_REQUESTS = {"cache", "fused step", "panels' asks"}


def test_timed_adds_each_blocks_seconds_even_when_it_raises():
    readings = iter([10.0, 10.5, 20.0, 20.25])
    clock = readings.__next__
    phases: dict[str, float] = {}
    with setup_phases.timed(phases, "plan", clock):
        pass
    with pytest.raises(KeyError), setup_phases.timed(phases, "plan", clock):
        raise KeyError
    assert phases == {"plan": 0.75}


def test_merged_sums_each_phase_in_first_order_and_describe_leaves_out_the_short_ones():
    phases = setup_phases.merged({"forms": 1.25, "cache": 0.01}, {"kernel plan": 5.5, "forms": 0.1})
    assert list(phases) == ["forms", "cache", "kernel plan"] and phases["forms"] == pytest.approx(1.35)
    assert setup_phases.describe(phases) == "6.9 s (forms 1.4, kernel plan 5.5)"
    assert setup_phases.describe({}) == "0.0 s"


@pytest.fixture(scope="module")
def model(tmp_path_factory, embedded_dir):
    out = tmp_path_factory.mktemp("phases") / "s"
    shard_checkpoint(embedded_dir, out, 1)
    return load_model(out, TPGroup(0, 1), torch.device("cpu"))


def test_a_new_batch_size_times_the_plans_phases_and_a_repeated_request_only_the_others(model, prompts):
    first = timed_generate(model, Device("cpu"), prompts[:1], 4)
    assert set(first.setup_s) == PLAN_PHASES | EVERY_REQUESTS, first.setup_s
    assert all(seconds > 0 for seconds in first.setup_s.values()), first.setup_s
    again = timed_generate(model, Device("cpu"), prompts[:1], 4)
    assert set(again.setup_s) == EVERY_REQUESTS, again.setup_s  # nothing laid out again: the plan's phases are not there


def test_the_perf_suites_warm_up_keeps_and_logs_its_set_up(monkeypatch):
    monkeypatch.setattr(perf, "LOGGED_SETUP_S", 0.0)  # (logged whatever this machine's speed)
    lines: list[str] = []
    case = Case(1, 16, 2)
    runner = PerfRunner(PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), batch_sizes=(1,), seq_in=(16,), seq_out=(2,), threads_per_rank=1),
                        log=lines.append).start()
    try:
        runner.warm_up(case)
    finally:
        runner.close()
    assert PLAN_PHASES | EVERY_REQUESTS <= set(runner.warm_up_setup_s), runner.warm_up_setup_s
    logged = [line for line in lines if line.startswith("[perf] set-up for bs1-in16-out2: ")]
    assert logged == [f"[perf] set-up for bs1-in16-out2: {setup_phases.describe(runner.warm_up_setup_s)}"], lines
