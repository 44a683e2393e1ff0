"""Where the project's files live, and how they are written so that a crash cannot leave a
half-written one behind: the cache, the fixture models, atomic files and directories."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

CACHE_ENV = "STARCODER_TP_CACHE"


def cache_dir(*parts: str) -> Path:
    """$STARCODER_TP_CACHE (default ~/.cache/starcoder_tp), joined with `parts`: shards,
    models, the other commit's code of an A/B comparison."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "starcoder_tp"), *parts)


@contextlib.contextmanager
def cache_at(path: str | Path) -> Iterator[Path]:
    """$STARCODER_TP_CACHE set to `path` while the block runs (processes spawned in it inherit it),
    then put back as it was, unset included: a run as on a machine with nothing cached."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    try:
        yield Path(path)
    finally:
        if previous is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = previous


def _fixtures_root() -> Path:
    # A wheel carries the fixtures inside the package (pyproject.toml maps fixtures/ there); a
    # source checkout, editable install included, has them beside the package.
    packaged = Path(__file__).resolve().parent / "_fixtures"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "fixtures"


FIXTURES = _fixtures_root()
EMBEDDED_MODEL_DIR = FIXTURES / "tiny-starcoder"  # the default model of the perf suite
ORACLE_MODEL_DIR = FIXTURES / "oracle-starcoder"  # the default model of the accuracy suite
STARCODER2_MODEL_DIR = FIXTURES / "tiny-starcoder2"  # StarCoder2-shaped, with the embedded tokenizer


def _temporary_name(path: Path, kind: str) -> Path:
    # Same directory (a rename within one file system is atomic); the suffix kept, so that a
    # writer that picks its format by extension (matplotlib) still can.
    return path.with_name(f".{path.stem}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write; on success it replaces
    `path` in one rename, on failure it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """`data` into `path`, whole or not at all (fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


@contextlib.contextmanager
def atomic_dir(out: str | Path, keep_theirs: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yields a temporary directory beside `out` to fill; on success it takes the place of `out`
    (an existing one is moved aside first and then removed). If another process put its own
    `out` in place meanwhile, `keep_theirs(out)` may accept it; otherwise that is an error."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = _temporary_name(out, "old")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (keep_theirs and keep_theirs(out)):
                raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
