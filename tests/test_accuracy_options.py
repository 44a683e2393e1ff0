"""The accuracy suite's input checks, as a user meets them: `pytest tests_accuracy ...` in a subprocess."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from starcoder_tp.files import EMBEDDED_MODEL_DIR

REPO = Path(__file__).resolve().parent.parent


def test_a_checkpoint_without_tokenizer_stops_the_accuracy_suite_once_naming_it(tmp_path):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):  # the weights alone: enough for the perf suite
        shutil.copy(EMBEDDED_MODEL_DIR / name, model / name)
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests_accuracy", "-p", "no:cacheprovider",
                           "--model-dir", str(model), "--results-dir", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]  # pytest's usage error: nothing collected, nothing run
    assert out.count("has no tokenizer") == 1 and str(model) in out, out[-3000:]
    assert "[shard]" not in out and "Traceback" not in out, out[-3000:]  # before any shard or rank


def run_accuracy_suite(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "tests_accuracy", "-p", "no:cacheprovider",
                           "--results-dir", str(tmp_path / "results"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bad_sampling_options_stop_the_run_naming_the_value(tmp_path):
    # One option checked by the accuracy options, one by its parser (every parser is a `bounded`
    # one, whose messages tests/test_cli.py checks): each run is a pytest start-up.
    cases = [(("--humaneval-samples", "5"), "--humaneval-samples 5 needs --temperature > 0"),
             (("--top-p", "1.5"), "1.5 must be within (0, 1]")]
    for args, message in cases:
        proc = run_accuracy_suite(tmp_path, *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 4 and message in out, (args, out[-2000:])
        assert "[shard]" not in out and "Traceback" not in out, out[-2000:]


def test_a_stored_reference_of_another_protocol_stops_the_run_before_any_rank(tmp_path):
    from starcoder_tp.files import ORACLE_MODEL_DIR
    from starcoder_tp.suite.accuracy import AccuracyOptions
    from starcoder_tp.suite.humaneval import SideResult, load_problems
    from starcoder_tp.suite.stored_reference import model_fingerprint, save_reference

    problems = load_problems(limit=2)
    side = SideResult("transformers", tasks=list(problems), output_ids=[[0], [0]], topk_ids=[[[0] * 5]] * 2,
                      topk_logprobs=[[[0.0] * 5]] * 2, completions=["", ""],
                      results=[{"passed": False, "result": "failed"}] * 2)
    stored_as = AccuracyOptions(str(ORACLE_MODEL_DIR), problems)  # float32, greedy
    path = save_reference(tmp_path / "ref.json.gz", side, model_fingerprint(ORACLE_MODEL_DIR), str(ORACLE_MODEL_DIR),
                          stored_as.protocol, list(problems), {})
    cases = [(("--accuracy-reference", str(path), "--dtype", "bfloat16", "--humaneval-limit", "2"),
              "dtype 'float32' there, 'bfloat16' here"),
             (("--accuracy-reference", str(tmp_path / "absent.json")), "is neither transformers nor tp1 nor an existing")]
    for args, message in cases:
        proc = run_accuracy_suite(tmp_path, *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 4 and message in out, (args, out[-2000:])
        assert "[shard]" not in out and "Traceback" not in out, out[-2000:]
