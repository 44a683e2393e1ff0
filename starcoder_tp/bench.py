"""`python -m starcoder_tp bench`: the Ascend guide's run.sh flow (shard when needed, warm up,
one case or the grid, the multi-case CSV) with the same functions as the pytest suite."""
from __future__ import annotations

import os
import time

from . import ab
from .build_models import EMBEDDED_MODEL_DIR
from .device import Device
from .gate import parse_thresholds
from .machine import machine_fingerprint
from .parallel import RankFailure, default_threads, launched_by_torchrun, log
from .perf import DEFAULT_BATCH_SIZES, DEFAULT_SEQ_LENS, PerfOptions, PerfRunner, parse_case_pairs, parse_int_list
from .report import ResultsCSV, csv_path, git_commit, result_row, summary_lines, write_heatmaps


def options_from_args(args) -> PerfOptions:
    if args.multicase == 0:
        if args.batch_sizes or args.case_pairs:
            raise ValueError("--batch-sizes and --case-pairs go with --multicase 1; use --batch for one case")
        batch_sizes = (args.batch,)
        seq_in = tuple(parse_int_list("--seq-in", args.seq_in or "128"))
        seq_out = tuple(parse_int_list("--seq-out", args.seq_out or "128"))
        if len(seq_in) != 1 or len(seq_out) != 1:
            raise ValueError(f"--multicase 0 runs one case: give one --seq-in and one --seq-out, "
                             f"not {args.seq_in!r} / {args.seq_out!r}")
    else:
        batch_sizes = tuple(parse_int_list("--batch-sizes", args.batch_sizes or ",".join(map(str, DEFAULT_BATCH_SIZES))))
        default_lens = ",".join(map(str, DEFAULT_SEQ_LENS))
        seq_in = tuple(parse_int_list("--seq-in", args.seq_in or default_lens))
        seq_out = tuple(parse_int_list("--seq-out", args.seq_out or default_lens))
    world_size = args.world_size or 2
    if launched_by_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        if args.world_size and args.world_size != world_size:
            raise ValueError(f"--world-size {args.world_size} differs from torchrun's WORLD_SIZE={world_size}")
    return PerfOptions(
        model_dir=args.model_dir or str(EMBEDDED_MODEL_DIR), device=args.device, device_id=args.device_id,
        world_size=world_size, dtype=args.dtype, batch_sizes=batch_sizes, seq_in=seq_in, seq_out=seq_out,
        case_pairs=tuple(parse_case_pairs(args.case_pairs)) if args.case_pairs else None,
        max_seq_len=args.max_seq_len, rounds=args.perf_rounds, warmup=args.perf_warmup,
        results_dir=args.results_dir, model_name=args.model_name, threads_per_rank=args.threads_per_rank,
        timeout_s=args.timeout, prepack=not args.no_prepack, compile=args.compile,
        inject_prefill_ms=args.perf_inject_prefill_delay_ms, inject_decode_ms=args.perf_inject_decode_delay_ms,
    )


def run_bench(args) -> int:
    options = options_from_args(args)  # every check before any rank is spawned
    options.check_cases()
    thresholds = parse_thresholds(args.perf_max_regression)
    if not 0 < args.perf_alpha < 1:
        raise ValueError(f"--perf-alpha must be within (0, 1), got {args.perf_alpha}")
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
                  gate=(comparison, thresholds, args.perf_alpha))


def _bench_under_torchrun(options: PerfOptions) -> int:
    """This process is one of torchrun's ranks (one node or several): every rank loads its part
    and runs the same cases in step; global rank 0 alone writes the CSV and prints."""
    import torch.distributed as dist

    from .device import Device
    from .generate import load_model
    from .parallel import GroupSpec, TorchrunGroup, configure_threads, init_from_torchrun
    from .shard import ensure_shards

    started = time.perf_counter()
    device = Device(options.device, options.device_id)
    tp, local_rank = init_from_torchrun(device, options.timeout_s)
    try:
        if local_rank == 0:  # one cut per node, into that node's cache
            ensure_shards(options.model_dir, tp.world_size, options.dtype, log=log)
        dist.barrier()
        shard_dir = ensure_shards(options.model_dir, tp.world_size, options.dtype, log=lambda m: None)
        if device.kind == "cpu":
            configure_threads(local_rank, GroupSpec(str(shard_dir), tp.world_size, device, options.threads_per_rank,
                                                    pin_cores=False))
        model = load_model(shard_dir, tp, device.torch_device(local_rank), prepack=options.prepack,
                           compile=options.compile)
        quiet = tp.rank != 0
        if not quiet:
            log(f"[bench] {tp.world_size} torchrun rank(s) ready in {time.perf_counter() - started:.1f}s")
        runner = PerfRunner(options, log=(lambda m: None) if quiet else log, group=TorchrunGroup(model, device, tp))
        return _bench(options, runner, writer=not quiet)
    finally:
        dist.destroy_process_group()


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
            print(f"CSV: {results.path} ({len(rows)} rows); heatmaps: {', '.join(map(str, heatmaps))}")
            print(f"wall time: {time.perf_counter() - started:.1f}s")
    if failed:
        raise RankFailure(f"{len(failed)} of {len(cases)} case(s) failed: {', '.join(c.id for c in failed)} "
                          "(each one's error is above)")
    regressions = [f"{v.case.id} {v.metric}" for vs in paired.values() for v in vs if v.kind == "regression"]
    if regressions:
        log(f"error: latency regression against {gate[0].ref.describe()}: {', '.join(regressions)}")
        return 1
    return 0
