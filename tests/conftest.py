"""Fixtures for the runtime's own tests: small checkpoints in every published layout, shard
sets, persistent worker groups and the transformers reference, each built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from starcoder_tp import rowdot
from starcoder_tp.files import EMBEDDED_MODEL_DIR
from starcoder_tp.testing.runners import HFRunner, TPRunner
from starcoder_tp.shard import shard_checkpoint

from model_files import NEW_TOKENS

# Ragged on purpose: the runtime must left-pad them and place positions right.
PROMPTS_TEXT = [
    "def fib(n):",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "x",
    "def sort_numbers(numbers: list[int]) -> list[int]:\n    \"\"\"Return the numbers sorted.\"\"\"\n",
]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the shard cache of the tests out of the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STARCODER_TP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    return EMBEDDED_MODEL_DIR


@pytest.fixture(scope="session")
def prompts(embedded_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_dir))
    return [tokenizer(text).input_ids for text in PROMPTS_TEXT]


@pytest.fixture(scope="session")
def hf_reference(embedded_dir, prompts):
    return HFRunner(embedded_dir).generate_greedy(prompts, NEW_TOKENS)


@pytest.fixture(scope="session")
def tp_runners(tmp_path_factory, embedded_dir):
    """One persistent worker group per world size over the embedded model, made on demand."""
    runners: dict[tuple, TPRunner] = {}

    def get(world_size: int, dtype: str = "float32", model_dir: Path | None = None, comm: str = "auto") -> TPRunner:
        key = (world_size, dtype, str(model_dir or embedded_dir), comm)
        if key not in runners:
            out = tmp_path_factory.mktemp(f"shards-ws{world_size}-{dtype}")
            shard_checkpoint(model_dir or embedded_dir, out / "s", world_size, dtype)
            runners[key] = TPRunner(out / "s", world_size, comm=comm)
        return runners[key]

    yield get
    for runner in runners.values():
        runner.close()


@pytest.fixture
def reap():
    """Register child processes of a test (`reap(proc)` returns it); whatever is left of them
    and of their process trees when the test ends, passed or failed, is killed."""
    import psutil

    procs = []
    yield lambda proc: procs.append(proc) or proc
    for proc in procs:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)


@pytest.fixture(params=["widest", "avx2"])
def panels_kernel(request):
    """The kernels panels.c runs: the widest this CPU runs (AVX-512 where it has it) and AVX2's
    (panels_avx2.c), which rowdot's path "avx2" stands in for a CPU without AVX-512 with."""
    widest = rowdot.path()
    if widest is None:
        pytest.skip(f"our kernels are not built here: {rowdot.unavailable()}")
    if request.param == "avx2" and not rowdot.use_path("avx2"):
        pytest.skip("this CPU does not run AVX2 and FMA")
    yield request.param
    rowdot.use_path(widest)
