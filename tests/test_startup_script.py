"""benchmarks/startup.py: a start-up from scratch measures the plan and the forms in a cache of its own,
and leaves the user's cache as it was."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from startup import from_scratch  # noqa: E402

from starcoder_tp.files import CACHE_ENV, EMBEDDED_MODEL_DIR, cache_at  # noqa: E402
from starcoder_tp.suite.perf import Case, PerfOptions, PerfRunner  # noqa: E402


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_a_start_up_from_scratch_measures_in_a_cache_of_its_own_and_leaves_the_users_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    case = Case(1, 16, 2)
    first = from_scratch(str(EMBEDDED_MODEL_DIR), "float32", 1, case)
    assert first["kernels"].startswith("auto (measured, batch 1"), first
    assert {"forms", "kernel plan", "lay-out"} <= set(first["setup_s"]), first  # where its seconds went
    runner = PerfRunner(PerfOptions(model_dir=str(EMBEDDED_MODEL_DIR), batch_sizes=(1,), seq_in=(16,), seq_out=(2,),
                                    threads_per_rank=1), log=lambda m: None).start()
    try:
        runner.warm_up(case)  # a user's run: the plan and the forms measured into the user's cache
        assert runner.kernels_logged.startswith("auto (measured"), runner.kernels_logged
    finally:
        runner.close()
    before = files_under(tmp_path)
    assert any(p.startswith("kernels/") for p in before) and any(p.startswith("forms/") for p in before)
    times = from_scratch(str(EMBEDDED_MODEL_DIR), "float32", 1, case)
    assert times["kernels"].startswith("auto (measured, batch 1"), f"the user's cached plan was used: {times}"
    assert files_under(tmp_path) == before, "the user's cache is as it was"
    assert os.environ[CACHE_ENV] == str(tmp_path), "the user's cache setting is put back"


@pytest.mark.parametrize("before", [None, "/somewhere/else"])
def test_the_cache_is_put_back_as_it_was_even_after_an_error(tmp_path, monkeypatch, before):
    if before is None:
        monkeypatch.delenv(CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(CACHE_ENV, before)
    with pytest.raises(RuntimeError, match="inside"):
        with cache_at(tmp_path) as scratch:
            assert os.environ[CACHE_ENV] == str(tmp_path) and scratch == tmp_path
            raise RuntimeError("inside")
    assert os.environ.get(CACHE_ENV) == before
