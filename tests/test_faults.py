"""Faults in the middle of work: a rank killed or hung fails that case within a bounded time,
naming the rank; the ranks are restarted for the following cases; nothing measured is lost and
nothing is left running."""
import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from starcoder_tp.parallel import GroupSpec, RankFailure, WorkerGroup
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.suite.faults import BusyWait, HangOn
from waiting import Lines, spawned, until

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory, embedded_dir):
    out = tmp_path_factory.mktemp("faults") / "s"
    shard_checkpoint(embedded_dir, out, 2)
    return out


# A request held open by construction: every decode step busy-waits STEP_MS, so the request
# lasts at least HELD_STEPS x STEP_MS (20 s) on any machine; a faster one only spends less of it
# computing. Faults are sent once a rank's heartbeat shows that it is inside the request.
HELD_STEPS, STEP_MS = 1000, 20.0


class InFlight:
    """`group.generate(...)` on a thread; `wait_inside()` returns once a rank's heartbeat moved
    (it is computing this request), `outcome()` joins with a deadline and returns the error."""

    def __init__(self, group: WorkerGroup, steps: int = HELD_STEPS, step_ms: float = STEP_MS):
        self.group, self.error, self.done = group, None, threading.Event()
        self.before = group.progress()

        def run():
            try:
                group.generate([[5] * 16], steps, hooks=(BusyWait(decode_ms=step_ms),))
            except BaseException as err:  # noqa: BLE001 - handed to the test
                self.error = err
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_inside(self, rank: int | None = None, timeout: float = 120) -> None:
        """Until `rank` (None: any rank) ticked in this request, so that a fault sent to it is timed
        from its own last tick. (Waiting on any rank, a rank still silent in its set-up was stopped:
        the parent's watch on its heartbeat counted from the request's start and named a stall
        before the peer's collective timeout; RESULTS.md, "The fault tests on a slowed machine".)"""
        deadline = time.monotonic() + timeout
        ranks = range(len(self.before)) if rank is None else [rank]
        while not any(self.group.progress()[r] > self.before[r] for r in ranks):
            assert not self.done.is_set(), f"the request ended before rank(s) {list(ranks)} ticked: {self.error!r}"
            assert time.monotonic() < deadline, f"rank(s) {list(ranks)} did not tick within {timeout} s of the request"
            time.sleep(0.01)

    def outcome(self, timeout: float = 120) -> BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the request did not end within {timeout}s of the fault"
        return self.error


def _assert_gone(pids: list[int]) -> None:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    alive = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"ranks left running: {alive}"


def test_rank_killed_mid_case_is_named_within_seconds(shards):
    group = WorkerGroup(GroupSpec(str(shards), 2, timeout_s=20)).start()
    pids = [info["pid"] for info in group.ready_info]
    request = InFlight(group)
    request.wait_inside(rank=1)
    started = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    error = request.outcome()
    elapsed = time.monotonic() - started
    print(f"kill -9 to error: {elapsed:.2f}s")
    assert isinstance(error, RankFailure), error
    assert re.search(r"rank 1 was killed by signal SIGKILL|rank\(s\) \[1\] did not reach", str(error)), error
    assert elapsed < 20  # the request itself would have run on for 20 s
    _assert_gone(pids)


def test_hung_rank_is_named_after_the_rank_timeout(shards):
    group = WorkerGroup(GroupSpec(str(shards), 2, timeout_s=4)).start()
    pids = [info["pid"] for info in group.ready_info]
    request = InFlight(group)
    request.wait_inside(rank=1)
    started = time.monotonic()
    os.kill(pids[1], signal.SIGSTOP)
    error = request.outcome()
    elapsed = time.monotonic() - started
    print(f"SIGSTOP to error: {elapsed:.2f}s")
    assert isinstance(error, RankFailure), error
    assert re.search(r"rank\(s\) \[1\] did not reach collective #\d+ within 4s", str(error)), error
    if sys.platform == "linux":  # (stacks.py reads a process's state from /proc)
        assert "rank 1 is stopped" in str(error), error  # (asked for no stack: it could not answer)
    assert elapsed < 4 + 10
    _assert_gone(pids)


def test_a_hung_ranks_stack_comes_with_the_error(shards):
    """The peer's collective timeout names rank 1; the parent then asks the ranks still alive where
    they were (stacks.py), and rank 1's stack shows the loop it hangs in."""
    group = WorkerGroup(GroupSpec(str(shards), 2, timeout_s=4)).start()
    pids = [info["pid"] for info in group.ready_info]
    with pytest.raises(RankFailure) as caught:
        group.generate([[5] * 16], 8, hooks=(HangOn(rank=1),))
    message = str(caught.value)
    # (rank 0's collective timeout names it, or the parent's watch on its heartbeat: either way, its stack)
    assert re.search(r"rank\(s\) \[1\] (did not reach collective #\d+ within 4s|made no progress)", message), message
    stack = message[message.index("rank 1's stack"):] if "rank 1's stack" in message else ""
    assert 'in hang_here' in stack and 'in before_pick' in stack, message
    _assert_gone(pids)


def test_hung_rank_at_world_size_one_is_caught_by_its_heartbeat(tmp_path, embedded_dir):
    """No peer waits on a lone rank: the parent watches its per-layer heartbeat instead. A live
    request that outlasts the same timeout by construction (10 steps of 0.5 s, a heartbeat at
    each) raises no false alarm; a stopped rank is named after the timeout."""
    shard_checkpoint(embedded_dir, tmp_path / "s1", 1)
    group = WorkerGroup(GroupSpec(str(tmp_path / "s1"), 1, timeout_s=3)).start()
    started = time.monotonic()
    group.generate([[5] * 16], 11, hooks=(BusyWait(decode_ms=500.0),))
    assert time.monotonic() - started >= 5.0  # the construction holds: 10 decode steps of >= 0.5 s
    pid = group.ready_info[0]["pid"]
    request = InFlight(group)
    request.wait_inside()
    started = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    error = request.outcome()
    elapsed = time.monotonic() - started
    print(f"world size 1, SIGSTOP to error: {elapsed:.2f}s")
    assert isinstance(error, RankFailure), error
    assert re.search(r"rank\(s\) \[0\] made no progress for 3s during 'generate'", str(error)), error
    assert elapsed < 3 + 10
    _assert_gone([pid])


def _ranks_running(tag: str) -> set[int]:
    """Our ranks (started by multiprocessing's spawn) that carry this test's environment tag,
    wherever they were re-parented, and whatever else runs on the machine (another CI job)."""
    found = set()
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if (p.info["status"] != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.info["cmdline"] or [])
                    and p.environ().get("STARCODER_TP_TEST_TAG") == tag):
                found.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _no_ranks_of(tag: str) -> None:
    until(lambda: not _ranks_running(tag), "the ranks' exit", timeout=30)


# The long cases of the subprocess tests are held open the same way: 300 decode steps of >= 20 ms.
HELD = ["--inject-decode-delay-ms", "20"]


def test_perf_suite_survives_a_killed_rank(tmp_path, reap):
    """The case in flight fails naming the rank, the ranks restart, the later cases pass, the
    rows measured before stay in the CSV, and no process is left behind. The rank is killed as
    soon as the first case's row is written: the second case (>= 6 s by construction) is then
    starting or running, and either way it is the one that must fail."""
    tag = f"perf-suite-{os.getpid()}-{time.time_ns()}"
    proc = reap(subprocess.Popen([sys.executable, "-m", "pytest", "tests_perf", "-p", "no:cacheprovider",
                                  "--batch-sizes", "1", "--seq-in", "16,32", "--seq-out", "8,300", *HELD,
                                  "--results-dir", str(tmp_path)],
                                 cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "STARCODER_TP_TEST_TAG": tag},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    csv_file = tmp_path / "multibatch_performance_starcoder_0.csv"
    until(lambda: csv_file.is_file() and len(csv_file.read_text().splitlines()) >= 2, "the first row")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    assert _ranks_running(tag) == {w.pid for w in workers}  # the final check below can see our ranks
    os.kill(workers[-1].pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, output[-3000:]
    assert "1 failed, 3 passed" in output, output[-3000:]
    assert "FAILED tests_perf/test_latency.py::test_latency[bs1-in16-out300]" in output
    assert "was killed by signal SIGKILL" in output
    rows = list(csv.DictReader(open(csv_file)))
    assert [(r["Input_seq_len"], r["Output_seq_len"]) for r in rows] == [("16", "8"), ("32", "8"), ("32", "300")]
    _no_ranks_of(tag)


def _cli(reap, *args) -> tuple[subprocess.Popen, Lines]:
    proc = reap(subprocess.Popen([sys.executable, "-m", "starcoder_tp", *map(str, args)], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return proc, Lines(proc)


def _assert_procs_gone(ranks: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(ranks, timeout=15)
    alive = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"ranks left running: {alive}"


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_generate_cli_exits_non_zero_naming_the_rank(shards, fault, reap):
    """The fault comes as soon as the ranks are ready: the request (2000 steps of >= 20 ms) is
    then about to start or running, and either way the CLI must fail naming rank 1."""
    proc, out = _cli(reap, "generate", "--shards", shards, "--prompt", "def f(", "--max-new-tokens", 2000,
                     "--ignore-eos", "--rank-timeout", 4, "--inject-decode-delay-ms", 20)
    out.wait_for("rank(s) ready")
    ranks = spawned(psutil.Process(proc.pid))
    assert len(ranks) == 2
    started = time.monotonic()
    os.kill(ranks[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    output = out.finish(timeout=120)
    elapsed = time.monotonic() - started
    print(f"generate CLI, {fault}: exit {proc.returncode} after {elapsed:.2f}s")
    assert proc.returncode == 1, output[-3000:]
    expected = (r"error: rank 1 was killed by signal SIGKILL|error: rank\(s\) \[1\] did not reach" if fault == "kill"
                else r"error: rank\(s\) \[1\] did not reach collective #\d+ within 4s \(rank 0 waited\) during "
                     r"'generate' \(hung or stopped\?\)")
    assert re.search(expected, output), output[-3000:]
    assert elapsed < (20 if fault == "kill" else 4 + 20)  # the request itself lasts >= 40 s
    _assert_procs_gone(ranks)


def test_bench_cli_survives_a_killed_rank_and_keeps_the_rows(tmp_path, reap):
    proc, out = _cli(reap, "bench", "--multicase", 1, "--batch-sizes", 1, "--seq-in", "16,32", "--seq-out", "8,300", *HELD,
                     "--results-dir", tmp_path)
    out.wait_for("[bench] 1/4 bs1-in16-out8")
    ranks = spawned(psutil.Process(proc.pid))
    assert len(ranks) == 2
    os.kill(ranks[1].pid, signal.SIGKILL)  # the second case (>= 6 s) is starting or running
    output = out.finish(timeout=600)
    assert proc.returncode == 1, output[-3000:]
    assert re.search(r"\[bench\] 2/4 bs1-in16-out300 FAILED: rank 1 was killed by signal SIGKILL", output), output
    assert "error: 1 of 4 case(s) failed: bs1-in16-out300" in output
    assert "[bench] 4/4 bs1-in32-out300" in output  # the ranks were restarted for the later cases
    rows = list(csv.DictReader(open(tmp_path / "multibatch_performance_starcoder_0.csv")))
    assert [(r["Input_seq_len"], r["Output_seq_len"]) for r in rows] == [("16", "8"), ("32", "8"), ("32", "300")]
    _assert_procs_gone(ranks)


def test_two_suite_runs_at_once_share_the_cache_without_collisions(tmp_path, reap):
    """Two CI jobs on one machine: one shard cache (cut once, under a lock), free ports, their own
    results; both pass and nothing is left running."""
    tag = f"two-suites-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "STARCODER_TP_CACHE": str(tmp_path / "cache"),
           "STARCODER_TP_TEST_TAG": tag}
    logs = [open(tmp_path / f"out{i}.txt", "w+") for i in range(2)]  # files: neither child blocks on a full pipe
    procs = [reap(subprocess.Popen([sys.executable, "-m", "pytest", "tests_perf", "-p", "no:cacheprovider",
                                    "--batch-sizes", "1", "--seq-in", "16,32", "--seq-out", "8",
                                    "--results-dir", str(tmp_path / f"results{i}")],
                                   cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT, text=True))
             for i in range(2)]
    for proc in procs:
        proc.wait(timeout=300)
    outputs = [(tmp_path / f"out{i}.txt").read_text() for i in range(2)]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        assert "2 passed" in output
    both = "".join(outputs)
    assert len(re.findall(r"\[shard\] .* -> .*: 2 part\(s\), float32", both)) == 1, both[-4000:]
    assert both.count("already holds these shards") == 1
    for i in range(2):
        rows = list(csv.DictReader(open(tmp_path / f"results{i}" / "multibatch_performance_starcoder_0.csv")))
        assert [(r["Input_seq_len"], r["Output_seq_len"]) for r in rows] == [("16", "8"), ("32", "8")]
    shard_sets = [p for p in (tmp_path / "cache" / "shards").iterdir() if not p.name.startswith(".")]
    assert len(shard_sets) == 1
    _no_ranks_of(tag)
