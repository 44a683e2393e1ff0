"""`python -m starcoder_tp bench`: the Ascend guide's run.sh flow (shard when needed, warm up,
one case or the grid, the multi-case CSV) with the same functions as the pytest suite."""
from __future__ import annotations

import argparse
import os
import time

from .. import log
from ..device import Device
from ..group_spec import default_threads
from ..options import add_options, positive_int
from ..parallel import RankFailure
from ..shard import ensure_shards
from ..torchrun import launched_by_torchrun, torchrun_rank, torchrun_world_size
from . import ab
from .machine import machine_fingerprint
from .options import BENCH_OPTIONS, perf_options
from .perf import PerfOptions, PerfRunner
from .report import ResultsCSV, csv_path, git_commit, result_row, summary_lines, write_heatmaps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--multicase", type=int, choices=[0, 1], default=0,
                        help="0: one case (--batch --seq-in --seq-out); 1: the grid. Default: %(default)r")
    parser.add_argument("--batch", type=positive_int, default=1, help="multicase 0. Default: %(default)r")
    add_options(parser.add_argument, BENCH_OPTIONS)


def options_from_args(args: argparse.Namespace) -> PerfOptions:
    if args.multicase == 0:
        if args.batch_sizes or args.case_pairs:
            raise ValueError("--batch-sizes and --case-pairs go with --multicase 1; use --batch for one case")
        args = argparse.Namespace(**{**vars(args), "batch_sizes": (args.batch,), "seq_in": args.seq_in or (128,),
                                     "seq_out": args.seq_out or (128,)})
        if len(args.seq_in) != 1 or len(args.seq_out) != 1:
            raise ValueError(f"--multicase 0 runs one case: give one --seq-in and one --seq-out, not "
                             f"{','.join(map(str, args.seq_in))} / {','.join(map(str, args.seq_out))}")
    world_size = torchrun_world_size(args.world_size) if launched_by_torchrun() else None
    return perf_options(args, world_size=world_size)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)  # every check before any rank is spawned
    options.check_cases()
    if launched_by_torchrun():
        if args.perf_compare_ref:
            raise ValueError("--perf-compare-ref runs two local worker groups; under torchrun there is one set of "
                             "ranks: run it without torchrun")
        return _bench_under_torchrun(options)
    if args.perf_compare_ref is None:
        return _bench(options, PerfRunner(options, log=log), writer=True)
    from .gitref import checkout_ref, working_tree

    ab.check_rounds(options.rounds)
    comparison = ab.Comparison(working_tree(), checkout_ref(args.perf_compare_ref, log=log))
    log(f"[compare] {comparison.describe()}")
    return _bench(options, ab.ABRunner(options, comparison, log=log), writer=True,
                  gate=(comparison, args.perf_max_regression, args.perf_alpha))


def _bench_under_torchrun(options: PerfOptions) -> int:
    """This process is one of torchrun's ranks (one node or several): every rank loads its part
    and runs the same cases in step; global rank 0 alone writes the CSV and prints."""
    def shards(world_size: int, cut: bool):
        return ensure_shards(options.model_dir, world_size, options.dtype, log=log if cut else (lambda m: None))

    device = Device(options.device, options.device_id)
    with torchrun_rank(device, shards, threads_per_rank=options.threads_per_rank, kernels=options.kernels,
                       compile=options.compile, timeout_s=options.timeout_s) as rank:
        quiet = rank.tp.rank != 0
        if not quiet:
            log(f"[bench] {rank.tp.world_size} torchrun rank(s) ready in {rank.setup_s:.1f}s")
        runner = PerfRunner(options, log=(lambda m: None) if quiet else log, group=rank.group)
        return _bench(options, runner, writer=not quiet)


def _bench(options: PerfOptions, runner, writer: bool, gate: tuple | None = None) -> int:
    """Measure every case; the writer keeps the rows (CSV, heatmaps, summary). With `gate`
    (comparison, thresholds, alpha) the runner is an ab.ABRunner: both sides' rows are kept, each
    case gets its paired verdicts, and a regression makes the exit code 1."""
    started = time.perf_counter()
    say = log if writer else (lambda m: None)
    results = ResultsCSV(csv_path(options.results_dir, options.model_name, options.device_id), log=log) if writer else None
    commit = git_commit()
    fingerprint = machine_fingerprint(Device(options.device, options.device_id),
                                      options.threads_per_rank or default_threads(options.world_size))
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    cases = options.cases()
    rows, failed, paired = [], [], {}

    def keep(result, side: str = "", side_commit: str = commit) -> None:
        row = result_row(result, world_size=options.world_size, dtype=options.dtype, device=options.device,
                         model=options.model_name, model_shape=options.config.shape_id,
                         runtime_mode=options.runtime_mode, commit=side_commit, fingerprint=fingerprint, side=side,
                         run_id=run_id)
        if writer:
            results.append(row)
            rows.append(row)

    try:
        runner.start()
        for index, case in enumerate(cases, start=1):
            try:
                if gate is None:
                    result = runner.measure(case)
                    keep(result)
                else:
                    comparison, thresholds, alpha = gate
                    result, paired[case] = runner.measure_and_gate(
                        case, thresholds, alpha,
                        lambda a, b: (keep(a, "A", comparison.tree.label), keep(b, "B", comparison.ref.label)))
            except RankFailure as err:
                # As in the pytest suite: this case fails, the ranks restart, the next cases run.
                say(f"[bench] {index}/{len(cases)} {case.id} FAILED: {err}")
                failed.append(case)
                continue
            line = (f"[bench] {index}/{len(cases)} {case.id}: first token {result.first_token_ms:.2f} ms, "
                    f"decode {result.decode_ms_mean:.3f} ms/token, {result.tokens_per_s:.1f} tokens/s")
            if gate is not None:
                line += "; A/B " + ", ".join(f"{v.metric} {v.ratio:.3f} ({v.kind})" for v in paired[case])
            say(line)
    finally:
        runner.close()
        own = [r for r in rows if r["side"] != "B"]
        if own:
            for line in summary_lines(own):
                print(line)
            heatmaps = write_heatmaps(own, options.results_dir, options.model_name, options.device_id)
            if gate is not None:
                for line in ab.summary_lines(paired, *gate):
                    print(line)
            print(f"CSV: {results.path} ({len(rows)} row{'' if len(rows) == 1 else 's'}); heatmaps: {', '.join(map(str, heatmaps))}")
            print(f"wall time: {time.perf_counter() - started:.1f}s")
    if failed:
        raise RankFailure(f"{len(failed)} of {len(cases)} case(s) failed: {', '.join(c.id for c in failed)} "
                          "(each one's error is above)")
    regressions = [f"{v.case.id} {v.metric}" for vs in paired.values() for v in vs if v.kind == "regression"]
    if regressions:
        log(f"error: latency regression against {gate[0].ref.describe()}: {', '.join(regressions)}")
        return 1
    return 0
