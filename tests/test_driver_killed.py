"""A driver killed outright (SIGKILL: no handler runs) leaves nothing behind: its ranks stop at
once rather than finish the request in hand, and no shared-memory segment stays in /dev/shm.
Each request here is held open by construction (>= 200 s of busy-waited decode steps), so a rank
that only stops when its request ends fails the tests' deadline on any machine."""
import glob
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from starcoder_tp import shm_comm
from starcoder_tp.shard import shard_checkpoint
from waiting import spawned, until

REPO = Path(__file__).resolve().parent.parent
HELD = ("--max-new-tokens", "2000", "--ignore-eos", "--inject-decode-delay-ms", "100")  # >= 200 s
GONE_WITHIN_S = 60  # bounds a hang only: the ranks stop within milliseconds

pytestmark = pytest.mark.skipif(not shm_comm.supported(), reason="the ranks' segment needs x86-64 and /dev/shm")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, embedded_dir):
    out = tmp_path_factory.mktemp("killed") / "s"
    shard_checkpoint(embedded_dir, out, 2)
    return out


@pytest.fixture
def leftovers():
    """Processes a test watches (`leftovers([p, ...])`): any still alive at the end is killed, since
    once their driver is dead they are nobody's children for the `reap` fixture to find. (Not the
    resource tracker: it exits by itself once they are gone, and removes what they left.)"""
    watched: list[psutil.Process] = []
    yield watched.extend
    for p in watched:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _segments_of(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/starcoder_tp-{pid}-*")


def _computing(ranks: list[psutil.Process]) -> None:
    """Until every rank has burnt 0.3 s of CPU: an idle rank waits on its pipe and burns none, so
    each is inside the held request."""
    start = [sum(r.cpu_times()[:2]) for r in ranks]
    until(lambda: all(sum(r.cpu_times()[:2]) - s > 0.3 for r, s in zip(ranks, start)), "the ranks' request")


def _assert_all_gone(procs: list[psutil.Process], segment_owner: int) -> None:
    started = time.monotonic()
    until(lambda: not any(map(_alive, procs)), f"the exit of {[p.pid for p in procs if _alive(p)]}", GONE_WITHIN_S)
    until(lambda: not _segments_of(segment_owner), f"the removal of {_segments_of(segment_owner)}", GONE_WITHIN_S)
    print(f"all gone {time.monotonic() - started:.2f}s after the kill")


def _generate_cli(shards: Path, log: Path, reap) -> subprocess.Popen:
    """The CLI, its output (and its ranks' and resource tracker's) to `log`: a file, which no
    writer can fill up and block on."""
    with open(log, "wb") as out:
        return reap(subprocess.Popen([sys.executable, "-m", "starcoder_tp", "generate", "--shards", str(shards),
                                      "--prompt", "def f(", *HELD], cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=out))


def test_ranks_stop_at_once_when_their_parent_is_killed_mid_request(shards, tmp_path, reap, leftovers):
    log = tmp_path / "generate.log"
    proc = _generate_cli(shards, log, reap)
    driver = psutil.Process(proc.pid)
    until(lambda: "rank(s) ready" in log.read_text(), "the ranks' start", driver=proc, log=log)
    ranks = spawned(driver, "spawn_main")
    assert len(ranks) == 2, [r.cmdline() for r in ranks]
    leftovers(ranks)
    _computing(ranks)  # (ready, they burn CPU only for the request)
    proc.kill()
    proc.wait(10)
    _assert_all_gone(ranks, proc.pid)
    text = log.read_text()
    for rank in (0, 1):
        assert f"starcoder_tp rank {rank}: the process driving it is gone; exiting" in text, text[-3000:]


def test_a_parent_killed_before_its_ranks_are_ready_leaves_no_segment(shards, tmp_path, reap, leftovers):
    """The parent removes the segment once every rank has mapped it: killed before that, it
    cannot. Its ranks are stopped (SIGSTOP) as soon as they are spawned, so none is ready when
    the parent dies; resumed, they must exit, and the segment go with the last of them."""
    log = tmp_path / "generate.log"
    proc = _generate_cli(shards, log, reap)
    driver = psutil.Process(proc.pid)
    stopped: set[int] = set()

    def stop_ranks() -> bool:
        for rank in spawned(driver, "spawn_main"):
            if rank.pid not in stopped:
                rank.send_signal(signal.SIGSTOP)
                stopped.add(rank.pid)
        return len(stopped) == 2

    until(stop_ranks, "the ranks' spawn", driver=proc, log=log)
    ranks = [psutil.Process(pid) for pid in stopped]
    tracker = spawned(driver, "resource_tracker")
    assert len(tracker) == 1, [p.cmdline() for p in driver.children(recursive=True)]
    leftovers(ranks)
    assert _segments_of(proc.pid), "the segment should exist while no rank is ready"
    proc.kill()
    proc.wait(10)
    assert _segments_of(proc.pid), "removed while a stopped rank may still map it"
    for rank in ranks:
        rank.send_signal(signal.SIGCONT)
    _assert_all_gone(ranks + tracker, proc.pid)
    assert "leaked shared_memory" in log.read_text()  # the tracker says what it removed


DRIVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from starcoder_tp.group_spec import GroupSpec
    from starcoder_tp.suite.faults import BusyWait
    from starcoder_tp.suite.serve import RemoteGroup

    repo, shards, log = sys.argv[1:]
    group = RemoteGroup(Path(repo), GroupSpec(shards, 2), "B", Path(log)).start()
    print("ready", group.proc.pid, flush=True)
    group.generate([[5] * 16], 2000, hooks=(BusyWait(decode_ms=100),))
""")


def test_a_killed_ab_driver_leaves_no_side_b_server_and_no_ranks(shards, tmp_path, reap, leftovers):
    log, driver_log = tmp_path / "side-b.log", tmp_path / "driver.log"
    with open(driver_log, "wb") as out:
        proc = reap(subprocess.Popen([sys.executable, "-c", DRIVER, str(REPO), str(shards), str(log)], cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=out))
    until(lambda: re.search(r"^ready \d+$", driver_log.read_text(), re.M), "side B's start", driver=proc, log=driver_log)
    server = psutil.Process(int(re.search(r"^ready (\d+)$", driver_log.read_text(), re.M)[1]))
    ranks = spawned(server, "spawn_main")
    assert len(ranks) == 2, [r.cmdline() for r in ranks]
    leftovers([server, *ranks])
    _computing(ranks)
    proc.kill()
    proc.wait(10)
    _assert_all_gone([server, *ranks], server.pid)
    text = log.read_text()
    assert "starcoder_tp.serve (side B): the process driving it is gone; exiting" in text, text[-3000:]
