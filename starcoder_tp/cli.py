"""`python -m starcoder_tp shard | generate | bench | report | build-model`.

`shard` and `generate` are the runtime's; `bench` and `report` (the suites) and `build-model`
(the fixture builders) are imported only when asked for."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from . import log
from .config import ModelConfig
from .device import Device, DeviceUnavailable
from .generate import check_request
from .options import (DTYPE, MAX_SEQ_LEN, MODEL_DIR, RUNTIME_OPTIONS, WORLD_SIZE, add_options, kernel_mode, option,
                      positive_int)
from .parallel import GroupSpec, RankFailure, WorkerGroup
from .setup_phases import describe as describe_setup
from .shard import TOKENIZER_FILES, ensure_shards, read_manifest, shard_checkpoint

# Subcommands whose code lives outside the runtime: module, what it is.
LAZY_COMMANDS = {
    "bench": ("starcoder_tp.suite.bench", "the latency grid without pytest (the Ascend guide's run.sh flow)"),
    "report": ("starcoder_tp.suite.report_command",
               "re-render the tables and heatmaps of earlier runs from their CSVs; two folders side by side"),
}


def _suite_module(module: str):
    """A suite's module, imported when its command runs; a missing third-party package is named
    with what installs it, instead of a traceback."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and not err.name.startswith("starcoder_tp"):
            raise SystemExit(f"error: {module} needs the package {err.name!r}, which is not installed here: "
                             "pip install 'starcoder-tp[perf]' (or the checkout's requirements.txt)") from err
        raise


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; a lazy subcommand gets its options only when it is the one run."""
    # The name it was called by: the `starcoder-tp` script, or `python -m starcoder_tp`.
    called = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    prog = called if called and called not in ("__main__.py", "-c") else "python -m starcoder_tp"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shard", help="cut a checkpoint into part_model/{rank} + manifest.json")
    p.add_argument("--model-dir", required=True, help="a Hugging Face StarCoder (GPTBigCode) checkpoint directory")
    p.add_argument("--out", required=True)
    add_options(p.add_argument, [option(*WORLD_SIZE.flags, type=positive_int, required=True, help="number of ranks"),
                                 DTYPE])
    p.add_argument("--force", action="store_true", help="replace shards of another checkpoint/world size in --out")

    p = sub.add_parser("generate", help="greedy completions through the tensor-parallel runtime")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(*MODEL_DIR.flags, help="a Hugging Face StarCoder (GPTBigCode) checkpoint directory, cut "
                                               "into the shard cache")
    source.add_argument("--shards", help="a shard set written by `shard` (OUT with manifest.json)")
    add_options(p.add_argument, RUNTIME_OPTIONS)
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--input-ids-file", help="a JSON list of lists of token ids (rows may differ in length)")
    p.add_argument("--max-new-tokens", type=positive_int, required=True)
    add_options(p.add_argument, [MAX_SEQ_LEN])
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    if command == "generate":  # the suite's test-only fault injection (the fault tests hold requests open with it)
        from .suite.options import INJECT

        add_options(p.add_argument, INJECT)

    for name, (module, what) in LAZY_COMMANDS.items():
        p = sub.add_parser(name, help=what)
        if name == command:
            _suite_module(module).add_arguments(p)

    p = sub.add_parser("build-model", help="build the embedded fixture models, the oracle or the bench-size models")
    p.add_argument("which", choices=["embedded", "embedded-starcoder2", "bench", "bench-starcoder2", "oracle"])
    p.add_argument("--out", default=None,
                   help="Default: fixtures/tiny-starcoder (embedded), fixtures/tiny-starcoder2 (embedded-starcoder2), "
                        "fixtures/oracle-starcoder (oracle), the cache (bench, bench-starcoder2)")
    p.add_argument("--epochs", type=positive_int, default=50, help="oracle only. Default: %(default)r")
    p.add_argument("--threads", type=positive_int, default=1, help="oracle only: training threads. Default: %(default)r")
    return parser


def _load_tokenizer(directory: Path):
    if not any((directory / name).is_file() for name in TOKENIZER_FILES[:2]):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _read_prompts(args, tokenizer) -> list[list[int]]:
    if args.input_ids_file:
        if args.prompt:
            raise ValueError("give either --prompt or --input-ids-file, not both")
        try:
            rows = json.loads(Path(args.input_ids_file).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--input-ids-file {args.input_ids_file}: {err}") from None
        if not (isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)
                and all(isinstance(t, int) for r in rows for t in r)):
            raise ValueError(f"--input-ids-file {args.input_ids_file}: expected a non-empty JSON list of non-empty lists of ints")
        return rows
    if not args.prompt:
        raise ValueError("no input: give --prompt TEXT (repeatable) or --input-ids-file F")
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer files; give token ids with --input-ids-file")
    return [tokenizer(p).input_ids for p in args.prompt]


def _texts(tokenizer, output_ids: torch.Tensor, eos: int | None, ignore_eos: bool) -> list[str] | None:
    if tokenizer is None:
        return None
    texts = []
    for row in output_ids.tolist():
        if not ignore_eos and eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def _resolve_shards(args, world_size: int | None, cut: bool = True) -> tuple[Path, int]:
    """The shard set to run, and its world size: --shards as given, or --model-dir cut into the
    cache (`cut`; quietly found there otherwise)."""
    if args.shards:
        manifest = read_manifest(args.shards)
        world_size = world_size or manifest["world_size"]
        if manifest["world_size"] != world_size:
            raise ValueError(f"--shards {args.shards} were cut for world size {manifest['world_size']}, not --world-size {world_size}")
        if manifest["dtype"] != args.dtype:
            log(f"[generate] note: using the shard set's dtype {manifest['dtype']} (not --dtype {args.dtype})")
        return Path(args.shards), world_size
    world_size = world_size or 2
    return ensure_shards(args.model_dir, world_size, args.dtype, log=log if cut else (lambda m: None)), world_size


def _faults(args):
    """The injected delays as a hook (test-only), or none."""
    from .suite.faults import BusyWait

    faults = BusyWait(prefill_ms=args.inject_prefill_delay_ms, decode_ms=args.inject_decode_delay_ms,
                      prefill_fraction=args.inject_prefill_slowdown, decode_fraction=args.inject_decode_slowdown)
    return (faults,) if faults else ()


def _report(args, result, tokenizer, eos, setup_s: float) -> None:
    texts = _texts(tokenizer, result.output_ids, eos, args.ignore_eos)
    if args.json:
        payload = {
            "output_ids": result.output_ids.tolist(),
            "texts": texts,
            "first_token_ms": result.first_token_ms,
            "decode_ms_per_token": result.decode_ms_per_token,
            "decode_ms": result.decode_ms,
            "new_tokens": int(result.output_ids.shape[1]),
            "setup_s": setup_s,
            "request_setup_s": result.setup_s,
        }
        print(json.dumps(payload))
        return
    for row, ids in enumerate(result.output_ids.tolist()):
        print(f"--- completion {row} ---")
        print(texts[row] if texts else ids)
    log(f"[generate] first token {result.first_token_ms:.1f} ms, decode {result.decode_ms_per_token:.2f} ms/token "
        f"({result.output_ids.shape[1]} new tokens); the request's set-up, untimed: {describe_setup(result.setup_s)}")


def cmd_generate(args) -> int:
    from .torchrun import launched_by_torchrun

    device = Device(args.device, args.device_id)
    if launched_by_torchrun():
        return _generate_under_torchrun(args, device)
    started = time.perf_counter()
    shard_dir, world_size = _resolve_shards(args, args.world_size)
    tokenizer = _load_tokenizer(shard_dir / "part_model" / "0")
    prompts = _read_prompts(args, tokenizer)
    check_request(ModelConfig.from_dir(shard_dir / "part_model" / "0"), prompts, args.max_new_tokens, args.max_seq_len)
    spec = GroupSpec(str(shard_dir), world_size, device, args.threads_per_rank, timeout_s=args.rank_timeout,
                     kernels=kernel_mode(args), compile=args.compile)
    with WorkerGroup(spec) as group:
        setup_s = time.perf_counter() - started
        log(f"[generate] {world_size} rank(s) ready in {setup_s:.1f}s (shard + spawn + load)")
        result, _ = group.generate(prompts, args.max_new_tokens, ignore_eos=args.ignore_eos, max_seq_len=args.max_seq_len,
                                   hooks=_faults(args))
    _report(args, result, tokenizer, _eos_of(shard_dir), setup_s)
    return 0


def _eos_of(shard_dir: Path) -> int | None:
    return json.loads((shard_dir / "part_model" / "0" / "config.json").read_text()).get("eos_token_id")


def _generate_under_torchrun(args, device: Device) -> int:
    from .timing import timed_generate
    from .torchrun import torchrun_rank, torchrun_world_size

    torchrun_world_size(args.world_size)
    shards = lambda world_size, cut: _resolve_shards(args, world_size, cut)[0]  # noqa: E731
    with torchrun_rank(device, shards, threads_per_rank=args.threads_per_rank, kernels=kernel_mode(args),
                       compile=args.compile, timeout_s=args.rank_timeout) as rank:
        tokenizer = _load_tokenizer(rank.shard_dir / "part_model" / str(rank.tp.rank))
        prompts = _read_prompts(args, tokenizer)
        result = timed_generate(rank.model, device, prompts, args.max_new_tokens, ignore_eos=args.ignore_eos,
                                max_seq_len=args.max_seq_len, hooks=_faults(args))
        if rank.tp.rank == 0:
            _report(args, result, tokenizer, rank.model.config.eos_token_id, rank.setup_s)
    return 0


def cmd_shard(args) -> int:
    shard_checkpoint(args.model_dir, args.out, args.world_size, args.dtype, force=args.force, log=log)
    return 0


def cmd_build_model(args) -> int:
    from .files import ORACLE_MODEL_DIR
    from .testing import build_models
    from .testing.oracle import train_oracle

    if args.which == "oracle":
        out = train_oracle(args.out or ORACLE_MODEL_DIR, epochs=args.epochs, threads=args.threads, log=log)
    elif args.which == "embedded":
        out = build_models.build_embedded(args.out) if args.out else build_models.build_embedded()
    elif args.which == "embedded-starcoder2":
        out = build_models.build_embedded_starcoder2(args.out) if args.out else build_models.build_embedded_starcoder2()
    elif args.which == "bench-starcoder2":
        out = build_models.build_bench_starcoder2(args.out)
    else:
        out = build_models.build_bench(args.out)
    log(f"[build-model] {args.which} model written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    handlers = {"shard": cmd_shard, "generate": cmd_generate, "build-model": cmd_build_model}
    try:
        if args.command in LAZY_COMMANDS:
            return _suite_module(LAZY_COMMANDS[args.command][0]).run(args)
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, RankFailure, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ValueError, FileNotFoundError, DeviceUnavailable)) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
