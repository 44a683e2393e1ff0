"""The multi-query causal prefill's two forms in fp32 (attention.py): SDPA's flash kernel against
causal_blocks (two GEMMs per block of query tokens over all heads), side by side in one sitting.

- op: one layer's attention, [1, T, H, 64] queries against the one K/V head, H = 16 (the
  bench-size model and StarCoder at world size 1) and 8 (world size 2), 1 and 2 threads, median ms
  over alternating rounds (kernel_timing.time_ms), and the largest difference between the forms.
- model: the first token of the bench-size model at world size 1 on one thread, its weights laid
  out by the kernel plan weighed as for 32 new tokens (the same layout for both), the form switched
  between interleaved rounds; the median ratio blocks/sdpa of the pairs.

Run: python benchmarks/prefill_attention.py [--model bench|embedded|DIR] [--cases 1:128,1:512,16:128] [--rounds 9]
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import cpu_name, write_results  # noqa: E402

from starcoder_tp.attention import (CALIBRATION_TOKENS, PREFILL_FORM, attend, calibrate_attention,  # noqa: E402
                                    causal_blocks)
from starcoder_tp.comm import TPGroup  # noqa: E402
from starcoder_tp.device import Device  # noqa: E402
from starcoder_tp.files import EMBEDDED_MODEL_DIR  # noqa: E402
from starcoder_tp.kernel_timing import time_ms  # noqa: E402
from starcoder_tp.model import load_model  # noqa: E402
from starcoder_tp.shard import ensure_shards  # noqa: E402
from starcoder_tp.testing.build_models import build_bench  # noqa: E402
from starcoder_tp.timing import timed_generate  # noqa: E402


def op_rows(tokens: list[int], heads: int, threads: int) -> list[str]:
    torch.set_num_threads(threads)
    saved, PREFILL_FORM.blocks_at = PREFILL_FORM.blocks_at, frozenset()  # attend: SDPA
    lines = []
    for t in tokens:
        gen = torch.Generator().manual_seed(t)
        q = torch.randn(1, t, heads + 2, 64, generator=gen)[:, :, :heads]
        keys, values = torch.randn(1, 1, t, 64, generator=gen), torch.randn(1, 1, t, 64, generator=gen)
        ms = time_ms({"sdpa": lambda: attend(q, keys, values, None, 0.125),
                      "blocks": lambda: causal_blocks(q, keys, values, 0.125)})
        diff = (causal_blocks(q, keys, values, 0.125) - attend(q, keys, values, None, 0.125)).abs().max().item()
        lines.append(f"| {threads} | {heads} | {t} | {ms['sdpa']:.3f} | {ms['blocks']:.3f} | "
                     f"{ms['blocks'] / ms['sdpa']:.2f} | {diff:.1e} |")
    PREFILL_FORM.blocks_at = saved
    torch.set_num_threads(1)
    return lines


def model_rows(model_dir: str, cases: list[tuple[int, int]], rounds: int) -> list[str]:
    torch.set_num_threads(1)
    model = load_model(ensure_shards(model_dir, 1, "float32"), TPGroup(0, 1), torch.device("cpu"))
    attn = model.transformer.h[0].attn
    calibrate_attention(attn.local_heads, attn.head_dim, lambda t: t)
    measured = PREFILL_FORM.blocks_at
    lines = []
    for batch, seq_in in cases:
        gen = torch.Generator().manual_seed(seq_in)
        prompts = torch.randint(1, model.config.vocab_size, (batch, seq_in), generator=gen).tolist()
        firsts: dict[str, list[float]] = {"sdpa": [], "blocks": []}
        for round_ in range(rounds + 1):  # the first round warms up, and is dropped
            for form in (("sdpa", "blocks") if round_ % 2 else ("blocks", "sdpa")):
                PREFILL_FORM.blocks_at = frozenset() if form == "sdpa" else frozenset(CALIBRATION_TOKENS)
                # The cache sized for 32 tokens: the layout weighed as for the perf suite's out=32 case.
                ms = timed_generate(model, Device("cpu"), prompts, 1, max_seq_len=seq_in + 32).first_token_ms
                if round_:
                    firsts[form].append(ms)
        ratios = [b / s for b, s in zip(firsts["blocks"], firsts["sdpa"])]
        lines.append(f"| {batch} | {seq_in} | {statistics.median(firsts['sdpa']):.1f} | "
                     f"{statistics.median(firsts['blocks']):.1f} | {statistics.median(ratios):.3f} "
                     f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    PREFILL_FORM.blocks_at = measured
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench, embedded or a checkpoint directory. Default: %(default)r")
    parser.add_argument("--tokens", default="32,64,128,256,512,1024", help="op table lengths. Default: %(default)r")
    parser.add_argument("--cases", default="1:128,1:512,16:128", help="batch:seq_in,... Default: %(default)r")
    parser.add_argument("--rounds", type=int, default=9, help="pairs per model case. Default: %(default)r")
    args = parser.parse_args()
    started = time.perf_counter()
    tokens = [int(t) for t in args.tokens.split(",")]
    ops = [line for threads in (1, 2) for heads in (16, 8) for line in op_rows(tokens, heads, threads)]
    model_dir = {"bench": lambda: str(build_bench()), "embedded": lambda: str(EMBEDDED_MODEL_DIR)}.get(
        args.model, lambda: args.model)()
    cases = [tuple(int(v) for v in case.split(":")) for case in args.cases.split(",")]
    models = model_rows(model_dir, cases, args.rounds)
    text = "\n".join([
        "## The multi-query prefill's attention", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/prefill_attention.py` in "
        f"{time.perf_counter() - started:.0f} s. Machine: {cpu_name()}, torch {torch.__version__}. "
        f"The form as this process calibrated it: {PREFILL_FORM.calibrated}.", "",
        "One layer's causal attention, fp32, head dim 64, one K/V head; ms per call, median of alternating rounds; "
        "diff = the largest difference between the forms.", "",
        "| threads | heads | tokens | sdpa | blocks | blocks/sdpa | diff |", "|---|---|---|---|---|---|---|", *ops, "",
        f"First token of `{model_dir}` at world size 1, one thread, fp32, the weights laid out by the plan "
        f"weighed for the prompt and 31 decode steps (the same for both forms); ms, median of {args.rounds} "
        "interleaved pairs; blocks/sdpa: the median of the pairs' ratios (their range).", "",
        "| batch | prompt | sdpa | blocks | blocks/sdpa |", "|---|---|---|---|---|", *models])
    write_results("The multi-query prefill's attention", text)
    print(text)


if __name__ == "__main__":
    main()
