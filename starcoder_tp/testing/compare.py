"""Comparing two runners' greedy outputs, with failure messages that show both sides."""
from __future__ import annotations

from .runners import GreedyOutput


def check_outputs_equal(*, outputs_0: GreedyOutput, outputs_1: GreedyOutput, name_0: str, name_1: str,
                        prompts: list[list[int]] | None = None) -> None:
    """Token-for-token identity (the fp32 rule)."""
    assert len(outputs_0.output_ids) == len(outputs_1.output_ids), "different batch sizes"
    for row, (ids_0, ids_1) in enumerate(zip(outputs_0.output_ids, outputs_1.output_ids)):
        if ids_0 != ids_1:
            first = next((i for i, (a, b) in enumerate(zip(ids_0, ids_1)) if a != b), min(len(ids_0), len(ids_1)))
            raise AssertionError(
                f"prompt {row}{'' if prompts is None else f' {prompts[row][:12]}...'}: outputs differ at token {first}\n"
                f"  {name_0}: {ids_0}\n  {name_1}: {ids_1}"
            )


def check_topk_close(*, outputs_0: GreedyOutput, outputs_1: GreedyOutput, name_0: str, name_1: str) -> list[int]:
    """vLLM's rule for low precision: identical up to the first difference, where each side's
    token must be among the other side's top-k; the sequences diverge after it, so the check
    stops there. Returns, per prompt, the index of the first difference (or its length)."""
    firsts = []
    for row, (ids_0, ids_1) in enumerate(zip(outputs_0.output_ids, outputs_1.output_ids)):
        first = next((i for i, (a, b) in enumerate(zip(ids_0, ids_1)) if a != b), None)
        if first is None:
            assert len(ids_0) == len(ids_1), f"prompt {row}: lengths {len(ids_0)} vs {len(ids_1)}"
            firsts.append(len(ids_0))
            continue
        top_0, top_1 = outputs_0.topk_ids[row][first], outputs_1.topk_ids[row][first]
        if ids_0[first] not in top_1 or ids_1[first] not in top_0:
            raise AssertionError(
                f"prompt {row}: first difference at token {first}: {name_0} chose {ids_0[first]}, "
                f"{name_1} chose {ids_1[first]}, not each within the other's top-{len(top_0)}\n"
                f"  {name_0}: {ids_0}\n    top-k ids {top_0}, logprobs {outputs_0.topk_logprobs[row][first]}\n"
                f"  {name_1}: {ids_1}\n    top-k ids {top_1}, logprobs {outputs_1.topk_logprobs[row][first]}"
            )
        firsts.append(first)
    return firsts
