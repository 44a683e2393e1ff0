"""The suite's pytest plugin (loaded by the top-level conftest.py): one option group, the run
state built in pytest_configure, the perf grid parametrised from the options, session fixtures
that shard once and spawn the ranks once, the accuracy run, and terminal summaries with the
CSV, benchmark JSON, heatmaps and HumanEval figures."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from starcoder_tp import ab
from starcoder_tp.accuracy import AccuracyOptions, AccuracyRun, run_accuracy
from starcoder_tp.accuracy import summary_lines as accuracy_summary_lines
from starcoder_tp.build_models import EMBEDDED_MODEL_DIR
from starcoder_tp.device import DEVICE_KINDS, Device
from starcoder_tp.gate import MIN_ROUNDS, Baseline, measure_calibration, parse_thresholds
from starcoder_tp.gitref import checkout_ref, working_tree
from starcoder_tp.humaneval import load_problems
from starcoder_tp.machine import machine_fingerprint
from starcoder_tp.oracle import ORACLE_MODEL_DIR
from starcoder_tp.parallel import default_threads
from starcoder_tp.perf import DEFAULT_BATCH_SIZES, DEFAULT_SEQ_LENS, PerfOptions, PerfRunner, parse_case_pairs, parse_int_list
from starcoder_tp.perf_session import PerfState, summary_lines
from starcoder_tp.report import ResultsCSV, csv_path, git_commit
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
    # Gating on latency regressions: against another commit in the same session, or a stored baseline.
    group.addoption("--perf-compare-ref", default=None, metavar="GITREF",
                    help="A/B in one session: measure every case on this code (A) and on GITREF's code (B, a second "
                         "worker group on the same shards), rounds interleaved, and fail cases whose paired A/B "
                         "ratio regressed (e.g. origin/main; needs --perf-rounds >= 6). Default: %(default)r")
    group.addoption("--perf-baseline", default=None,
                    help="a results CSV of an earlier run on this machine (--perf-save-baseline): fail cases that regressed. "
                         "Default: %(default)r")
    group.addoption("--perf-save-baseline", default=None, help="write this run's rows to this CSV. Default: %(default)r")
    group.addoption("--perf-max-regression", default="first_token=10%,decode=10%",
                    help="per-metric thresholds on the median. Default: %(default)r")
    group.addoption("--perf-alpha", default="0.05",
                    help="significance level of the gate's test (Wilcoxon on paired rounds with --perf-compare-ref, "
                         "Mann-Whitney against a baseline). Default: %(default)r")
    group.addoption("--perf-normalize", action="store_true", default=False,
                    help="compare against a baseline from another machine, in machine-speed-calibrated units "
                         "(refused otherwise). Default: %(default)r")
    group.addoption("--perf-inject-decode-delay-ms", default="0",
                    help="test-only: add this delay to every decode step (side A only). Default: %(default)r")
    group.addoption("--perf-inject-prefill-delay-ms", default="0",
                    help="test-only: add this delay to the prefill (side A only). Default: %(default)r")
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
        value = float(text)
    except ValueError:
        raise pytest.UsageError(f"--{name.replace('_', '-')}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise pytest.UsageError(f"--{name.replace('_', '-')}: {text!r} is not a finite number")
    return value


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


def gate_options(config, state: PerfState) -> None:
    """Thresholds and the baseline at start-up: a bad file or option stops the run now, before
    any rank is spawned (the compared commit is checked out once the grid is collected)."""
    o = state.options
    try:
        state.thresholds = parse_thresholds(config.getoption("perf_max_regression"))
        state.alpha = _float_option(config, "perf_alpha")
        if not 0 < state.alpha < 1:
            raise ValueError(f"--perf-alpha must be within (0, 1), got {state.alpha}")
        state.normalize = config.getoption("perf_normalize")
        state.fingerprint = machine_fingerprint(Device(o.device, o.device_id),
                                                o.threads_per_rank or default_threads(o.world_size))
        path, ref = config.getoption("perf_baseline"), config.getoption("perf_compare_ref")
        if ref is not None:
            if path:
                raise ValueError("--perf-compare-ref and --perf-baseline are two ways to gate: give one")
            if config.getoption("perf_resume"):
                raise ValueError("--perf-resume cannot be combined with --perf-compare-ref: both sides of a case are "
                                 "measured in one sitting")
            ab.check_rounds(o.rounds)
        if path:
            if o.rounds < MIN_ROUNDS:
                raise ValueError(f"--perf-baseline needs --perf-rounds >= {MIN_ROUNDS} (got {o.rounds}): "
                                 "fewer rounds cannot show a significant difference")
            state.baseline = Baseline.load(path, world_size=o.world_size, dtype=o.dtype, device=o.device,
                                           runtime_mode=o.runtime_mode, model_shape=o.config.shape_id,
                                           fingerprint=state.fingerprint, normalize=state.normalize)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
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
    config.stash[perf_state_key] = PerfState(options_from_config(config))
    gate_options(config, config.stash[perf_state_key])
    if _names_suite(config.args, "tests_accuracy"):
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
    ref = config.getoption("perf_compare_ref")
    try:
        o.check_cases()  # before any rank is spawned
        if ref is not None:  # the other side's code, only when there is something to measure
            state.comparison = ab.Comparison(working_tree(), checkout_ref(ref, log=lambda m: _say(config, m)))
    except (ValueError, RuntimeError) as err:
        raise pytest.UsageError(str(err)) from None
    if config.getoption("perf_resume") and csv_path(o.results_dir, o.model_name, o.device_id).is_file():
        done = ResultsCSV(csv_path(o.results_dir, o.model_name, o.device_id)).measured_cases(
            world_size=o.world_size, dtype=o.dtype, device=o.device, model=o.model_name, runtime_mode=o.runtime_mode)
        skipped = [i for i in perf_items if i.callspec.params["perf_case"] in done]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = [i for i in items if i not in skipped]
    json_path = benchmark_json_path(config)
    if json_path:  # pytest-benchmark writes it at the end, into a directory that must exist
        json_path.parent.mkdir(parents=True, exist_ok=True)


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
    return accuracy_options_from_config(request.config)


@pytest.fixture(scope="session")
def accuracy_run(request, accuracy_options) -> AccuracyRun:
    """HumanEval through the TP runtime and the reference, executed and written, once per session."""
    run = run_accuracy(accuracy_options, log=lambda m: _say(request.config, m))
    request.config.stash[accuracy_key] = run
    return run


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
    for line in summary_lines(state, config.getoption("perf_save_baseline"), benchmark_json_path(config)):
        terminalreporter.write_line(line)
