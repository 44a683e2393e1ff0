"""Waiting on other processes in the tests: for an event the test observes, with a deadline that only
bounds a hang (never a sleep that hopes the event came), and finding a process's spawned children."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil


def until(condition, what: str, timeout: float = 120, driver: subprocess.Popen | None = None,
          log: Path | None = None) -> None:
    """Poll `condition` until it holds; fail after `timeout`, or at once when `driver` exits first
    (with the end of its `log`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}) before {what}:\n"
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.02)


def spawned(parent: psutil.Process, kind: str = "spawn_main") -> list[psutil.Process]:
    """`parent`'s descendants whose command line holds `kind` (multiprocessing's ranks by default)."""
    found = []
    for child in parent.children(recursive=True):
        try:
            if kind in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


class Lines:
    """A child's stdout (with its stderr where merged into it), read on a thread, so that a test can wait
    for a line with a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None:  # (its last lines may still be in the pipe: read to its end first)
                self.thread.join(timeout=10)
                if any(text in line for line in self.lines):
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{text!r} never came:\n{''.join(self.lines)[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return "".join(self.lines)
