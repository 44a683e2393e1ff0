"""The accuracy run's per-problem report (suite/flips.py), on hand-made sides."""
from starcoder_tp.files import ORACLE_MODEL_DIR
from starcoder_tp.suite.flips import find_flips, first_difference, write_flip_report
from starcoder_tp.suite.humaneval import SideResult


def side(name, rows):
    s = SideResult(name)
    for task, ids, passed in rows:
        s.tasks.append(task), s.output_ids.append(ids), s.completions.append(f"    return {ids}\n")
        s.results.append({"passed": passed, "result": "passed" if passed else "failed: AssertionError"})
    return s


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 0]) == 2


def test_flips_are_found_and_reported_with_the_first_differing_token(tmp_path):
    from transformers import AutoTokenizer

    tp = side("tp2", [("HumanEval/0", [10, 11], True), ("HumanEval/0", [10, 12, 13], False), ("HumanEval/1", [5], True)])
    ref = side("transformers", [("HumanEval/0", [10, 11], True), ("HumanEval/0", [10, 14], True), ("HumanEval/1", [6], True)])
    flips = find_flips(tp, ref)
    assert [(f.task, f.sample, f.tp_passed, f.first_difference) for f in flips] == [("HumanEval/0", 1, False, 1)]
    path, line = write_flip_report(tmp_path, tp, ref, AutoTokenizer.from_pretrained(str(ORACLE_MODEL_DIR)))
    text = path.read_text()
    assert "1 of 3 completions flip; tokens differ on 2." in text
    assert "## HumanEval/0 (sample 1): passes only on transformers" in text
    assert "First differing token: #1: tp2 12 " in text and "transformers 14 " in text
    assert "    return [10, 12, 13]" in text and "    return [10, 14]" in text
    assert line.startswith("verdicts flip on 1 completion(s): HumanEval/0#1; tokens differ on 2; report: ")
