"""lifeline.py on its own: a process exits once its driver's pipe closes, and only then."""
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from starcoder_tp.lifeline import EXIT_CODE, exit_on_hangup
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
