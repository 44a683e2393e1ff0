"""Side B of an A/B comparison: a worker group of another commit's code, driven from this one.

`python -m starcoder_tp.serve --fd-in R --fd-out W`, started by `RemoteGroup` with the other
commit's tree first on sys.path, starts that code's own WorkerGroup and serves generation
requests over two pipes. The messages are JSON (protocol PROTOCOL), not pickles, so the two
sides share no classes: each commit's serve.py maps the protocol onto its own runtime.
Its logs go to stderr; stdout is left alone (a library that prints cannot corrupt the channel).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from ..lifeline import exit_on_hangup

PROTOCOL = 1
START_MARGIN_S = 60.0  # beyond the group's own start timeout: the server's interpreter and imports


def _send(conn: Connection, message: dict) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _serve(conn_in: Connection, conn_out: Connection) -> int:
    import starcoder_tp
    from starcoder_tp.device import Device
    from starcoder_tp.parallel import GroupSpec, RankFailure, WorkerGroup
    from starcoder_tp.suite.faults import BusyWait

    hello = json.loads(conn_in.recv_bytes())
    if hello.get("protocol") != PROTOCOL:
        _send(conn_out, {"status": "error", "kind": "protocol",
                         "message": f"this side speaks protocol {PROTOCOL}, the driver {hello.get('protocol')!r}"})
        return 2
    s = hello["spec"]
    spec = GroupSpec(s["shard_dir"], s["world_size"], Device(s["device"], s["device_id"]), s["threads_per_rank"],
                     timeout_s=s["timeout_s"], request_timeout_s=s["request_timeout_s"],
                     # a driver from before --kernels sends only prepack
                     kernels=s.get("kernels", "auto" if s.get("prepack", True) else "plain"),
                     compile=s["compile"])
    group = WorkerGroup(spec)
    try:
        try:
            group.start()
        except (RankFailure, ValueError, FileNotFoundError, RuntimeError) as err:
            _send(conn_out, {"status": "error", "kind": type(err).__name__, "message": str(err)})
            return 1
        _send(conn_out, {"status": "ready", "protocol": PROTOCOL, "ready_info": group.ready_info,
                         "code": str(Path(starcoder_tp.__file__).resolve().parent)})
        while True:
            message = json.loads(conn_in.recv_bytes())
            if message["command"] == "stop":
                return 0
            request = message["kwargs"]
            try:
                faults = BusyWait(request.get("inject_prefill_ms", 0.0), request.get("inject_decode_ms", 0.0))
                result, memory = group.generate(
                    request["prompts"], request["max_new_tokens"], ignore_eos=request.get("ignore_eos", True),
                    max_seq_len=request.get("max_seq_len"), hooks=(faults,) if faults else ())
            except ValueError as err:  # a bad request: refused, and the ranks keep serving
                _send(conn_out, {"status": "error", "kind": "ValueError", "message": str(err)})
                continue
            except RankFailure as err:  # the group is torn down already; the driver starts a new server
                _send(conn_out, {"status": "error", "kind": "RankFailure", "message": str(err)})
                return 1
            _send(conn_out, {"status": "ok", "peak_memory_bytes": memory, "result": {
                "output_ids": result.output_ids.tolist(), "first_token_ms": result.first_token_ms,
                "decode_ms": result.decode_ms, "timed_ms": result.timed_ms, "kernels": result.kernels,
                "setup_s": result.setup_s}})
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        # Ctrl-C reached the whole process group, or the driver went away while the lifeline had not
        # yet ended this process (it usually has: then its ranks follow by their own lifelines).
        return 0
    finally:
        group.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m starcoder_tp.serve", description=__doc__)
    parser.add_argument("--fd-in", type=int, required=True)
    parser.add_argument("--fd-out", type=int, required=True)
    args = parser.parse_args(argv)
    exit_on_hangup(args.fd_in, "starcoder_tp.serve (side B)")  # a driver killed mid-request: stop its ranks now
    return _serve(Connection(args.fd_in, writable=False), Connection(args.fd_out, readable=False))


# The request fields of this protocol version; either side maps them onto its own runtime.
REQUEST_FIELDS = ("prompts", "max_new_tokens", "ignore_eos", "max_seq_len", "inject_prefill_ms", "inject_decode_ms")


def _write_framed(fd: int, data: bytes, deadline: float, alive) -> None:
    """Connection.send_bytes' framing (a 4-byte length, then the bytes), written without blocking
    past `deadline`: a stopped reader with a full pipe must not hang the driver."""
    buffer = memoryview(struct.pack("!i", len(data)) + data)
    while buffer:
        _, writable, _ = select.select([], [fd], [], 1.0)
        if writable:
            try:
                buffer = buffer[os.write(fd, buffer):]
            except BlockingIOError:
                pass
        elif time.monotonic() > deadline or not alive():
            raise TimeoutError


class RemoteGroup:
    """WorkerGroup's interface (start, generate, close, ready_info) over a serve.py process
    running the code at `code_dir`. Every wait has a deadline and checks that the server lives,
    and a side whose server and ranks use no CPU for the stall timeout counts as hung;
    failures are RankFailure naming side B."""

    def __init__(self, code_dir: Path, spec, label: str, log_path: Path):
        self.code_dir, self.spec, self.label, self.log_path = Path(code_dir), spec, label, Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.ready_info: list[dict] = []
        self._ranks: list = []

    def start(self) -> "RemoteGroup":
        from ..group_spec import DEFAULT_START_TIMEOUT_S

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # The other commit's package must shadow this one (an editable install, PYTHONPATH).
        env["PYTHONPATH"] = os.pathsep.join([str(self.code_dir), *filter(None, [env.get("PYTHONPATH")])])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "starcoder_tp.serve", "--fd-in", str(to_child_r), "--fd-out",
                     str(from_child_w)], cwd=self.code_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(to_child_r, from_child_w))
        finally:
            os.close(to_child_r), os.close(from_child_w)
        os.set_blocking(to_child_w, False)
        self._out_fd, self._in = to_child_w, Connection(from_child_r, writable=False)
        s = self.spec
        try:
            self._send({"protocol": PROTOCOL, "spec": {
                "shard_dir": str(Path(s.shard_dir).resolve()), "world_size": s.world_size, "device": s.device.kind,
                "device_id": s.device.device_id, "threads_per_rank": s.threads_per_rank, "timeout_s": s.timeout_s,
                "request_timeout_s": s.request_timeout_s, "kernels": s.kernels, "compile": s.compile,
                # for side B code from before --kernels, which reads only this
                "prepack": s.kernels != "plain"}}, "start")
            reply = self._receive("start", DEFAULT_START_TIMEOUT_S + START_MARGIN_S)
        except ValueError:
            self.close(graceful=False)
            raise
        if reply.get("protocol") != PROTOCOL or Path(reply["code"]) != (self.code_dir / "starcoder_tp").resolve():
            self.close(graceful=False)
            raise RuntimeError(f"side B ({self.label}) answered with protocol {reply.get('protocol')!r} from the code "
                               f"in {reply.get('code')}, expected protocol {PROTOCOL} from {self.code_dir}: something "
                               "on sys.path shadows it")
        self.ready_info = reply["ready_info"]
        import psutil

        # Kept for close(): a server that dies leaves its ranks re-parented, out of its child list.
        for info in self.ready_info:
            with contextlib.suppress(psutil.NoSuchProcess):
                self._ranks.append(psutil.Process(info["pid"]))
        return self

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, ignore_eos: bool = True,
                 max_seq_len: int | None = None, hooks: tuple = ()):
        """WorkerGroup.generate over the protocol; of the hooks, it carries the injected faults."""
        import torch

        from ..group_spec import COMPILE_ALLOWANCE_S
        from ..timing import GenerationResult
        from .faults import BusyWait

        request = {"prompts": prompts, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos,
                   "max_seq_len": max_seq_len}
        for hook in hooks:
            if not isinstance(hook, BusyWait):
                raise ValueError(f"side B ({self.label}): the A/B protocol carries no {type(hook).__name__} hook")
            if hook.prefill_fraction or hook.decode_fraction:
                raise ValueError(f"side B ({self.label}): the A/B protocol carries fixed delays only, not a slowdown "
                                 f"fraction (prefill {hook.prefill_fraction}, decode {hook.decode_fraction})")
            request.update(inject_prefill_ms=hook.prefill_ms, inject_decode_ms=hook.decode_ms)
        assert set(request) <= set(REQUEST_FIELDS), request
        self._send({"command": "generate", "kwargs": request}, "generate")
        # The server's own group has the request timeout and the stall watch of its ranks; this
        # deadline only covers a server that stops answering altogether.
        allowance = self.spec.request_timeout_s + START_MARGIN_S + (COMPILE_ALLOWANCE_S if self.spec.compile else 0)
        reply = self._receive("generate", allowance)
        r = reply["result"]
        decode_ms = r["decode_ms"]
        result = GenerationResult(torch.tensor(r["output_ids"], dtype=torch.long), r["first_token_ms"], decode_ms,
                                  # 3624e8b, the first commit with serve.py, did not send it yet
                                  timed_ms=r.get("timed_ms", r["first_token_ms"] + sum(decode_ms)),
                                  kernels=r.get("kernels", ""),  # nor this, before --kernels
                                  setup_s=r.get("setup_s", {}))  # nor this, before setup_phases.py
        return result, reply["peak_memory_bytes"]

    def _stall_timeout_s(self) -> float:
        from ..group_spec import COMPILE_ALLOWANCE_S

        return self.spec.timeout_s * 1.5 + (COMPILE_ALLOWANCE_S if self.spec.compile else 0.0)

    def _cpu_seconds(self) -> float:
        """CPU time used so far by the server and its ranks: it moves while side B works."""
        import psutil

        total = 0.0
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += self._ranks or procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return total
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def _send(self, message: dict, what: str) -> None:
        try:
            _write_framed(self._out_fd, json.dumps(message).encode(), time.monotonic() + self._stall_timeout_s(),
                          lambda: self.proc.poll() is None)
        except (BrokenPipeError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)  # reaped, so that its exit code says how it ended
            self._fail(f"its server {self._exit()} before it could take '{what}'")
        except TimeoutError:
            self._fail(f"its server took no '{what}' for {self._stall_timeout_s():.0f}s (hung or stopped?)")

    def _receive(self, what: str, timeout_s: float) -> dict:
        from ..parallel import RankFailure

        deadline = time.monotonic() + timeout_s
        cpu, moved_at = self._cpu_seconds(), time.monotonic()
        while not self._in.poll(1.0):
            now = time.monotonic()
            if self.proc.poll() is not None and not self._in.poll(0):
                self._fail(f"its server {self._exit()} during '{what}'")
            if now > deadline:
                self._fail(f"its server did not answer '{what}' within {timeout_s:.0f}s")
            if what != "start":  # loading may wait on the disk; the start deadline covers it
                used = self._cpu_seconds()
                if used != cpu:
                    cpu, moved_at = used, now
                elif now - moved_at > self._stall_timeout_s():
                    self._fail(f"its server and ranks made no progress (no CPU time) for "
                               f"{self._stall_timeout_s():.0f}s during '{what}' (hung or stopped?)")
        try:
            reply = json.loads(self._in.recv_bytes())
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self._fail(f"its server {self._exit()} during '{what}'")
        if reply["status"] == "error":
            if reply["kind"] == "ValueError":
                raise ValueError(f"side B ({self.label}): {reply['message']}")
            self.close(graceful=False)
            raise RankFailure(f"side B ({self.label}): {reply['message']}")
        return reply

    def _exit(self) -> str:
        code = self.proc.poll()
        return "is still running" if code is None else f"exited with code {code}"

    def _fail(self, what: str) -> None:
        from ..parallel import RankFailure

        self.close(graceful=False)
        tail = ""
        if self.log_path.is_file():
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        raise RankFailure(f"side B ({self.label}): {what}; the end of its log {self.log_path}:\n{tail}")

    def close(self, graceful: bool = True, timeout_s: float = 20.0) -> None:
        """Stop the server (which stops its ranks); killed when it does not stop in time, and so
        is any of its ranks still there after it. Safe to call twice."""
        if self.proc is None:
            return
        import psutil

        ranks = list(self._ranks)
        with contextlib.suppress(psutil.NoSuchProcess):
            known = {p.pid for p in ranks}
            ranks += [p for p in psutil.Process(self.proc.pid).children(recursive=True) if p.pid not in known]
        if graceful and self.proc.poll() is None:
            with contextlib.suppress(OSError, TimeoutError):
                _write_framed(self._out_fd, json.dumps({"command": "stop"}).encode(), time.monotonic() + 5,
                              lambda: self.proc.poll() is None)
        try:
            self.proc.wait(timeout_s if graceful else 0.5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        _, alive = psutil.wait_procs(ranks, timeout=10 if graceful else 0.5)
        for rank in alive:  # a server that was killed (or did not stop them) left them behind
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
        psutil.wait_procs(alive, timeout=10)
        os.close(self._out_fd)
        self._in.close()
        self.proc = None


if __name__ == "__main__":
    sys.exit(main())
