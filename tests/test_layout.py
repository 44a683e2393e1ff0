"""The package's layout holds: the runtime imports neither the suites nor the test helpers (the
CLI and the A/B entry point only lazily, inside the commands that need them), no module grows
past ~400 lines, and a non-editable install carries the embedded model and runs from anywhere."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "starcoder_tp"
RUNTIME = sorted(PACKAGE.glob("*.py"))
LAZY_ENTRY_POINTS = {"cli.py", "serve.py"}  # commands that reach into the suites when asked to


def imported_modules(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of what `path` imports (relative imports resolved within the package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_runtime_imports_neither_the_suites_nor_the_test_helpers():
    for path in RUNTIME:
        for module in imported_modules(path, top_level_only=path.name in LAZY_ENTRY_POINTS):
            assert not module.startswith(("starcoder_tp.suite", "starcoder_tp.testing")), \
                f"{path.relative_to(REPO)} imports {module}"


def test_importing_the_runtime_loads_no_suite_module():
    code = ("import sys, starcoder_tp.cli, starcoder_tp.parallel, starcoder_tp.torchrun, starcoder_tp.timing; "
            "print(sorted(m for m in sys.modules if m.startswith(('starcoder_tp.suite', 'starcoder_tp.testing'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_rank_loading_and_serving_a_model_never_imports_dynamo(tmp_path):
    # torch._dynamo costs ~1 s to import, paid by the parent and every rank at each start-up; only
    # --compile needs it. It came in through a decorator in comm.py and nn.Embedding's fill on the meta device.
    code = ("import sys, torch; from starcoder_tp import cli; from starcoder_tp.comm import TPGroup; "
            "from starcoder_tp.files import EMBEDDED_MODEL_DIR; from starcoder_tp.generate import generate; "
            "from starcoder_tp.model import load_model; from starcoder_tp.shard import shard_checkpoint; "
            f"shard_checkpoint(EMBEDDED_MODEL_DIR, {str(tmp_path / 's')!r}, 1, 'float32'); "
            f"model = load_model({str(tmp_path / 's')!r}, TPGroup(0, 1), torch.device('cpu')); "
            "generate(model, [[1, 2, 3]], 3); print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "STARCODER_TP_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr

def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_benchmark_that_loads_a_model_in_process_sets_its_memory_up_as_a_rank():
    # In 4 KiB pages, which a process gets without it, the kernels read the weights slower than a
    # rank does, and the profiles misled (RESULTS.md, "Panels at one row without asking ahead").
    unset = [path.name for path in sorted((REPO / "benchmarks").glob("*.py"))
             if "load_model(" in (text := path.read_text())
             and "as_a_cpu_rank()" not in text and "enable_huge_pages()" not in text]
    assert not unset, f"load a model without malloc.as_a_cpu_rank(): {unset}"


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import setuptools"]).returncode != 0,
                    reason="building the wheel needs setuptools in this environment")
def test_a_non_editable_install_runs_the_bench_on_the_embedded_model_from_another_directory(tmp_path):
    """The wheel (built without network) installed into a folder of its own, put first on the
    path, and the bench run from an unrelated directory: the default model must come with it."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    # setuptools' warning of a data folder left out of `packages` (40 lines in every setup.sh run)
    assert "is absent from the `packages` configuration" not in build.stdout + build.stderr, build.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("starcoder_tp-*.whl"))
    target = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "STARCODER_TP_CACHE": str(tmp_path / "cache")}
    where = subprocess.run([sys.executable, "-c", "import starcoder_tp.files as f; print(f.__file__); "
                            "print(f.EMBEDDED_MODEL_DIR)"], capture_output=True, text=True, cwd=elsewhere, env=env)
    module, model = where.stdout.split()
    assert module.startswith(str(target)) and model.startswith(str(target)), where.stdout + where.stderr
    proc = subprocess.run([sys.executable, "-m", "starcoder_tp", "bench", "--multicase", "0", "--batch", "1",
                           "--seq-in", "16", "--seq-out", "4", "--results-dir", "r"],
                          capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "batch 1 headline" in proc.stdout and (elsewhere / "r" / "multibatch_performance_starcoder_0.csv").is_file()
