"""A process that outlives the one driving it stops at once, instead of computing for no one.

A rank killed with its parent would otherwise finish the request in hand (minutes, on a large
case) before its reply failed, and the A/B harness's side-B server likewise. Each watches a pipe
whose only writer is its driver: the writer's end closes when the driver dies, however it dies
(SIGKILL included), and the watcher exits. The watch reads nothing from the pipe, so it can be
the one that carries the driver's messages.
"""
from __future__ import annotations

import multiprocessing
import os
import select
import threading
from typing import Callable

EXIT_CODE = 3  # the driver is gone; no one reads it, but a process list shows why
ON_EXIT_TIMEOUT_S = 2.0  # an on_exit that blocks (on a lock the killed thread holds) must not keep it alive


def _say(message: str) -> None:
    # os.write, not print: sys.stderr's lock may be held by the thread this one is about to end
    try:
        os.write(2, f"{message}\n".encode())
    except OSError:
        pass  # (stderr was the dead driver's pipe)


def _run_bounded(on_exit: Callable[[], None], who: str) -> None:
    def run() -> None:
        try:
            on_exit()
        except BaseException as error:  # (it is exiting whatever happens: say so, and go)
            _say(f"{who}: its clean-up on exit failed: {error!r}")

    cleanup = threading.Thread(target=run, name="starcoder_tp-lifeline-exit", daemon=True)
    cleanup.start()
    cleanup.join(ON_EXIT_TIMEOUT_S)
    if cleanup.is_alive():
        _say(f"{who}: its clean-up on exit took over {ON_EXIT_TIMEOUT_S:.0f}s; exiting without it")


def exit_on_hangup(fd: int, who: str, on_exit: Callable[[], None] | None = None) -> threading.Thread:
    """From now on, exit this process (os._exit) once every writer of the pipe `fd` has closed, after
    `on_exit` (what an os._exit skips) has run or had ON_EXIT_TIMEOUT_S."""
    try:
        os.fstat(fd)
    except OSError as error:
        raise ValueError(f"{who}: cannot watch file descriptor {fd} for its driver's exit: {error}") from None
    poller = select.poll()
    poller.register(fd, 0)  # (POLLHUP and POLLERR are always reported, POLLNVAL too; pending data never is)

    def watch() -> None:
        while not (events := poller.poll()):
            pass
        if events[0][1] & select.POLLNVAL:  # (closed here before the first poll: no driver's end to watch)
            _say(f"{who}: the watch on its driver stopped (file descriptor {fd} was closed here)")
            return
        _say(f"{who}: the process driving it is gone; exiting")
        if on_exit is not None:
            _run_bounded(on_exit, who)
        os._exit(EXIT_CODE)

    thread = threading.Thread(target=watch, name="starcoder_tp-lifeline", daemon=True)
    thread.start()
    return thread


def exit_with_parent(who: str, on_exit: Callable[[], None] | None = None) -> threading.Thread | None:
    """In a process started by multiprocessing: exit once the parent process is gone. None in a
    process that multiprocessing did not start (it has no parent's sentinel to watch)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return None
    return exit_on_hangup(parent.sentinel, who, on_exit)
