"""The code of another commit, for an A/B comparison (--perf-compare-ref): resolved, checked for
the suite, and extracted once into a cache directory keyed by the commit.

The working tree is never touched: side B's code is a `git archive` of the commit's
`starcoder_tp/`, so uncommitted changes in the working tree (side A) are neither lost nor mixed
in; they are recorded in side A's commit label instead (`<sha>+dirty`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import files
from ..files import atomic_dir

PACKAGE = "starcoder_tp"
# Side B is driven through this module of its own code: a commit without it predates the
# A/B protocol (or is not this suite at all), and cannot be compared against.
SERVER_MODULE = f"{PACKAGE}/serve.py"


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError("--perf-compare-ref needs git, which is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"git {' '.join(args)} in {repo} did not finish within 120 s") from None
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc


def repo_root(source: Path = Path(__file__).resolve().parent) -> Path:
    """The git checkout this code runs from; an error when it is not one (a plain `pip install .`)."""
    proc = _git(source, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"--perf-compare-ref needs the suite's git checkout, but {source} is not inside a git "
                           "repository (an installed copy?): run from a clone")
    return Path(proc.stdout.decode().strip())


@dataclass(frozen=True)
class WorkingTree:
    """Side A: the code this process runs."""

    root: Path
    commit: str
    changed: tuple[str, ...]  # uncommitted changes (modified, added, untracked) under starcoder_tp/

    @property
    def label(self) -> str:
        return self.commit[:12] + ("+dirty" if self.changed else "")


def working_tree(root: Path | None = None) -> WorkingTree:
    root = root or repo_root()
    head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    commit = head.stdout.decode().strip() if head.returncode == 0 else "0" * 40  # a repository with no commit yet
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", PACKAGE).stdout.decode()
    changed = tuple(line[3:] for line in status.splitlines() if line.strip() and not line.endswith(".pyc"))
    return WorkingTree(root, commit, changed)


@dataclass(frozen=True)
class RefCheckout:
    """Side B: `ref` resolved to `commit`, its code extracted at `path` (run with `path` first on sys.path)."""

    ref: str
    commit: str
    path: Path

    @property
    def label(self) -> str:
        return self.commit[:12]

    def describe(self) -> str:
        return f"{self.ref} ({self.label})" if not self.commit.startswith(self.ref) else self.label


def resolve_ref(ref: str, root: Path | None = None) -> str:
    """The full commit id `ref` names; an error naming the ref (and what to do in a shallow clone)."""
    root = root or repo_root()
    if not ref or ref.startswith("-"):
        raise ValueError(f"--perf-compare-ref {ref!r} is not a git ref")
    proc = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", check=False)
    if proc.returncode != 0:
        shallow = _git(root, "rev-parse", "--is-shallow-repository", check=False).stdout.decode().strip() == "true"
        hint = (" This clone is shallow (actions/checkout's default depth is 1): fetch the ref first, e.g. "
                "`git fetch origin main`, or check out with fetch-depth: 0." if shallow else
                " (`git branch -a` and `git log` list what exists; a remote branch may need `git fetch` first.)")
        raise ValueError(f"--perf-compare-ref {ref!r}: no such commit in {root}.{hint}")
    return proc.stdout.decode().strip()


def check_has_suite(ref: str, commit: str, root: Path) -> None:
    if _git(root, "cat-file", "-e", f"{commit}:{SERVER_MODULE}", check=False).returncode == 0:
        return
    has_package = _git(root, "cat-file", "-e", f"{commit}:{PACKAGE}/__init__.py", check=False).returncode == 0
    why = (f"its {PACKAGE}/ predates the A/B protocol ({SERVER_MODULE} is missing), so its worker group cannot be "
           "driven from here: compare against a later commit" if has_package else
           f"it has no {PACKAGE}/ package at all: not a commit of this suite")
    raise ValueError(f"--perf-compare-ref {ref!r} (commit {commit[:12]}): {why}")


def _blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _expected_blobs(root: Path, commit: str) -> dict[str, str]:
    """path -> git blob id of every file under starcoder_tp/ in the commit."""
    listing = _git(root, "ls-tree", "-r", "-z", commit, "--", PACKAGE).stdout.decode()
    blobs = {}
    for entry in filter(None, listing.split("\0")):
        meta, path = entry.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob":
            blobs[path] = sha
    return blobs


def _intact(path: Path, blobs: dict[str, str]) -> bool:
    """Every file of the commit is there with the commit's content (an edited cache is not reused)."""
    try:
        return all(_blob_sha((path / name).read_bytes()) == sha for name, sha in blobs.items())
    except OSError:
        return False


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for the extraction only: seconds
        yield


def checkout_ref(ref: str, cache_dir: Path | None = None, root: Path | None = None,
                 log: Callable[[str], None] = lambda m: None) -> RefCheckout:
    """Resolve `ref`, check that its code has the suite, and extract its starcoder_tp/ into
    `cache_dir/<commit>` (reused while intact). Every error comes before any rank starts."""
    root = root or repo_root()
    commit = resolve_ref(ref, root)
    check_has_suite(ref, commit, root)
    cache = Path(cache_dir or files.cache_dir("worktrees"))
    try:
        return _extract(ref, commit, root, cache, log)
    except (OSError, tarfile.TarError) as err:
        raise RuntimeError(f"--perf-compare-ref {ref!r}: cannot extract commit {commit[:12]} into {cache} ({err}); "
                           "set STARCODER_TP_CACHE to a writable directory") from None


def _extract(ref: str, commit: str, root: Path, cache: Path, log: Callable[[str], None]) -> RefCheckout:
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / commit
    blobs = _expected_blobs(root, commit)
    with _locked(cache / f".{commit}.lock"):
        if final.is_dir() and _intact(final, blobs):
            log(f"[compare] side B: {ref} = {commit[:12]}, code cached in {final}")
            return RefCheckout(ref, commit, final)
        if final.exists():
            log(f"[compare] {final} does not match commit {commit[:12]} (edited or half-written): extracting again")
        with atomic_dir(final) as tmp:
            archive = _git(root, "archive", "--format=tar", commit, "--", PACKAGE).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                try:
                    tar.extractall(tmp, filter="data")
                except TypeError:  # Python < 3.10.12 has no extraction filters; git's own archive is trusted
                    tar.extractall(tmp)
            if not _intact(tmp, blobs):
                raise RuntimeError(f"the extracted code of {commit[:12]} does not match the commit (git archive "
                                   "applied export filters?)")
    log(f"[compare] side B: {ref} = {commit[:12]}, code extracted into {final}")
    return RefCheckout(ref, commit, final)
