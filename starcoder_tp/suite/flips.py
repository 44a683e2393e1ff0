"""The per-problem report of an accuracy run: the completions whose verdict flips between the
TP runtime and the reference, each with the first token where the two sides part and both
completions, as markdown in the results folder and one line for the terminal."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files import write_atomic
from .humaneval import SideResult


@dataclass(frozen=True)
class Flip:
    task: str
    sample: int
    tp_passed: bool
    first_difference: int | None  # token index; None when the tokens are identical (then the run was flaky)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def find_flips(parallel: SideResult, reference: SideResult) -> list[Flip]:
    flips = []
    for i, (task, sample) in enumerate(zip(parallel.tasks, parallel.sample_indices())):
        if parallel.results[i]["passed"] != reference.results[i]["passed"]:
            flips.append(Flip(task, sample, bool(parallel.results[i]["passed"]),
                              first_difference(parallel.output_ids[i], reference.output_ids[i])))
    return flips


def _row_index(side: SideResult, flip: Flip) -> int:
    rows = [i for i, t in enumerate(side.tasks) if t == flip.task]
    return rows[flip.sample]


def _token(tokenizer, ids: list[int], at: int) -> str:
    return f"{ids[at]} {tokenizer.decode([ids[at]])!r}" if at < len(ids) else "(ended)"


def _top(side: SideResult, row: int, at: int, tokenizer) -> str:
    if not side.topk_ids or at >= len(side.topk_ids[row]):
        return ""
    pairs = zip(side.topk_ids[row][at], side.topk_logprobs[row][at])
    return ", ".join(f"{tokenizer.decode([t])!r} {lp:.3f}" for t, lp in pairs)


def write_flip_report(results_dir: str | Path, parallel: SideResult, reference: SideResult, tokenizer) -> tuple[Path, str]:
    """humaneval_flips.md, and the terminal's line about it."""
    flips = find_flips(parallel, reference)
    differing = sum(a != b for a, b in zip(parallel.output_ids, reference.output_ids))
    lines = [f"# HumanEval: verdicts that differ between {parallel.name} and {reference.name}", "",
             f"{len(flips)} of {len(parallel.tasks)} completions flip; tokens differ on {differing}.", ""]
    for flip in flips:
        row = _row_index(parallel, flip)
        ref_row = _row_index(reference, flip)
        assert row == ref_row, (row, ref_row)
        winner = parallel.name if flip.tp_passed else reference.name
        lines += [f"## {flip.task} (sample {flip.sample}): passes only on {winner}", ""]
        at = flip.first_difference
        if at is None:
            lines += ["Identical tokens on both sides: the verdict itself changed between two runs of one program "
                      f"({parallel.results[row]['result']!r} vs {reference.results[row]['result']!r}).", ""]
        else:
            lines += [f"First differing token: #{at}: {parallel.name} {_token(tokenizer, parallel.output_ids[row], at)}, "
                      f"{reference.name} {_token(tokenizer, reference.output_ids[row], at)}.", ""]
            for side in (parallel, reference):
                top = _top(side, row, at, tokenizer)
                if top:
                    lines += [f"- {side.name} top-5 there: {top}"]
            lines += [""]
        for side in (parallel, reference):
            lines += [f"{side.name} ({side.results[row]['result']}):", "", "```python", side.completions[row], "```", ""]
    path = Path(results_dir) / "humaneval_flips.md"
    write_atomic(path, "\n".join(lines) + "\n")
    where = ", ".join(f"{f.task}#{f.sample}" for f in flips[:8]) + (" ..." if len(flips) > 8 else "")
    summary = (f"verdicts flip on {len(flips)} completion(s){': ' + where if flips else ''}; "
               f"tokens differ on {differing}; report: {path}")
    return path, summary
