"""One accuracy run: HumanEval completed by the TP runtime and by the single-device reference
(transformers, this runtime at world size 1, or a reference stored by an earlier run), both
executed in the sandboxed pool, with the outputs written and the figures summarised. Used by the
pytest suite (tests_accuracy/)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..device import Device
from .humaneval import TASKS, SideResult, complete, execute, reported_ks, write_outputs
from ..sampling import Sampling
from .flips import find_flips, write_flip_report
from . import stored_reference as stored
from ..shard import ensure_shards
from ..testing.runners import GreedyOutput, HFRunner, TPRunner


@dataclass(frozen=True)
class AccuracyOptions:
    model_dir: str
    problems: dict
    device: Device = Device("cpu")
    world_size: int = 2
    dtype: str = "float32"
    reference: str = "transformers"  # or "tp1", or the path of a stored reference (--accuracy-reference)
    max_new_tokens: int = 320
    batch_size: int = 8
    timeout_s: float = 3.0
    workers: int = 2
    memory_mb: int = 1024
    tolerance: float = 0.02
    results_dir: str = "results"
    threads_per_rank: int | None = None
    kernels: str = "auto"  # kernels.KERNEL_MODES
    compile: bool = False  # the TP ranks' decode steps through torch.compile (--compile)
    samples: int = 1  # completions per problem (--humaneval-samples)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    task: str = "humaneval-unstripped"  # bigcode-evaluation-harness's task name (--humaneval-task)
    save_reference: str | None = None  # where to store the reference side (--save-reference)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"--humaneval-samples {self.samples} needs --temperature > 0: greedy decoding "
                             "gives the same completion every time (the harness's pass@k setting is 0.2)")
        if self.task not in TASKS:
            raise ValueError(f"--humaneval-task {self.task!r} is not one of {', '.join(TASKS)}")
        Sampling(1.0, self.top_p)  # a bad top_p is refused even for a greedy run, where it would go unused
        if self.save_reference is not None:
            if stored.is_stored(self.reference):
                raise ValueError(f"--save-reference {self.save_reference!r} stores the reference this run computes; "
                                 f"with --accuracy-reference {self.reference!r} it computes none")

    @property
    def sampling(self) -> Sampling | None:
        """None for greedy decoding."""
        return Sampling(self.temperature, self.top_p) if self.temperature > 0 else None

    @property
    def protocol(self) -> dict:
        return stored.protocol(self.dtype, self.task, self.max_new_tokens, self.samples, self.temperature,
                               self.top_p, self.seed, self.batch_size, self.problems)


def stored_reference_for(o: AccuracyOptions, log: Callable[[str], None] | None = None) -> stored.StoredReference | None:
    """The run's stored reference, checked against its model, protocol and problems (a mismatch
    is a ValueError naming both sides); None when the reference runs live, whose --save-reference
    file is then tried for writing."""
    if not stored.is_stored(o.reference):
        if o.save_reference is not None:
            stored.check_writable(o.save_reference)
        return None
    reference = stored.load_reference(o.reference)
    reference.check_matches(stored.model_fingerprint(o.model_dir, log), o.model_dir, o.protocol, o.problems)
    return reference


@dataclass
class AccuracyRun:
    options: AccuracyOptions
    parallel: SideResult  # the tensor-parallel runtime's side
    reference: SideResult
    summary: dict
    jsonl: Path
    summary_path: Path
    flips_path: Path
    flips_line: str  # the terminal's line about the flipped verdicts
    reference_line: str = ""  # where a stored reference came from, or where this one was stored


def require_tokenizer(model_dir: str | Path) -> None:
    """The accuracy suite decodes completions into code to run them: a checkpoint without its
    tokenizer stops here, once and before any rank starts, instead of in every test."""
    d = Path(model_dir)
    if (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        return
    raise ValueError(f"--model-dir {str(d)!r} has no tokenizer (neither tokenizer.json nor vocab.json + merges.txt): "
                     "the accuracy suite decodes the completions to run them. Copy the model's tokenizer files "
                     "next to its weights (the perf suite and `generate --input-ids-file` need none)")


def as_greedy_output(side: SideResult) -> GreedyOutput:
    return GreedyOutput(side.output_ids, side.topk_logprobs, side.topk_ids)


def run_accuracy(o: AccuracyOptions, log: Callable[[str], None] = print) -> AccuracyRun:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    from_file = stored_reference_for(o, log)
    tokenizer = AutoTokenizer.from_pretrained(o.model_dir)
    gen = dict(max_new_tokens=o.max_new_tokens, batch_size=o.batch_size, progress=log, samples=o.samples,
               sampling=o.sampling, seed=o.seed, task=o.task)
    runner = TPRunner(ensure_shards(o.model_dir, o.world_size, o.dtype, log=log), o.world_size, o.device,
                      threads_per_rank=o.threads_per_rank, kernels=o.kernels, compile=o.compile)
    try:
        compiled = all(info["compiled"] for info in runner.group.ready_info)  # as the ranks report it
        parallel = complete(runner, f"tp{o.world_size}", tokenizer, o.problems, **gen)
    finally:
        runner.close()
    if from_file is not None:
        reference = from_file.side(o.problems)
    elif o.reference == "tp1":
        runner = TPRunner(ensure_shards(o.model_dir, 1, o.dtype, log=log), 1, o.device)
        try:
            reference = complete(runner, "tp1", tokenizer, o.problems, **gen)
        finally:
            runner.close()
    else:
        device = "cpu" if o.device.kind == "cpu" else str(o.device.torch_device(0))
        reference = complete(HFRunner(o.model_dir, o.dtype, device), "transformers", tokenizer, o.problems, **gen)
    log(f"[humaneval] executing the completions ({o.workers} sandboxed workers, {o.timeout_s:g}s each)")
    stored_results = list(reference.results)
    # A stored reference's programs run here too, so that both sides' verdicts come from one
    # sandbox and one Python; the file's own verdicts say whether that changes any.
    execute([parallel, reference], o.problems, o.task, timeout_s=o.timeout_s, workers=o.workers, memory_mb=o.memory_mb)
    n = len(parallel.tasks)  # completions: problems x samples
    summary = {
        "n_problems": len(o.problems),
        "task": o.task,
        "samples_per_problem": o.samples,
        "sampling": {"temperature": o.temperature, "top_p": o.top_p, "seed": o.seed} if o.sampling else "greedy",
        "pass_at_1": {"tp": parallel.pass_at_1, "reference": reference.pass_at_1},
        "pass_at_k": {key: {str(k): dict(zip(("estimate", "low95", "high95"), side.pass_at(k)))
                            for k in range(1, o.samples + 1)}
                      for key, side in (("tp", parallel), ("reference", reference))},
        "token_agreement": sum(a == b for a, b in zip(parallel.output_ids, reference.output_ids)) / n,
        "task_pass_agreement": sum(a["passed"] == b["passed"] for a, b in zip(parallel.results, reference.results)) / n,
        "flipped": [f"{f.task}#{f.sample}" for f in find_flips(parallel, reference)],
        "dtype": o.dtype,
        "world_size": o.world_size,
        "compiled": compiled,
        "device": o.device.kind,
        "reference": reference.name,
        "reference_file": str(from_file.path) if from_file else None,
        "stored_verdicts_differ": [
            f"{t}#{sample}: {was['result']!r} there, {now['result']!r} here"
            for t, sample, was, now in zip(reference.tasks, reference.sample_indices(), stored_results,
                                           reference.results) if was["passed"] != now["passed"]
        ] if from_file else [],
        "model_dir": str(o.model_dir),
        "max_new_tokens": o.max_new_tokens,
        "generate_s": {"tp": round(parallel.generate_s, 1), "reference": round(reference.generate_s, 1)},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    jsonl, summary_path = write_outputs(o.results_dir, o.problems, parallel, reference, summary)
    flips_path, flips_line = write_flip_report(o.results_dir, parallel, reference, tokenizer)
    if from_file is not None:
        about = from_file.about
        reference_line = (f"reference: {from_file.path} ({about.get('reference')} on {about.get('device')} of "
                          f"{about.get('host')}, {about.get('created')}); its verdicts, run here, differ on "
                          f"{len(summary['stored_verdicts_differ'])} of {n}")
    elif o.save_reference:
        about = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": o.device.kind,
                 "generate_s": round(reference.generate_s, 1)}
        path = stored.save_reference(o.save_reference, reference, stored.model_fingerprint(o.model_dir, log),
                                     o.model_dir, o.protocol, list(o.problems), about)
        reference_line = f"reference stored in {path} (check a TP run against it with --accuracy-reference {path})"
        log(f"[humaneval] {reference_line}")
    else:
        reference_line = ""
    return AccuracyRun(o, parallel, reference, summary, jsonl, summary_path, flips_path, flips_line, reference_line)


def summary_lines(run: AccuracyRun) -> list[str]:
    s = run.summary
    ks = reported_ks(run.options.samples)

    width = max(14, len(run.reference.name) + 2)

    def row(name: str, key: str) -> str:
        cells = "".join(f"{s['pass_at_k'][key][str(k)]['estimate']:>8.4f}" for k in ks)
        seconds = "stored" if key == "reference" and s["reference_file"] else f"{s['generate_s'][key]:.1f}"
        return f"{name:<{width}}{cells}{seconds:>12}"

    sampled = s["sampling"]
    how = "greedy" if sampled == "greedy" else (
        f"{run.options.samples} samples per problem at temperature {sampled['temperature']:g}, "
        f"top_p {sampled['top_p']:g}, seed {sampled['seed']}")
    intervals = "; ".join(f"pass@{k} tp {lo:.3f}-{hi:.3f}" for k in ks
                          for lo, hi in [(s['pass_at_k']['tp'][str(k)]['low95'], s['pass_at_k']['tp'][str(k)]['high95'])])
    return [
        f"{'':<{width}}" + "".join(f"{'pass@' + str(k):>8}" for k in ks) + f"{'generate s':>12}",
        row(run.parallel.name, "tp"),
        row(run.reference.name, "reference"),
        f"95% intervals over problems: {intervals}",
        f"{s['n_problems']} problems ({s['task']}), {how}, {s['dtype']}, world size {s['world_size']}"
        f"{', decode steps compiled' if s['compiled'] else ''}, model {s['model_dir']}",
        f"identical tokens on {s['token_agreement']:.1%} of completions, same verdict on {s['task_pass_agreement']:.1%}; "
        f"wall time {s['wall_s']:.0f}s",
        run.flips_line,
        *([run.reference_line] if run.reference_line else []),
        f"completions: {run.jsonl}; summary: {run.summary_path}",
    ]
