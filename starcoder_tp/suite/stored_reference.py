"""Stored references: the single-device side of an accuracy run kept in a file (--save-reference),
so that a tensor-parallel run elsewhere is checked against it (--accuracy-reference FILE). The
Ascend guide's case needs this: StarCoder 15.5B is cut in two because one chip cannot hold it,
so its reference has to come from a machine that can.

The file holds every completion with its token ids, top-5 logprobs and verdict, and what decides
them: the model's content fingerprint (weights, config and tokenizer), dtype, task, samples,
sampling, seed and max tokens. A run that differs in any of these is refused, naming both sides,
before a rank starts: its comparison would measure the difference in protocol, not in TP."""
from __future__ import annotations

import gzip
import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CheckpointReader
from ..files import write_atomic
from .humaneval import SideResult

FORMAT = "starcoder-tp stored reference"
VERSION = 1
TOPK = 5  # the log-probabilities kept per step, as the live comparison keeps them
# Completions are decoded to be run: another tokenizer gives other programs from the same ids.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
LIVE_REFERENCES = ("transformers", "tp1")


def model_fingerprint(model_dir: str | Path) -> str:
    """The checkpoint's content fingerprint (see CheckpointReader.content_fingerprint) and its
    tokenizer files: the same on every machine that holds a copy of the same model."""
    digest = hashlib.sha256(CheckpointReader(model_dir).content_fingerprint().encode())
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(f"\0{name}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def protocol(dtype: str, task: str, max_new_tokens: int, samples: int, temperature: float, top_p: float,
             seed: int) -> dict:
    """What decides a run's completions besides the model. Greedy decoding draws nothing, so
    there top_p and the seed are not part of it (None)."""
    sampled = temperature > 0
    return {"dtype": dtype, "task": task, "max_new_tokens": max_new_tokens, "samples": samples,
            "temperature": float(temperature), "top_p": float(top_p) if sampled else None,
            "seed": seed if sampled else None, "topk": TOPK}


def is_stored(reference: str) -> bool:
    return reference not in LIVE_REFERENCES


@dataclass(frozen=True)
class StoredReference:
    path: Path
    protocol: dict
    model: dict  # fingerprint, and the folder it was read from (for the messages)
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
        differ = [f"{key} {self.protocol.get(key)!r} there, {value!r} here"
                  for key, value in run_protocol.items() if self.protocol.get(key) != value]
        if differ:
            raise ValueError(f"--accuracy-reference {str(self.path)!r} was made with another protocol: "
                             f"{'; '.join(differ)}. Run with the file's settings, or store a reference with these")
        have = {row["task_id"] for row in self.rows}
        missing = [task for task in problems if task not in have]
        if missing:
            raise ValueError(f"--accuracy-reference {str(self.path)!r} lacks {len(missing)} of this run's problems "
                             f"(first: {missing[0]!r}); it holds {len(have)}. Select among them with "
                             "--humaneval-limit / --humaneval-tasks, or store a reference for these")

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
    except (OSError, ValueError) as err:
        raise ValueError(f"--accuracy-reference {str(path)!r} is not a stored reference ({err})") from None


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
    return StoredReference(path, data["protocol"], data["model"], data.get("about", {}), data["rows"])


def save_reference(path: str | Path, side: SideResult, model_fp: str, model_dir: str, run_protocol: dict,
                   about: dict) -> Path:
    """`side`'s completions, token ids, top-5 logprobs and verdicts, written atomically; gzip
    when the name ends in .gz (a greedy 164-problem run is a few MB, n = 50 about 50 times that)."""
    import torch
    import transformers

    path = Path(path)
    rows, seen = [], {}
    for i, task in enumerate(side.tasks):
        sample = seen[task] = seen.get(task, -1) + 1
        rows.append({"task_id": task, "sample": sample, "output_ids": side.output_ids[i],
                     "topk_ids": side.topk_ids[i], "topk_logprobs": side.topk_logprobs[i],
                     "completion": side.completions[i], "passed": side.results[i]["passed"],
                     "result": side.results[i]["result"]})
    about = {"reference": side.name, "host": platform.node(), "python": platform.python_version(),
             "torch": torch.__version__, "transformers": transformers.__version__, **about}
    data = json.dumps({"format": FORMAT, "version": VERSION, "protocol": run_protocol,
                       "model": {"fingerprint": model_fp, "model_dir": str(model_dir)}, "about": about,
                       "rows": rows}).encode()
    write_atomic(path, gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path
