"""Where a hung rank was: each rank of a local worker group writes its threads' Python stacks to a
file of its own when the parent sends it SIGUSR1 (faulthandler, which needs no help from the
rank's interpreter: a rank stuck in a C kernel, or in a loop that never returns to the request,
dumps as well). The parent asks every rank still alive when the group fails (a request, or the
start), and the failure's message carries what they said. A collective timeout names the late
rank; without its stack, a hang seen once (a CI run's rank 1 missing a kernel plan's collective
for 60 s) could not be traced.
"""
from __future__ import annotations

import faulthandler
import os
import re
import signal
import time
from pathlib import Path

SIGNAL = getattr(signal, "SIGUSR1", None)  # (none on Windows: no dumps there)
DUMP_WAIT_S = 3.0  # how long the parent waits for the asked ranks' dumps, at most
DUMP_LINES = 12  # the innermost frames kept per thread in a failure's message

_armed: list = []  # this rank's open dump file: faulthandler writes to its descriptor


def dump_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.stack"


def arm(directory: str | Path, rank: int) -> None:
    """In a rank: write every thread's stack to dump_path(directory, rank) on SIGNAL. The file
    appears only once the handler is in place: a rank without it is not asked (SIGNAL's default
    action would end it, and no dump would come)."""
    if SIGNAL is None:
        return
    path = dump_path(directory, rank)
    # Open for the process's life; appending, so that a dump lands at the end the parent left.
    dump = open(path.with_suffix(".arming"), "a")  # noqa: SIM115
    _armed.append(dump)
    faulthandler.register(SIGNAL, file=dump, all_threads=True, chain=False)
    os.replace(dump.name, path)  # (the open descriptor follows the file)


def _state(pid: int) -> str:
    """The process's state letter from /proc (R, S, T, Z, ...); "" where it is gone or unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _innermost(text: str) -> str:
    """Each thread's block of a faulthandler dump cut to its DUMP_LINES innermost frames."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text.strip())
    return "\n".join("\n".join(block.splitlines()[:DUMP_LINES + 1]) for block in blocks if block.strip())


def ask(directory: str | Path, pids: dict[int, int]) -> str:
    """In the parent: have the ranks `pids` ({rank: pid}, alive) dump their stacks; returns them,
    each thread's innermost frames under a heading per rank ("" where none came within
    DUMP_WAIT_S). A stopped rank is named, not asked; one that exits meanwhile is left out."""
    stopped = {rank for rank, pid in pids.items() if _state(pid) in ("T", "t")}  # (SIGSTOP: it cannot answer)
    notes = "".join(f"\nrank {rank} is stopped (SIGSTOP?): no stack" for rank in sorted(stopped))
    asked = {rank: pid for rank, pid in pids.items()
             if rank not in stopped and SIGNAL is not None and dump_path(directory, rank).exists()}
    for rank, pid in asked.items():
        dump_path(directory, rank).write_text("")  # (an earlier dump is not this one)
        try:
            os.kill(pid, SIGNAL)
        except ProcessLookupError:
            pass
    texts: dict[int, str] = {}
    sizes: dict[int, int] = {}
    deadline = time.monotonic() + DUMP_WAIT_S
    while len(texts) < len(asked) and time.monotonic() < deadline:
        time.sleep(0.02)  # (a file another process writes: polled, within DUMP_WAIT_S)
        for rank, pid in asked.items():
            if rank in texts:
                continue
            size = _size(dump_path(directory, rank))
            if size and size == sizes.get(rank):  # written, and no longer growing
                texts[rank] = dump_path(directory, rank).read_text()
            elif not size and _state(pid) in ("", "Z", "X"):  # exited before it could answer
                texts[rank] = ""
            sizes[rank] = size
    parts = [f"rank {rank}'s stack when the group failed (faulthandler, innermost first):\n{_innermost(text)}"
             for rank, text in sorted(texts.items()) if text.strip()]
    return notes + ("\n" + "\n".join(parts) if parts else "")
