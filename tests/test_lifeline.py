"""lifeline.py on its own: a process exits once its driver's pipe closes, and only then."""
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from starcoder_tp.lifeline import EXIT_CODE, ON_EXIT_TIMEOUT_S, exit_on_hangup
from waiting import Lines

# The watched process: it watches a pipe whose writer the test holds, says so, then echoes its stdin
# line by line; its stdin stays open until it has exited, so only the lifeline can end it (with EXIT_CODE).
WATCHED = textwrap.dedent("""
    import sys
    from starcoder_tp.lifeline import exit_on_hangup
    exit_on_hangup(int(sys.argv[1]), "watched")
    print("watching", flush=True)
    for line in sys.stdin:
        print(line, end="", flush=True)
""")


def test_the_process_exits_when_its_drivers_pipe_closes_and_not_for_its_data():
    read_end, write_end = os.pipe()
    os.write(write_end, b"data pending before the watch starts: no hang-up")
    proc = subprocess.Popen([sys.executable, "-c", WATCHED, str(read_end)], pass_fds=(read_end,),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(read_end)
    out = Lines(proc)
    try:
        out.wait_for("watching")
        for ping in ("ping 1", "ping 2"):  # (round trips made while the watch has the data in view)
            proc.stdin.write(ping + "\n"), proc.stdin.flush()
            out.wait_for(ping)
        assert proc.poll() is None
    finally:
        os.close(write_end)
    try:
        proc.wait(timeout=60)  # (bounds a watch that missed the hang-up; it exits in milliseconds)
    finally:
        proc.stdin.close()
    err = proc.stderr.read()
    assert proc.returncode == EXIT_CODE, err
    assert "watched: the process driving it is gone; exiting" in err


def test_a_bad_descriptor_is_refused_naming_it():
    beyond = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # (no descriptor of this process can have it)
    with pytest.raises(ValueError, match=rf"rank 7: cannot watch file descriptor {beyond} "):
        exit_on_hangup(beyond, "rank 7")


# A driver that spawns a process as the worker group spawns a rank, waits until it holds a semaphore (registered
# with the driver's resource tracker, as tqdm's lock is in a rank that compiles), then is killed.
KILLED_DRIVER = textwrap.dedent("""
    import multiprocessing as mp, os, signal, sys, threading

    def child(conn, clean_up):
        from starcoder_tp import lifeline
        from starcoder_tp.rank import release_shared_objects
        lifeline.exit_with_parent("child", on_exit=release_shared_objects if clean_up else None)
        lock = mp.get_context("spawn").RLock()
        conn.send("holding a semaphore")
        threading.Event().wait()  # only the lifeline ends it

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        ctx.Process(target=child, args=(theirs, sys.argv[1] == "clean-up")).start()
        if ours.poll(120):
            print(ours.recv(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("clean_up", [True, False])
def test_a_killed_drivers_tracker_finds_no_semaphore_leaked_by_a_child_that_cleans_up(tmp_path, clean_up):
    """The child's exit by the lifeline runs its on_exit, multiprocessing's own finalizers, first; without it
    the tracker (alive until its last holder, the child, is gone) warns of the semaphore, which shows what
    this test would miss."""
    script = tmp_path / "driver.py"
    script.write_text(KILLED_DRIVER)
    proc = subprocess.run([sys.executable, str(script), "clean-up" if clean_up else "none"],
                          capture_output=True, text=True, timeout=240)  # (bounds a hang; EOF needs the tracker gone)
    assert proc.returncode == -9 and proc.stdout == "holding a semaphore\n", (proc.stdout, proc.stderr)
    assert "child: the process driving it is gone; exiting" in proc.stderr
    assert ("leaked semaphore" in proc.stderr) is not clean_up, proc.stderr


BLOCKED_CLEAN_UP = textwrap.dedent("""
    import sys, threading
    from starcoder_tp.lifeline import exit_on_hangup

    def on_exit():
        if sys.argv[2] == "raises":
            raise OSError("no such segment")
        threading.Event().wait()  # as a finalizer waiting on a lock that the main thread holds would

    exit_on_hangup(int(sys.argv[1]), "watched", on_exit=on_exit)
    print("watching", flush=True)
    threading.Event().wait()
""")


@pytest.mark.parametrize("fault", ["blocks", "raises"])
def test_a_clean_up_that_blocks_or_raises_does_not_keep_the_process_alive(fault):
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_CLEAN_UP, str(read_end), fault], pass_fds=(read_end,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(read_end)
    try:
        try:
            Lines(proc).wait_for("watching")
        finally:
            os.close(write_end)
        proc.wait(timeout=60)  # (bounds a hang; the exit comes ON_EXIT_TIMEOUT_S after the hang-up at most)
    finally:
        proc.kill()  # (a no-op once it has exited)
    err = proc.stderr.read()
    assert proc.returncode == EXIT_CODE, err
    expected = {"blocks": f"watched: its clean-up on exit took over {ON_EXIT_TIMEOUT_S:.0f}s; exiting without it",
                "raises": "watched: its clean-up on exit failed: OSError('no such segment')"}
    assert expected[fault] in err
