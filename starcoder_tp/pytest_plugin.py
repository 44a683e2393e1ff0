"""The suite's pytest plugin (loaded by the top-level conftest.py): one option group, the run
state built in pytest_configure, the perf grid parametrised from the options, session fixtures
that shard once and spawn the ranks once, the accuracy run, and terminal summaries with the
CSV, benchmark JSON, heatmaps and HumanEval figures."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from starcoder_tp.accuracy import AccuracyOptions, AccuracyRun, run_accuracy
from starcoder_tp.accuracy import summary_lines as accuracy_summary_lines
from starcoder_tp.build_models import EMBEDDED_MODEL_DIR
from starcoder_tp.device import DEVICE_KINDS, Device
from starcoder_tp.humaneval import load_problems
from starcoder_tp.oracle import ORACLE_MODEL_DIR
from starcoder_tp.gate import (MIN_ROUNDS, Baseline, Verdict, measure_calibration, parse_thresholds, write_baseline,
                               write_comparison_png)
from starcoder_tp.perf import (DEFAULT_BATCH_SIZES, DEFAULT_SEQ_LENS, Case, CaseResult, PerfOptions, PerfRunner,
                               parse_case_pairs, parse_int_list)
from starcoder_tp.report import ResultsCSV, csv_path, git_commit, result_row, summary_lines, write_heatmaps
from starcoder_tp.shard import DTYPES


def _csv(values) -> str:
    return ",".join(map(str, values))


def pytest_addoption(parser):
    group = parser.getgroup("starcoder-tp", "starcoder-tp: model, ranks and the performance grid")
    group.addoption("--model-dir", default=None,
                    help="Hugging Face GPTBigCode checkpoint. Default: the embedded model (fixtures/tiny-starcoder)")
    group.addoption("--device", default="cpu", choices=DEVICE_KINDS, help="Default: %(default)r")
    group.addoption("--device-id", default="0", help="rank r uses device device_id + r. Default: %(default)r")
    group.addoption("--world-size", default="2", help="number of tensor-parallel ranks. Default: %(default)r")
    group.addoption("--dtype", default="float32", choices=list(DTYPES), help="Default: %(default)r")
    group.addoption("--batch-sizes", default=_csv(DEFAULT_BATCH_SIZES), help="comma-separated. Default: %(default)r")
    group.addoption("--seq-in", default=_csv(DEFAULT_SEQ_LENS), help="input lengths, comma-separated. Default: %(default)r")
    group.addoption("--seq-out", default=_csv(DEFAULT_SEQ_LENS), help="output lengths, comma-separated. Default: %(default)r")
    group.addoption("--case-pairs", default=None,
                    help="IN:OUT pairs instead of the in × out product, e.g. 256:64,256:256,512:512,1024:1024 "
                         "(the Ascend guide's set_case_pair mode). Default: %(default)r")
    group.addoption("--max-seq-len", default=None,
                    help="KV cache length for every case (MAX_SEQ_LENGTH). Default: each case's input + output")
    group.addoption("--perf-rounds", default="1", help="measured generations per case. Default: %(default)r")
    group.addoption("--perf-warmup", default="1", help="warm-up generations per batch size. Default: %(default)r")
    group.addoption("--perf-resume", action="store_true", default=False,
                    help="skip cases already in the results CSV for this model/world size/dtype/device. Default: %(default)r")
    group.addoption("--results-dir", default="results", help="Default: %(default)r")
    group.addoption("--model-name", default="starcoder", help="suffix of the result files. Default: %(default)r")
    group.addoption("--threads-per-rank", default=None, help="CPU threads per rank. Default: the cores shared evenly")
    group.addoption("--no-prepack", action="store_true", default=False,
                    help="keep the linear weights in their plain layout (F.linear) instead of pre-packing them for "
                         "oneDNN on CPU. Default: %(default)r")
    group.addoption("--compile", action="store_true", default=False,
                    help="run decode steps through torch.compile (inductor; compiled per case during its warm-up, "
                         "seconds to minutes each; needs a C++ compiler on CPU). Default: %(default)r")
    group.addoption("--rank-timeout", default="60",
                    help="seconds a rank may wait on another (a hung or dead rank) before the case fails. Default: %(default)r")
    # Gating on latency regressions against a stored baseline.
    group.addoption("--perf-baseline", default=None,
                    help="a results CSV of an earlier run (e.g. fixtures/baselines/...): fail cases that regressed. Default: %(default)r")
    group.addoption("--perf-save-baseline", default=None, help="write this run's rows to this CSV. Default: %(default)r")
    group.addoption("--perf-max-regression", default="first_token=10%,decode=10%",
                    help="per-metric thresholds on the median. Default: %(default)r")
    group.addoption("--perf-alpha", default="0.05",
                    help="significance level of the Mann-Whitney test on the rounds. Default: %(default)r")
    group.addoption("--perf-normalize", action="store_true", default=False,
                    help="compare in machine-speed-calibrated units (a baseline from another machine of the same kind). "
                         "Default: %(default)r")
    group.addoption("--perf-inject-decode-delay-ms", default="0",
                    help="test-only: add this delay to every decode step. Default: %(default)r")
    group.addoption("--perf-inject-prefill-delay-ms", default="0",
                    help="test-only: add this delay to the prefill. Default: %(default)r")
    # The accuracy suite (tests_accuracy/); without --model-dir it runs the oracle fixture model.
    group.addoption("--humaneval-limit", default=None, help="the first N problems only. Default: all 164")
    group.addoption("--humaneval-tasks", default=None, help="comma-separated task ids, e.g. HumanEval/0,HumanEval/7. Default: all")
    group.addoption("--humaneval-max-new-tokens", default="320", help="Default: %(default)r")
    group.addoption("--humaneval-batch-size", default="8", help="prompts per generation batch. Default: %(default)r")
    group.addoption("--humaneval-timeout", default="3", help="seconds per program. Default: %(default)r")
    group.addoption("--humaneval-workers", default="2", help="sandboxed execution processes. Default: %(default)r")
    group.addoption("--humaneval-memory-mb", default="1024", help="address-space limit of the executed code. Default: %(default)r")
    group.addoption("--accuracy-reference", default="transformers", choices=["transformers", "tp1"],
                    help="the single-device reference: transformers' generate, or this runtime at world size 1. Default: %(default)r")
    group.addoption("--pass-at-1-tolerance", default="0.02",
                    help="allowed |pass@1(tp) - pass@1(reference)| and share of tasks whose verdicts differ, in bf16/fp16 "
                         "(fp32 must be equal). Default: %(default)r")


def _int_option(config, name: str, minimum: int = 1) -> int | None:
    text = config.getoption(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise pytest.UsageError(f"--{name.replace('_', '-')}: {text!r} is not a whole number") from None
    if value < minimum:
        raise pytest.UsageError(f"--{name.replace('_', '-')}: {value} must be >= {minimum}")
    return value


def _float_option(config, name: str) -> float:
    text = config.getoption(name)
    try:
        return float(text)
    except ValueError:
        raise pytest.UsageError(f"--{name.replace('_', '-')}: {text!r} is not a number") from None


def options_from_config(config) -> PerfOptions:
    """The suite's options, checked; a bad value stops the run at start-up, naming it."""
    try:
        pairs = config.getoption("case_pairs")
        model_dir = config.getoption("model_dir") or str(EMBEDDED_MODEL_DIR)
        return PerfOptions(
            model_dir=model_dir,
            device=config.getoption("device"),
            device_id=_int_option(config, "device_id", minimum=0),
            world_size=_int_option(config, "world_size"),
            dtype=config.getoption("dtype"),
            batch_sizes=tuple(parse_int_list("--batch-sizes", config.getoption("batch_sizes"))),
            seq_in=tuple(parse_int_list("--seq-in", config.getoption("seq_in"))),
            seq_out=tuple(parse_int_list("--seq-out", config.getoption("seq_out"))),
            case_pairs=tuple(parse_case_pairs(pairs)) if pairs else None,
            max_seq_len=_int_option(config, "max_seq_len"),
            rounds=_int_option(config, "perf_rounds"),
            warmup=_int_option(config, "perf_warmup", minimum=0),
            results_dir=config.getoption("results_dir"),
            model_name=config.getoption("model_name"),
            threads_per_rank=_int_option(config, "threads_per_rank"),
            prepack=not config.getoption("no_prepack"),
            compile=config.getoption("compile"),
            timeout_s=float(_int_option(config, "rank_timeout")),
            inject_prefill_ms=_float_option(config, "perf_inject_prefill_delay_ms"),
            inject_decode_ms=_float_option(config, "perf_inject_decode_delay_ms"),
        )
    except (ValueError, FileNotFoundError) as err:
        raise pytest.UsageError(str(err)) from None


@dataclass
class PerfState:
    """What one pytest session measured, and the gate it is held to."""

    options: PerfOptions
    csv: ResultsCSV | None = None
    rows: list[dict] = field(default_factory=list)
    setup_times: dict[str, float] = field(default_factory=dict)
    commit: str = ""
    started: float = field(default_factory=time.perf_counter)
    calibration: dict[str, float] = field(default_factory=dict)
    baseline: Baseline | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.05
    normalize: bool = False
    verdicts: dict[Case, list[Verdict]] = field(default_factory=dict)
    new_cases: list[Case] = field(default_factory=list)


def gate_options(config, state: PerfState) -> None:
    """Load the baseline and thresholds at start-up: a bad file or option stops the run now."""
    try:
        state.thresholds = parse_thresholds(config.getoption("perf_max_regression"))
        state.alpha = float(config.getoption("perf_alpha"))
        if not 0 < state.alpha < 1:
            raise ValueError(f"--perf-alpha must be within (0, 1), got {state.alpha}")
        state.normalize = config.getoption("perf_normalize")
        path = config.getoption("perf_baseline")
        if path:
            o = state.options
            if o.rounds < MIN_ROUNDS:
                raise ValueError(f"--perf-baseline needs --perf-rounds >= {MIN_ROUNDS} (got {o.rounds}): "
                                 "fewer rounds cannot show a significant difference")
            state.baseline = Baseline.load(path, world_size=o.world_size, dtype=o.dtype, device=o.device,
                                           runtime_mode=o.runtime_mode, model_shape=o.config.shape_id)
    except (ValueError, FileNotFoundError) as err:
        raise pytest.UsageError(str(err)) from None


perf_state_key = pytest.StashKey[PerfState]()
accuracy_key = pytest.StashKey[AccuracyRun]()


def accuracy_options_from_config(config) -> AccuracyOptions:
    """The accuracy suite's options; without --model-dir it runs the oracle fixture model."""
    perf = config.stash[perf_state_key].options
    try:
        tasks = config.getoption("humaneval_tasks")
        problems = load_problems(_int_option(config, "humaneval_limit"),
                                 [t.strip() for t in tasks.split(",")] if tasks else None)
        tolerance = float(config.getoption("pass_at_1_tolerance"))
        timeout_s = float(config.getoption("humaneval_timeout"))
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None
    if not 0 <= tolerance <= 1:
        raise pytest.UsageError(f"--pass-at-1-tolerance must be within [0, 1], got {tolerance}")
    if timeout_s <= 0:
        raise pytest.UsageError(f"--humaneval-timeout must be > 0, got {timeout_s}")
    return AccuracyOptions(
        model_dir=config.getoption("model_dir") or str(ORACLE_MODEL_DIR), problems=problems,
        device=Device(perf.device, perf.device_id), world_size=perf.world_size, dtype=perf.dtype,
        reference=config.getoption("accuracy_reference"),
        max_new_tokens=_int_option(config, "humaneval_max_new_tokens"),
        batch_size=_int_option(config, "humaneval_batch_size"), timeout_s=timeout_s,
        workers=_int_option(config, "humaneval_workers"), memory_mb=_int_option(config, "humaneval_memory_mb"),
        tolerance=tolerance, results_dir=perf.results_dir, threads_per_rank=perf.threads_per_rank,
        prepack=perf.prepack, compile=perf.compile)


def pytest_configure(config):
    config.addinivalue_line("markers", "perf: a latency case of the performance grid (tests_perf/)")
    config.stash[perf_state_key] = PerfState(options_from_config(config))
    gate_options(config, config.stash[perf_state_key])
    if any("tests_accuracy" in str(arg) for arg in config.args):
        accuracy_options_from_config(config)  # bad values stop the run now, not after the set-up


def pytest_generate_tests(metafunc):
    if "perf_case" in metafunc.fixturenames:
        cases = metafunc.config.stash[perf_state_key].options.cases()
        metafunc.parametrize("perf_case", [pytest.param(c, id=c.id, marks=pytest.mark.perf) for c in cases])


def pytest_collection_modifyitems(config, items):
    state = config.stash[perf_state_key]
    perf_items = [item for item in items if item.get_closest_marker("perf")]
    if not perf_items:
        return
    o = state.options
    try:
        o.check_cases()  # before any rank is spawned
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None
    if config.getoption("perf_resume") and csv_path(o.results_dir, o.model_name, o.device_id).is_file():
        done = ResultsCSV(csv_path(o.results_dir, o.model_name, o.device_id)).measured_cases(
            world_size=o.world_size, dtype=o.dtype, device=o.device, model=o.model_name, runtime_mode=o.runtime_mode)
        skipped = [i for i in perf_items if i.callspec.params["perf_case"] in done]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = [i for i in items if i not in skipped]
    bench = getattr(config, "_benchmarksession", None)
    if bench is not None and not bench.json:
        Path(o.results_dir).mkdir(parents=True, exist_ok=True)
        bench.json = Path(o.results_dir) / f"benchmark_{o.model_name}_{o.device_id}.json"


def _say(config, message: str) -> None:
    """Print past pytest's capture: set-up times are worth seeing while the run goes on."""
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is None:
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(message)
    else:
        reporter.write_line(message)


@pytest.fixture(scope="session")
def perf_state(request) -> PerfState:
    state = request.config.stash[perf_state_key]
    o = state.options
    state.csv = ResultsCSV(csv_path(o.results_dir, o.model_name, o.device_id), log=lambda m: _say(request.config, m))
    state.commit = git_commit()
    state.calibration = measure_calibration()
    return state


@pytest.fixture(scope="session")
def perf_runner(request, perf_state):
    """Shard once (cached by manifest), spawn the ranks once, tear down also after a failure."""
    runner = PerfRunner(perf_state.options, log=lambda m: _say(request.config, m))
    request.addfinalizer(runner.close)
    runner.start()
    perf_state.setup_times = runner.setup_times
    return runner


@pytest.fixture(scope="session")
def accuracy_options(request) -> AccuracyOptions:
    return accuracy_options_from_config(request.config)


@pytest.fixture(scope="session")
def accuracy_run(request, accuracy_options) -> AccuracyRun:
    """HumanEval through the TP runtime and the reference, executed and written, once per session."""
    run = run_accuracy(accuracy_options, log=lambda m: _say(request.config, m))
    request.config.stash[accuracy_key] = run
    return run


def record_result(state: PerfState, result: CaseResult) -> dict:
    o = state.options
    row = result_row(result, world_size=o.world_size, dtype=o.dtype, device=o.device, model=o.model_name,
                     model_shape=o.config.shape_id, runtime_mode=o.runtime_mode, commit=state.commit,
                     calibration=state.calibration)
    state.csv.append(row)
    state.rows.append(row)
    return row


def gate_case(state: PerfState, case: Case, row: dict) -> list[Verdict]:
    """The case's verdicts against the baseline ([] without one); kept for the summary."""
    if state.baseline is None:
        return []
    verdicts = state.baseline.compare(case, row, state.thresholds, state.alpha, state.normalize)
    if verdicts is None:
        state.new_cases.append(case)
        return []
    state.verdicts[case] = verdicts
    return verdicts


def measure_and_gate(runner: PerfRunner, state: PerfState, case: Case, benchmark) -> tuple[CaseResult, list[Verdict]]:
    """Measure the case's rounds (timed by pytest-benchmark too), record the row and gate it; a
    case that regresses is measured once more, and only a second regression counts."""
    rounds = state.options.rounds
    runner.warm_up(case)
    result = CaseResult(case)
    benchmark.pedantic(runner.run_round, args=(case, result), rounds=rounds, iterations=1, warmup_rounds=0)
    while result.rounds < rounds:  # --benchmark-disable runs the function once
        runner.run_round(case, result)
    verdicts = gate_case(state, case, record_result(state, result))
    if any(v.kind == "regression" for v in verdicts):
        result = CaseResult(case)
        for _ in range(rounds):
            runner.run_round(case, result)
        verdicts = gate_case(state, case, record_result(state, result))
    return result, verdicts


def pytest_terminal_summary(terminalreporter, config):
    run = config.stash.get(accuracy_key, None)
    if run is not None:
        terminalreporter.section("starcoder-tp HumanEval")
        for line in accuracy_summary_lines(run):
            terminalreporter.write_line(line)
    state = config.stash.get(perf_state_key, None)
    if state is None or not state.rows:
        return
    o = state.options
    terminalreporter.section("starcoder-tp performance")
    t = state.setup_times
    if t:
        terminalreporter.write_line(f"set-up: shard {t['shard_s']:.1f}s, spawn + load {t['spawn_and_load_s']:.1f}s; "
                                    f"world size {o.world_size}, {o.dtype}, {o.device}, model {o.model_dir}"
                                    + ("; decode steps compiled (torch.compile)" if o.compile else ""))
    for line in summary_lines(state.rows):
        terminalreporter.write_line(line)
    heatmaps = write_heatmaps(state.rows, o.results_dir, o.model_name, o.device_id)
    if state.baseline is not None:
        terminalreporter.write_line(f"regression gate against {state.baseline.path} "
                                    f"(thresholds {state.thresholds}, alpha {state.alpha}"
                                    f"{', machine-speed normalised' if state.normalize else ''}):")
        verdicts = [v for vs in state.verdicts.values() for v in vs]
        for kind in ("regression", "improvement"):
            found = [v for v in verdicts if v.kind == kind]
            terminalreporter.write_line(f"  {len(found)} {kind}(s)" + (":" if found else ""),
                                        red=kind == "regression" and bool(found))
            for v in found:
                terminalreporter.write_line("    " + v.message())
        unsure = [v for v in verdicts if v.inconclusive]
        if unsure:
            terminalreporter.write_line(f"  {len(unsure)} beyond the threshold but not significant at alpha "
                                        f"{state.alpha} (not failed; more --perf-rounds give the test more power):")
            for v in unsure:
                terminalreporter.write_line("    " + v.message())
        if state.new_cases:
            terminalreporter.write_line(f"  not in the baseline (not gated): {', '.join(c.id for c in state.new_cases)}")
        if verdicts:
            png = write_comparison_png(verdicts, Path(o.results_dir) / f"perf_comparison_{o.model_name}_{o.device_id}.png")
            terminalreporter.write_line(f"  comparison plot: {png}")
    save = config.getoption("perf_save_baseline")
    if save:
        terminalreporter.write_line(f"baseline saved: {write_baseline(state.rows, save)}")
    terminalreporter.write_line(f"CSV: {state.csv.path} ({len(state.rows)} rows this session)")
    bench = getattr(config, "_benchmarksession", None)
    if bench is not None and bench.json:
        terminalreporter.write_line(f"pytest-benchmark JSON: {bench.json}")
    terminalreporter.write_line("heatmaps: " + ", ".join(str(p) for p in heatmaps))
    terminalreporter.write_line(f"wall time of the session: {time.perf_counter() - state.started:.1f}s")
