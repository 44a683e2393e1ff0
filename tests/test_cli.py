"""`python -m starcoder_tp ...` as a user runs it: separate processes, stdout and exit codes."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_files import write_small_model
from starcoder_tp.testing.runners import HFRunner

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "starcoder_tp", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_generate_json_matches_transformers(embedded_dir):
    proc = run_cli("generate", "--model-dir", embedded_dir, "--world-size", 2, "--prompt", "def fib(n):",
                   "--max-new-tokens", 32, "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)  # stdout holds exactly one JSON object
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(embedded_dir))("def fib(n):").input_ids
    reference = HFRunner(embedded_dir).generate_greedy([ids], 32, ignore_eos=False)
    assert payload["output_ids"] == reference.output_ids
    assert isinstance(payload["texts"][0], str) and payload["texts"][0]
    assert payload["first_token_ms"] > 0 and payload["decode_ms_per_token"] > 0
    assert "ready in" in proc.stderr


def test_generate_plain_output_names_each_completion(embedded_dir):
    proc = run_cli("generate", "--model-dir", embedded_dir, "--world-size", 1, "--prompt", "def a():",
                   "--prompt", "import os", "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    assert "--- completion 0 ---" in proc.stdout and "--- completion 1 ---" in proc.stdout


def test_checkpoint_without_tokenizer_takes_input_ids_file(tmp_path):
    src = write_small_model(tmp_path / "m", multi_query=True)
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps([[1, 2, 3, 4, 5], [7, 8]]))
    assert run_cli("shard", "--model-dir", src, "--out", tmp_path / "s", "--world-size", 2).returncode == 0
    proc = run_cli("generate", "--shards", tmp_path / "s", "--input-ids-file", ids_file, "--max-new-tokens", 10,
                   "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["texts"] is None
    assert payload["output_ids"] == HFRunner(src).generate_greedy([[1, 2, 3, 4, 5], [7, 8]], 10).output_ids

    proc = run_cli("generate", "--shards", tmp_path / "s", "--prompt", "hello", "--max-new-tokens", 4)
    assert proc.returncode == 2 and "has no tokenizer files; give token ids with --input-ids-file" in proc.stderr


def test_shard_cli_writes_once_then_does_nothing(tmp_path, embedded_dir):
    first = run_cli("shard", "--model-dir", embedded_dir, "--out", tmp_path / "out", "--world-size", 2,
                    "--dtype", "bfloat16")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["dtype"]) == (2, "bfloat16")
    assert (tmp_path / "out" / "part_model" / "1" / "tokenizer.json").is_file()
    again = run_cli("shard", "--model-dir", embedded_dir, "--out", tmp_path / "out", "--world-size", 2,
                    "--dtype", "bfloat16")
    assert again.returncode == 0 and "nothing to do" in again.stderr


@pytest.mark.parametrize("args,message", [
    (["shard", "--model-dir", "fixtures/tiny-starcoder", "--out", "{tmp}/x", "--world-size", "3"],
     "world size 3 does not divide the number of attention heads n_head=8"),
    (["shard", "--model-dir", "{tmp}/nowhere", "--out", "{tmp}/x", "--world-size", "2"],
     "does not exist"),
    (["generate", "--model-dir", "fixtures/tiny-starcoder", "--max-new-tokens", "4"],
     "no input: give --prompt"),
    (["generate", "--model-dir", "fixtures/tiny-starcoder", "--prompt", "x", "--max-new-tokens", "0"],
     "argument --max-new-tokens: 0 must be >= 1"),
    (["generate", "--model-dir", "fixtures/tiny-starcoder", "--prompt", "x", "--max-new-tokens", "4",
      "--dtype", "float64"], "invalid choice: 'float64'"),
    (["generate", "--model-dir", "fixtures/tiny-starcoder", "--prompt", "x", "--max-new-tokens", "5000"],
     "needs 5001 positions (max_seq_len), but the model has n_positions=4096"),
])
def test_bad_input_exits_non_zero_naming_the_value(tmp_path, args, message):
    proc = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [["generate", "--model-dir", "fixtures/tiny-starcoder", "--prompt", "x",
                                      "--max-new-tokens", "4"], ["bench", "--multicase", "0"]])
def test_a_device_the_machine_lacks_exits_2_before_spawning(command, tmp_path, monkeypatch, capsys):
    """A missing GPU is the user's choice to correct, as a bad value is: exit 2, one line (was 1,
    the code of a rank's failure). Faked, so that it holds on a machine with a GPU too."""
    import torch

    from starcoder_tp import cli, parallel

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(parallel.mp, "get_context", lambda *a: pytest.fail("a rank was spawned"))
    code = cli.main([*command, "--device", "cuda", "--results-dir", str(tmp_path)] if command[0] == "bench"
                    else [*command, "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --device cuda: no cuda device is available on this machine" in err, (code, err)
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("argv0,usage", [("/somewhere/bin/starcoder-tp", "usage: starcoder-tp "),
                                          ("/somewhere/starcoder_tp/__main__.py", "usage: python -m starcoder_tp ")])
def test_the_help_names_the_command_it_was_called_by(argv0, usage, monkeypatch, capsys):
    from starcoder_tp import cli

    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().out.startswith(usage)


def test_bench_single_case_and_grid_share_the_csv(tmp_path):
    proc = run_cli("bench", "--multicase", 0, "--batch", 2, "--seq-in", 24, "--seq-out", 5, "--results-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "multibatch_performance_starcoder_0.csv (1 row); heatmaps:" in proc.stdout, proc.stdout
    proc = run_cli("bench", "--multicase", 1, "--batch-sizes", 1, "--case-pairs", "16:4,32:4", "--results-dir", tmp_path,
                   "--no-prepack")
    assert proc.returncode == 0, proc.stderr
    assert "[bench] 2/2 bs1-in32-out4" in proc.stderr and "batch 1 headline" in proc.stdout
    lines = (tmp_path / "multibatch_performance_starcoder_0.csv").read_text().splitlines()
    assert lines[0].startswith("Batch,Input_seq_len,Output_seq_len,TotalTime(s),first_token_time(ms),avg_token_time(ms)")
    assert [line.split(",")[:3] for line in lines[1:]] == [["2", "24", "5"], ["1", "16", "4"], ["1", "32", "4"]]
    modes = [row["runtime_mode"] for row in csv.DictReader(lines)]
    assert modes == ["eager", "eager-no-prepack", "eager-no-prepack"]  # a baseline of one mode never gates another


@pytest.mark.parametrize("args,message", [
    (["--seq-in", "32,64"], "--multicase 0 runs one case"),
    (["--multicase", "1", "--batch-sizes", "1,-4"], "--batch-sizes: -4 in '1,-4' must be >= 1"),
    (["--multicase", "1", "--batch-sizes", "1", "--case-pairs", "8:4096"], "exceeds the model's n_positions=4096"),
])
def test_bench_refuses_bad_cases_before_spawning(tmp_path, args, message):
    proc = run_cli("bench", "--results-dir", tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "set-up" not in proc.stderr and not list(tmp_path.glob("*.csv"))


def test_a_suite_command_without_its_packages_names_the_missing_one(tmp_path):
    # pandas made unimportable in that process only: a None entry in sys.modules stops the import.
    code = ("import sys; sys.modules['pandas'] = None; from starcoder_tp.cli import main; "
            "sys.exit(main(['report', '.']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert proc.returncode != 0
    assert "'pandas'" in proc.stderr and "pip install" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
