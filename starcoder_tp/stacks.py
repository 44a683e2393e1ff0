"""Where a hung rank was: each rank of a local worker group writes its threads' Python stacks to a
file of its own when the parent sends it SIGUSR1 (faulthandler, which needs no help from the
rank's interpreter: a rank stuck in a C kernel, or in a loop that never returns to the request,
dumps as well). The parent asks every rank still alive when a request fails, and the failure's
message carries what they said. A collective timeout names the late rank; without its stack, a
hang seen once (a CI run's rank 1 missing a kernel plan's collective for 60 s) could not be traced.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

SIGNAL = getattr(signal, "SIGUSR1", None)  # (none on Windows: no dumps there)
DUMP_WAIT_S = 3.0  # how long the parent waits for the asked ranks' dumps, at most
DUMP_LINES = 30  # the innermost frames kept per rank in a failure's message

_armed: list = []  # this rank's open dump file: faulthandler writes to its descriptor


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # a rank that died before it armed
        return 0


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (Linux's /proc; elsewhere: not known, False)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def dump_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.stack"


def arm(directory: str | Path, rank: int) -> None:
    """In a rank: write every thread's stack to dump_path(directory, rank) on SIGNAL."""
    if SIGNAL is None:
        return
    # Open for the process's life; appending, so that a dump lands at the end the parent left.
    dump = open(dump_path(directory, rank), "a")  # noqa: SIM115
    _armed.append(dump)
    faulthandler.register(SIGNAL, file=dump, all_threads=True, chain=False)


def ask(directory: str | Path, pids: dict[int, int]) -> str:
    """In the parent: have the ranks `pids` ({rank: pid}, alive) dump their stacks; returns them,
    each rank's first DUMP_LINES lines (its innermost frames) under a heading; "" where none came within
    DUMP_WAIT_S."""
    stopped = {rank for rank, pid in pids.items() if _stopped(pid)}  # (SIGSTOP: it cannot answer)
    pids = {rank: pid for rank, pid in pids.items() if rank not in stopped}
    notes = "".join(f"\nrank {rank} is stopped (SIGSTOP?): no stack" for rank in sorted(stopped))
    if SIGNAL is None or not pids:
        return notes
    for rank, pid in pids.items():
        if dump_path(directory, rank).exists():  # (an earlier dump is not this one)
            dump_path(directory, rank).write_text("")
        try:
            os.kill(pid, SIGNAL)
        except ProcessLookupError:
            pass
    texts: dict[int, str] = {}
    sizes: dict[int, int] = {}
    deadline = time.monotonic() + DUMP_WAIT_S
    while len(texts) < len(pids) and time.monotonic() < deadline:
        time.sleep(0.02)  # (a file another process writes: polled, within DUMP_WAIT_S)
        for rank in pids:
            size = _size(dump_path(directory, rank))
            if rank not in texts and size and size == sizes.get(rank):  # written, and no longer growing
                texts[rank] = dump_path(directory, rank).read_text()
            sizes[rank] = size
    for rank in pids:  # a dump still being written, or none at all
        texts.setdefault(rank, dump_path(directory, rank).read_text() if _size(dump_path(directory, rank)) else "")
    parts = []
    for rank, text in sorted(texts.items()):
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            parts.append(f"rank {rank}'s stack when the request failed (faulthandler, innermost first):\n"
                         + "\n".join(lines[:DUMP_LINES]))
    return notes + ("\n" + "\n".join(parts) if parts else "")
