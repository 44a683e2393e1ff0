"""The suite's pytest plugin (registered through the `pytest11` entry point, and loaded by the
repo's pytest.ini and conftest.py): one option group, the run state built in pytest_configure,
the perf grid parametrised from the options, session fixtures that shard once and spawn the ranks
once, the accuracy run, and terminal summaries with the CSV, benchmark JSON, heatmaps and
HumanEval figures."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ..device import Device
from ..files import ORACLE_MODEL_DIR
from ..options import add_options
from ..group_spec import default_threads
from . import ab
from .accuracy import AccuracyOptions, AccuracyRun, require_tokenizer, run_accuracy, stored_reference_for
from .accuracy import summary_lines as accuracy_summary_lines
from .gate import MIN_ROUNDS, Baseline, measure_calibration
from .gitref import checkout_ref, working_tree
from .humaneval import load_problems
from .machine import machine_fingerprint
from .options import PYTEST_OPTIONS, perf_options
from .perf import PerfRunner
from .perf_session import PerfState, summary_lines
from .report import ResultsCSV, csv_path, git_commit


def pytest_addoption(parser):
    group = parser.getgroup("starcoder-tp", "starcoder-tp: model, ranks, the performance grid, its gate, HumanEval")
    add_options(group.addoption, PYTEST_OPTIONS)


def gate_options(config, state: PerfState) -> None:
    """Thresholds and the baseline at start-up: a bad file or option stops the run now, before
    any rank is spawned (the compared commit is checked out once the grid is collected)."""
    o, opt = state.options, config.option
    try:
        state.thresholds, state.alpha, state.normalize = opt.perf_max_regression, opt.perf_alpha, opt.perf_normalize
        state.fingerprint = machine_fingerprint(Device(o.device, o.device_id),
                                                o.threads_per_rank or default_threads(o.world_size))
        if opt.perf_compare_ref is not None:
            if opt.perf_baseline:
                raise ValueError("--perf-compare-ref and --perf-baseline are two ways to gate: give one")
            if opt.perf_resume:
                raise ValueError("--perf-resume cannot be combined with --perf-compare-ref: both sides of a case are "
                                 "measured in one sitting")
            ab.check_rounds(o.rounds)
        if opt.perf_baseline:
            if o.rounds < MIN_ROUNDS:
                raise ValueError(f"--perf-baseline needs --perf-rounds >= {MIN_ROUNDS} (got {o.rounds}): "
                                 "fewer rounds cannot show a significant difference")
            state.baseline = Baseline.load(opt.perf_baseline, world_size=o.world_size, dtype=o.dtype, device=o.device,
                                           runtime_mode=o.runtime_mode, model_shape=o.config.shape_id,
                                           fingerprint=state.fingerprint, normalize=state.normalize)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise pytest.UsageError(str(err)) from None


perf_state_key = pytest.StashKey[PerfState]()
accuracy_options_key = pytest.StashKey[AccuracyOptions]()
accuracy_key = pytest.StashKey[AccuracyRun]()
resumed_key = pytest.StashKey[dict]()  # --perf-resume: {"skipped": n, "kept": the earlier JSON's entries of those cases}


def accuracy_options_from_config(config) -> AccuracyOptions:
    """The accuracy suite's options; without --model-dir it runs the oracle fixture model."""
    perf, opt = config.stash[perf_state_key].options, config.option
    try:
        tasks = opt.humaneval_tasks
        problems = load_problems(opt.humaneval_limit, [t.strip() for t in tasks.split(",")] if tasks else None)
        if opt.model_dir:
            require_tokenizer(opt.model_dir)
        options = AccuracyOptions(
            model_dir=opt.model_dir or str(ORACLE_MODEL_DIR), problems=problems,
            device=Device(perf.device, perf.device_id), world_size=perf.world_size, dtype=perf.dtype,
            reference=opt.accuracy_reference, max_new_tokens=opt.humaneval_max_new_tokens,
            batch_size=opt.humaneval_batch_size, timeout_s=opt.humaneval_timeout, workers=opt.humaneval_workers,
            memory_mb=opt.humaneval_memory_mb, tolerance=opt.pass_at_1_tolerance, results_dir=perf.results_dir,
            threads_per_rank=perf.threads_per_rank, kernels=perf.kernels, compile=perf.compile,
            samples=opt.humaneval_samples, temperature=opt.temperature, top_p=opt.top_p, seed=opt.seed,
            task=opt.humaneval_task, save_reference=opt.save_reference)
        stored_reference_for(options)  # a stored reference of another model or protocol is refused now
        return options
    except (ValueError, FileNotFoundError) as err:
        raise pytest.UsageError(str(err)) from None


def _names_suite(args, suite: str) -> bool:
    return any(suite in str(arg) for arg in args)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """pytest-benchmark's JSON goes to the results directory unless --benchmark-json says
    otherwise: given as its own option (this hook runs because pytest.ini loads the plugin
    with -p), so pytest-benchmark parses and writes it as any user's."""
    ns = early_config.known_args_namespace
    perf_run = _names_suite([*args, early_config.invocation_params.dir], "tests_perf")
    if perf_run and getattr(ns, "benchmark_json", "absent") is None:
        results_dir = Path(getattr(ns, "results_dir", "results"))
        results_dir.mkdir(parents=True, exist_ok=True)  # some pytest-benchmark versions open the file at parse time
        name = f"benchmark_{getattr(ns, 'model_name', 'starcoder')}_{getattr(ns, 'device_id', '0')}.json"
        args.insert(0, f"--benchmark-json={results_dir / name}")  # before any "--"


def benchmark_json_path(config) -> Path | None:
    """Where pytest-benchmark writes its JSON (its option holds a path, or an open file in older versions)."""
    value = config.getoption("benchmark_json", None)
    if value is None:
        return None
    return Path(value) if isinstance(value, (str, os.PathLike)) else Path(value.name)


def pytest_configure(config):
    config.addinivalue_line("markers", "perf: a latency case of the performance grid (tests_perf/)")
    try:
        options = perf_options(config.option)
    except (ValueError, FileNotFoundError) as err:
        raise pytest.UsageError(str(err)) from None
    config.stash[perf_state_key] = PerfState(options)
    gate_options(config, config.stash[perf_state_key])
    if _names_suite(config.args, "tests_accuracy"):
        config.stash[accuracy_options_key] = accuracy_options_from_config(config)  # bad values stop the run now


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
    ref = config.option.perf_compare_ref
    try:
        o.check_cases()  # before any rank is spawned
        if ref is not None:  # the other side's code, only when there is something to measure
            state.comparison = ab.Comparison(working_tree(), checkout_ref(ref, log=lambda m: _say(config, m)))
    except (ValueError, RuntimeError) as err:
        raise pytest.UsageError(str(err)) from None
    json_path = benchmark_json_path(config)
    csv_file = csv_path(o.results_dir, o.model_name, o.device_id)
    if config.option.perf_resume and csv_file.is_file():
        done = ResultsCSV(csv_file).measured_cases(
            world_size=o.world_size, dtype=o.dtype, device=o.device, model=o.model_name, runtime_mode=o.runtime_mode)
        skipped = [i for i in perf_items if i.callspec.params["perf_case"] in done]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = [i for i in items if i not in skipped]
            config.stash[resumed_key] = {"skipped": len(skipped), "kept": earlier_benchmarks(json_path, o)}
            _say(config, f"[perf] --perf-resume: {len(skipped)} of {len(perf_items)} case(s) already measured in "
                         f"{csv_file}, not run again")
    if json_path:  # pytest-benchmark writes it at the end, into a directory that must exist
        json_path.parent.mkdir(parents=True, exist_ok=True)


def earlier_benchmarks(json_path: Path | None, options) -> list[dict]:
    """The entries of this world size and dtype in the pytest-benchmark JSON that a resumed run
    would overwrite (pytest-benchmark writes only the session's own)."""
    try:
        entries = json.loads(json_path.read_text())["benchmarks"] if json_path else []
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("extra_info"), dict)
            and e["extra_info"].get("world_size") == options.world_size and e["extra_info"].get("dtype") == options.dtype]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """A resumed run's JSON keeps the earlier cases it did not run again, as the CSV does."""
    resumed = config.stash.get(resumed_key, None)
    if resumed and resumed["kept"]:
        fresh = {b.get("name") for b in output_json["benchmarks"]}
        output_json["benchmarks"][:0] = [b for b in resumed["kept"] if b["name"] not in fresh]


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
    state.calibration = measure_calibration(device=Device(o.device, o.device_id), dtype=o.dtype)
    return state


@pytest.fixture(scope="session")
def perf_runner(request, perf_state):
    """Shard once (cached by manifest), spawn the ranks once (both sides' with
    --perf-compare-ref), tear down also after a failure."""
    log = lambda m: _say(request.config, m)  # noqa: E731
    if perf_state.comparison is not None:
        log(f"[compare] {perf_state.comparison.describe()}")
        runner = ab.ABRunner(perf_state.options, perf_state.comparison, log=log)
    else:
        runner = PerfRunner(perf_state.options, log=log)
    request.addfinalizer(runner.close)
    runner.start()
    perf_state.setup_times = runner.setup_times
    return runner


@pytest.fixture(scope="session")
def accuracy_options(request) -> AccuracyOptions:
    config = request.config
    if accuracy_options_key not in config.stash:  # the accuracy tests ran without naming tests_accuracy/
        config.stash[accuracy_options_key] = accuracy_options_from_config(config)
    return config.stash[accuracy_options_key]


@pytest.fixture(scope="session")
def accuracy_run(request, accuracy_options) -> AccuracyRun:
    """HumanEval through the TP runtime and the reference, executed and written, once per session."""
    run = run_accuracy(accuracy_options, log=lambda m: _say(request.config, m))
    request.config.stash[accuracy_key] = run
    return run


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """Before pytest-benchmark's own sessionfinish, which writes its JSON and table: a case
    interrupted (Ctrl-C) inside its measured rounds left it a benchmark of no round, on which
    both fail (min() of nothing, a traceback), so that the finished cases' JSON was lost too.
    pytest-benchmark offers no public hook for this; without its session object, nothing to do."""
    drop_unmeasured_benchmarks(getattr(session.config, "_benchmarksession", None))
    resumed = session.config.stash.get(resumed_key, None)
    if resumed and session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK  # --perf-resume with every case measured: the grid is complete
    return (yield)


def drop_unmeasured_benchmarks(benchmark_session) -> None:
    benchmarks = getattr(benchmark_session, "benchmarks", None)
    if isinstance(benchmarks, list):
        benchmarks[:] = [b for b in benchmarks if getattr(b, "stats", True)]


def pytest_terminal_summary(terminalreporter, config):
    run = config.stash.get(accuracy_key, None)
    if run is not None:
        terminalreporter.section("starcoder-tp HumanEval")
        for line in accuracy_summary_lines(run):
            terminalreporter.write_line(line)
    state = config.stash.get(perf_state_key, None)
    if state is None or not state.rows:
        return
    terminalreporter.section("starcoder-tp performance")
    for line in summary_lines(state, config.option.perf_save_baseline, benchmark_json_path(config)):
        terminalreporter.write_line(line)
