"""`python -m starcoder_tp shard | generate | build-model`."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .config import ModelConfig
from .device import DEVICE_KINDS, Device
from .generate import check_request
from .parallel import GroupSpec, RankFailure, WorkerGroup, init_from_torchrun, launched_by_torchrun, log
from .shard import DTYPES, TOKENIZER_FILES, ensure_shards, read_manifest, shard_checkpoint


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    """How the weights and the decode step run (generate and bench alike)."""
    p.add_argument("--no-prepack", action="store_true", default=False,
                   help="keep the linear weights in their plain layout (F.linear) instead of pre-packing them for oneDNN on CPU. Default: %(default)r")
    p.add_argument("--compile", action="store_true", default=False,
                   help="run decode steps through torch.compile (inductor): compiles per batch size and cache length. Default: %(default)r")


def _non_negative_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected finite milliseconds >= 0, got {text}")
    return value


def _add_injection_options(p: argparse.ArgumentParser, prefix: str = "--") -> None:
    """Test-only: busy-wait inside the timed regions, as a slower kernel would (the gate's tests
    prove it catches that; the fault tests hold a request open for as long as they need)."""
    p.add_argument(f"{prefix}inject-decode-delay-ms", type=_non_negative_ms, default=0.0,
                   help="test-only: add this delay to every decode step (side A only). Default: %(default)r")
    p.add_argument(f"{prefix}inject-prefill-delay-ms", type=_non_negative_ms, default=0.0,
                   help="test-only: add this delay to the prefill (side A only). Default: %(default)r")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a Hugging Face GPTBigCode checkpoint directory (cut into the cache)")
    src.add_argument("--shards", help="a shard set written by `shard` (OUT with manifest.json)")
    p.add_argument("--world-size", type=_positive_int, default=None,
                   help="number of ranks. Default: 2 with --model-dir, the shard set's with --shards")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and compute dtype. Default: %(default)r")
    p.add_argument("--device", choices=DEVICE_KINDS, default="cpu", help="Default: %(default)r")
    p.add_argument("--device-id", type=int, default=0, help="rank r uses device device_id + r. Default: %(default)r")
    p.add_argument("--threads-per-rank", type=_positive_int, default=None,
                   help="CPU threads per rank. Default: the cores shared evenly among the ranks")
    _add_speed_options(p)
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a rank may wait on another before the run fails, naming it. Default: %(default)r")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m starcoder_tp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shard", help="cut a checkpoint into part_model/{rank} + manifest.json")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--world-size", type=_positive_int, required=True)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Default: %(default)r")
    p.add_argument("--force", action="store_true", help="replace shards of another checkpoint/world size in --out")

    p = sub.add_parser("generate", help="greedy completions through the tensor-parallel runtime")
    _add_run_options(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--input-ids-file", help="a JSON list of lists of token ids (rows may differ in length)")
    p.add_argument("--max-new-tokens", type=_positive_int, required=True)
    p.add_argument("--max-seq-len", type=_positive_int, default=None,
                   help="KV cache length (the Ascend guide's MAX_SEQ_LENGTH). Default: input + output")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    _add_injection_options(p)

    p = sub.add_parser("bench", help="the latency grid without pytest (the Ascend guide's run.sh flow)")
    p.add_argument("--model-dir", default=None, help="Default: the embedded model (fixtures/tiny-starcoder)")
    p.add_argument("--world-size", type=_positive_int, default=None,
                   help="number of ranks. Default: 2, or torchrun's WORLD_SIZE under torchrun")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Default: %(default)r")
    p.add_argument("--device", choices=DEVICE_KINDS, default="cpu", help="Default: %(default)r")
    p.add_argument("--device-id", type=int, default=0, help="Default: %(default)r")
    p.add_argument("--multicase", type=int, choices=[0, 1], default=0,
                   help="0: one case (--batch --seq-in --seq-out); 1: the grid. Default: %(default)r")
    p.add_argument("--batch", type=_positive_int, default=1, help="multicase 0. Default: %(default)r")
    p.add_argument("--batch-sizes", default=None, help="multicase 1, comma-separated. Default: 1,4,8,16,32")
    p.add_argument("--seq-in", default=None, help="comma-separated. Default: 128 (multicase 0), 32,...,1024 (1)")
    p.add_argument("--seq-out", default=None, help="comma-separated. Default: 128 (multicase 0), 32,...,1024 (1)")
    p.add_argument("--case-pairs", default=None, help="multicase 1: IN:OUT pairs instead of the product")
    p.add_argument("--max-seq-len", type=_positive_int, default=None, help="Default: each case's input + output")
    p.add_argument("--perf-rounds", type=_positive_int, default=1, help="Default: %(default)r")
    p.add_argument("--perf-warmup", type=int, default=1, help="Default: %(default)r")
    p.add_argument("--results-dir", default="results", help="Default: %(default)r")
    p.add_argument("--model-name", default="starcoder", help="Default: %(default)r")
    p.add_argument("--threads-per-rank", type=_positive_int, default=None)
    _add_speed_options(p)
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a rank may wait on another before the case fails, naming it. Default: %(default)r")
    p.add_argument("--perf-compare-ref", default=None, metavar="GITREF",
                   help="A/B in one sitting: every case on this code (A) and on GITREF's (B), rounds interleaved; "
                        "exit 1 when a paired ratio regressed (needs --perf-rounds >= 6). Default: %(default)r")
    p.add_argument("--perf-max-regression", default="first_token=10%,decode=10%",
                   help="per-metric thresholds of --perf-compare-ref. Default: %(default)r")
    p.add_argument("--perf-alpha", type=float, default=0.05,
                   help="significance level of --perf-compare-ref's Wilcoxon test. Default: %(default)r")
    _add_injection_options(p, prefix="--perf-")

    p = sub.add_parser("build-model", help="build the embedded fixture model or the bench-size model")
    p.add_argument("which", choices=["embedded", "bench", "oracle"])
    p.add_argument("--out", default=None,
                   help="Default: fixtures/tiny-starcoder (embedded), fixtures/oracle-starcoder (oracle), the cache (bench)")
    p.add_argument("--epochs", type=_positive_int, default=50, help="oracle only. Default: %(default)r")
    p.add_argument("--threads", type=_positive_int, default=1, help="oracle only: training threads. Default: %(default)r")
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


def _resolve_shards(args) -> tuple[Path, int]:
    if args.shards:
        manifest = read_manifest(args.shards)
        world_size = args.world_size or manifest["world_size"]
        if manifest["world_size"] != world_size:
            raise ValueError(f"--shards {args.shards} were cut for world size {manifest['world_size']}, not --world-size {world_size}")
        if manifest["dtype"] != args.dtype:
            log(f"[generate] note: using the shard set's dtype {manifest['dtype']} (not --dtype {args.dtype})")
        return Path(args.shards), world_size
    world_size = args.world_size or 2
    return ensure_shards(args.model_dir, world_size, args.dtype, log=log), world_size


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
        }
        print(json.dumps(payload))
        return
    for row, ids in enumerate(result.output_ids.tolist()):
        print(f"--- completion {row} ---")
        print(texts[row] if texts else ids)
    log(f"[generate] first token {result.first_token_ms:.1f} ms, decode {result.decode_ms_per_token:.2f} ms/token "
        f"({result.output_ids.shape[1]} new tokens)")


def cmd_generate(args) -> int:
    device = Device(args.device, args.device_id)
    if launched_by_torchrun():
        return _generate_under_torchrun(args, device)
    started = time.perf_counter()
    shard_dir, world_size = _resolve_shards(args)
    tokenizer = _load_tokenizer(shard_dir / "part_model" / "0")
    prompts = _read_prompts(args, tokenizer)
    check_request(ModelConfig.from_dir(shard_dir / "part_model" / "0"), prompts, args.max_new_tokens, args.max_seq_len)
    spec = GroupSpec(str(shard_dir), world_size, device, args.threads_per_rank, timeout_s=args.timeout,
                     prepack=not args.no_prepack, compile=args.compile)
    with WorkerGroup(spec) as group:
        setup_s = time.perf_counter() - started
        log(f"[generate] {world_size} rank(s) ready in {setup_s:.1f}s (shard + spawn + load)")
        result, _ = group.generate(prompts, args.max_new_tokens, ignore_eos=args.ignore_eos, max_seq_len=args.max_seq_len,
                                   inject_prefill_ms=args.inject_prefill_delay_ms,
                                   inject_decode_ms=args.inject_decode_delay_ms)
    _report(args, result, tokenizer, _eos_of(shard_dir), setup_s)
    return 0


def _eos_of(shard_dir: Path) -> int | None:
    return json.loads((shard_dir / "part_model" / "0" / "config.json").read_text()).get("eos_token_id")


def _generate_under_torchrun(args, device: Device) -> int:
    import torch.distributed as dist

    from .generate import load_model, timed_generate
    from .parallel import configure_threads

    started = time.perf_counter()
    tp, local_rank = init_from_torchrun(device, args.timeout)
    if args.world_size and args.world_size != tp.world_size:
        raise ValueError(f"--world-size {args.world_size} differs from torchrun's WORLD_SIZE={tp.world_size}")
    try:
        if args.model_dir and local_rank == 0:
            shard_dir, _ = _resolve_shards(argparse.Namespace(**{**vars(args), "world_size": tp.world_size}))
        dist.barrier()  # the local rank 0 of every node has cut its node's shards
        shard_dir, _ = _resolve_shards(argparse.Namespace(**{**vars(args), "world_size": tp.world_size}))
        spec = GroupSpec(str(shard_dir), tp.world_size, device, args.threads_per_rank, pin_cores=False)
        if device.kind == "cpu":
            configure_threads(local_rank, spec)
        model = load_model(shard_dir, tp, device.torch_device(local_rank), prepack=not args.no_prepack,
                           compile=args.compile)
        tokenizer = _load_tokenizer(shard_dir / "part_model" / str(tp.rank))
        prompts = _read_prompts(args, tokenizer)
        setup_s = time.perf_counter() - started
        result = timed_generate(model, device, prompts, args.max_new_tokens, ignore_eos=args.ignore_eos,
                                max_seq_len=args.max_seq_len, inject_prefill_ms=args.inject_prefill_delay_ms,
                                inject_decode_ms=args.inject_decode_delay_ms)
        if tp.rank == 0:
            _report(args, result, tokenizer, model.config.eos_token_id, setup_s)
    finally:
        dist.destroy_process_group()
    return 0


def cmd_shard(args) -> int:
    shard_checkpoint(args.model_dir, args.out, args.world_size, args.dtype, force=args.force, log=log)
    return 0


def cmd_build_model(args) -> int:
    from .build_models import build_bench, build_embedded
    from .oracle import ORACLE_MODEL_DIR, train_oracle

    if args.which == "oracle":
        out = train_oracle(args.out or ORACLE_MODEL_DIR, epochs=args.epochs, threads=args.threads, log=log)
    elif args.which == "embedded":
        out = build_embedded(args.out) if args.out else build_embedded()
    else:
        out = build_bench(args.out)
    log(f"[build-model] {args.which} model written to {out}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"shard": cmd_shard, "generate": cmd_generate, "bench": cmd_bench, "build-model": cmd_build_model}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, RankFailure, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ValueError, FileNotFoundError)) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
