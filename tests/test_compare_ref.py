"""--perf-compare-ref: resolving and extracting the other side's code (in throw-away git
repositories), refusing what cannot be compared before any rank starts, and side B's worker
group failing as loudly as side A's."""
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

from starcoder_tp.suite.faults import BusyWait
from starcoder_tp.suite.gitref import checkout_ref, resolve_ref, working_tree
from starcoder_tp.parallel import GroupSpec, RankFailure
from starcoder_tp.suite.serve import RemoteGroup
from starcoder_tp.shard import shard_checkpoint

REPO = Path(__file__).resolve().parent.parent


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    """Three commits: no package, the package before the A/B protocol, the package with it."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "README").write_text("x\n")
    git(root, "add", "-A"), git(root, "commit", "-qm", "no suite")
    git(root, "tag", "nosuite")
    (root / "starcoder_tp").mkdir()
    (root / "starcoder_tp" / "__init__.py").write_text("")
    git(root, "add", "-A"), git(root, "commit", "-qm", "suite without serve.py")
    git(root, "tag", "old")
    (root / "starcoder_tp" / "serve.py").write_text("PROTOCOL = 1\n")
    git(root, "add", "-A"), git(root, "commit", "-qm", "suite with serve.py")
    return root


def test_a_ref_is_extracted_once_per_commit_and_an_edited_copy_is_replaced(repo, tmp_path):
    cache = tmp_path / "cache"
    messages = []
    first = checkout_ref("main", cache_dir=cache, root=repo, log=messages.append)
    assert first.commit == resolve_ref("HEAD", repo) and first.path == cache / first.commit
    assert (first.path / "starcoder_tp" / "serve.py").read_text() == "PROTOCOL = 1\n"
    assert not (first.path / "README").exists()  # only the package: side B runs nothing else
    assert checkout_ref("main", cache_dir=cache, root=repo, log=messages.append).path == first.path
    assert "extracted" in messages[0] and "cached" in messages[1]
    (first.path / "starcoder_tp" / "serve.py").write_text("tampered\n")
    again = checkout_ref(first.commit[:10], cache_dir=cache, root=repo, log=messages.append)
    assert (again.path / "starcoder_tp" / "serve.py").read_text() == "PROTOCOL = 1\n"
    assert "does not match commit" in messages[2]
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [first.commit]


def test_refs_that_cannot_be_compared_are_refused_naming_them(repo, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"--perf-compare-ref 'origin/mian': no such commit in .*git fetch"):
        checkout_ref("origin/mian", cache_dir=cache, root=repo)
    with pytest.raises(ValueError, match=r"'old' \(commit [0-9a-f]{12}\): its starcoder_tp/ predates the A/B protocol "
                                         r"\(starcoder_tp/serve.py is missing\)"):
        checkout_ref("old", cache_dir=cache, root=repo)
    with pytest.raises(ValueError, match=r"'nosuite' \(commit [0-9a-f]{12}\): it has no starcoder_tp/ package at all"):
        checkout_ref("nosuite", cache_dir=cache, root=repo)
    with pytest.raises(ValueError, match="'--help' is not a git ref"):
        checkout_ref("--help", cache_dir=cache, root=repo)
    assert not cache.exists() or not any(p for p in cache.iterdir() if not p.name.startswith("."))
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)], check=True)
    with pytest.raises(ValueError, match="This clone is shallow .*git fetch origin main"):
        checkout_ref("old", cache_dir=cache, root=shallow)


def test_uncommitted_changes_label_side_a_and_are_left_alone(repo):
    clean = working_tree(repo)
    assert clean.changed == () and clean.label == clean.commit[:12]
    (repo / "starcoder_tp" / "serve.py").write_text("PROTOCOL = 2\n")
    (repo / "starcoder_tp" / "new.py").write_text("")
    dirty = working_tree(repo)
    assert set(dirty.changed) == {"starcoder_tp/serve.py", "starcoder_tp/new.py"} and dirty.label.endswith("+dirty")
    assert (repo / "starcoder_tp" / "serve.py").read_text() == "PROTOCOL = 2\n"


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bad_compare_options_stop_the_suite_and_the_bench_before_any_rank(tmp_path):
    grid = ["--batch-sizes", "1", "--seq-in", "8", "--seq-out", "4", "--results-dir", tmp_path]
    for args, message in [
        (["--perf-compare-ref", "no-such-ref", "--perf-rounds", "6"], "--perf-compare-ref 'no-such-ref': no such commit"),
        (["--perf-compare-ref", "HEAD"], "--perf-compare-ref needs --perf-rounds >= 6 (got 1)"),
        (["--perf-compare-ref", "HEAD", "--perf-rounds", "6", "--perf-baseline", tmp_path / "b.csv"],
         "--perf-compare-ref and --perf-baseline are two ways to gate: give one"),
        (["--perf-compare-ref", "HEAD", "--perf-rounds", "6", "--perf-resume"], "--perf-resume cannot be combined"),
    ]:
        proc = run("-m", "pytest", "tests_perf", "-p", "no:cacheprovider", *grid, *args, timeout=120)
        assert proc.returncode == 4, (args, proc.stdout[-1500:], proc.stderr[-1500:])
        assert message in proc.stderr, (args, proc.stderr[-1500:])
    proc = run("-m", "starcoder_tp", "bench", "--seq-in", "8", "--seq-out", "4", "--perf-rounds", "6",
               "--perf-compare-ref", "no-such-ref", "--results-dir", tmp_path, timeout=120)
    assert proc.returncode == 2 and "error: --perf-compare-ref 'no-such-ref': no such commit" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.csv"))  # nothing measured, nothing half-written


@pytest.fixture(scope="module")
def head_code():
    """Side B = this checkout's HEAD (a commit of the suite with the A/B protocol)."""
    return checkout_ref("HEAD")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, embedded_dir):
    out = tmp_path_factory.mktemp("remote") / "s"
    shard_checkpoint(embedded_dir, out, 2)
    return out


def held_request(group: RemoteGroup, errors: list) -> threading.Thread:
    """A side-B request of >= 20 s by construction (1000 decode steps of >= 20 ms)."""
    def go():
        try:
            group.generate([[5] * 16], 1000, hooks=(BusyWait(decode_ms=20.0),))
        except BaseException as err:  # noqa: BLE001 - handed to the test
            errors.append(err)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def wait_busy(pids: list[int]) -> None:
    """Until a rank has used 0.5 s of CPU since this call: it is computing the request (an idle
    rank blocks on its pipe; the request burns a core for 20 s)."""
    procs = [psutil.Process(p) for p in pids]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    deadline = time.monotonic() + 120
    while all(sum(p.cpu_times()[:2]) - b < 0.5 for p, b in zip(procs, before)):
        assert time.monotonic() < deadline, "side B's ranks never started computing"
        time.sleep(0.02)


@pytest.fixture
def remote_groups():
    """Side-B groups started by a test, closed however it ends."""
    groups = []
    yield groups
    for group in groups:
        group.close(graceful=False)


def test_side_b_answers_like_a_worker_group_and_a_killed_rank_or_server_is_named(head_code, shards, tmp_path,
                                                                                 remote_groups):
    spec = GroupSpec(str(shards), 2, timeout_s=20)
    group = RemoteGroup(head_code.path, spec, head_code.describe(), tmp_path / "b.log").start()
    remote_groups.append(group)
    result, memory = group.generate([[3, 4, 5]], 6)
    assert tuple(result.output_ids.shape) == (1, 6) and len(result.decode_ms) == 5 and len(memory) == 2
    with pytest.raises(ValueError, match=r"side B \(.*\): .*token id 999999 is outside the vocabulary"):
        group.generate([[999999]], 2)  # refused there; the ranks keep serving
    assert group.generate([[3]], 2)[0].output_ids.shape == (1, 2)
    pids = [info["pid"] for info in group.ready_info]
    errors = []
    thread = held_request(group, errors)
    wait_busy(pids)
    os.kill(pids[1], signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], RankFailure)
    assert re.search(r"side B \(.*\): (rank 1 was killed by signal SIGKILL|rank\(s\) \[1\] did not reach)",
                     str(errors[0])), errors[0]
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]

    group = RemoteGroup(head_code.path, spec, head_code.describe(), tmp_path / "b.log").start()
    remote_groups.append(group)
    server, pids = group.proc.pid, [info["pid"] for info in group.ready_info]
    errors = []
    thread = held_request(group, errors)
    wait_busy(pids)
    os.kill(server, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive() and isinstance(errors[0], RankFailure)
    assert re.search(r"side B \(.*\): its server exited with code -9 during 'generate'", str(errors[0])), errors[0]
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "side B's ranks outlived their server"
