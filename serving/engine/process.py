"""The expert pool's engine in a process of its own, torch on that process's initial thread.

Why: a Ray Serve replica runs user code off its process's initial thread, and libgomp (torch's
OpenMP) counts the initial thread among the threads it manages; once they outnumber the CPUs it
throttles every team's spinning, so each of the ~120 parallel GEMVs of a batch-1 decode step pays a
futex wake-up. On 2 CPUs, 2 torch threads in a replica decode slower than 1
(benchmarks/openmp_threads_bench.py). In a child process whose initial thread runs torch, the team
is the only one and spins as it should (vLLM runs its engine in a separate process too).

`EngineProcess` (in the replica) starts `python -m serving.engine.process FD` over a private socket pair,
sends it the config, and waits until the pool is loaded. `decode(requests)` sends one batch and
yields its steps as the child produces them; the child merges a batch that arrives while others
decode into them after its prefill (one forward pass a step for all: iteration-level batching),
steps what it cannot merge in turn, and loads adapters the requests name that it lacks. Messages are
JSON over a socket pair nobody else holds (no pickle): the config as its dataclass fields, requests
and deltas field by field, an error as its type, message and fields, rebuilt from a fixed table of
this project's and Python's exception types. The child exits when the replica closes the socket or
dies (its next read sees the end of the stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from experts.config import AppConfig, ResourceSpec, build
from experts.errors import ArtifactError, ConfigError, DataError, MoeError, UnknownExpertError
from serving.api import OverloadedError, RequestError, UnavailableError
from serving.engine.protocol import EngineError
from serving.engine.requests import Delta, GenerationRequest
from serving.engine.streams import StreamingEngine

log = logging.getLogger(__name__)

GONE = (OSError, EOFError, ValueError)  # talking to a process that may have exited
READY_TIMEOUT_S = 900.0  # loading the base model and every adapter (a cold disk, a big model)


# Exceptions a delta or a failed batch may carry, rebuilt by name on the replica's side; any
# other type arrives as a RuntimeError naming it (a 500, as it would have been).
_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        MoeError,
        ConfigError,
        DataError,
        ArtifactError,
        UnavailableError,
        OverloadedError,
        EngineError,
        FloatingPointError,
        ValueError,
        RuntimeError,
    )
}


def encode_error(exc: Exception) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, RequestError):
        fields.update(param=exc.param, code=exc.code)
    if isinstance(exc, UnknownExpertError):
        fields.update(name=exc.name, available=exc.available)
    return fields


def decode_error(fields: dict[str, Any]) -> Exception:
    kind, message = fields["type"], fields["message"]
    if kind == "RequestError":
        return RequestError(message, param=fields.get("param"), code=fields.get("code"))
    if kind == "UnknownExpertError":
        return UnknownExpertError(fields["name"], fields["available"])
    cls = _ERRORS.get(kind)
    return cls(message) if cls is not None else RuntimeError(f"{kind}: {message}")


def encode_delta(delta: Delta | None) -> dict[str, Any] | None:
    if delta is None:
        return None
    error = None if delta.error is None else encode_error(delta.error)
    return {  # field by field, not dataclasses.asdict: this runs for every row of every step
        "text": delta.text,
        "completion_tokens": delta.completion_tokens,
        "finish_reason": delta.finish_reason,
        "error": error,
    }


def decode_delta(fields: dict[str, Any] | None) -> Delta | None:
    if fields is None:
        return None
    error = None if fields["error"] is None else decode_error(fields["error"])
    return Delta(fields["text"], fields["completion_tokens"], fields["finish_reason"], error)


def encode_request(request: GenerationRequest) -> dict[str, Any]:
    return dataclasses.asdict(request)


def decode_request(fields: dict[str, Any]) -> GenerationRequest:
    return build(GenerationRequest, fields)  # typed and checked, as the config is


def _send(conn: Connection, *message: Any) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _recv(conn: Connection) -> list[Any]:
    return json.loads(conn.recv_bytes())


# --------------------------------------------------------------------------------------------
# The replica's side
# --------------------------------------------------------------------------------------------
class EngineProcess(StreamingEngine):
    """A running engine process: `decode` batches on it, `info` about its pool, `close` it."""

    def __init__(self, app: AppConfig, names: Sequence[str], res: ResourceSpec):
        super().__init__()
        parent, child = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])  # this project, wherever the replica's cwd is
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(res.torch_threads), "PYTHONPATH": path}
        self.proc = subprocess.Popen(
            [*self._command(res), str(child.fileno())], pass_fds=(child.fileno(),), env=env
        )
        child.close()
        self.conn = Connection(parent.detach())
        self._send_lock = threading.Lock()
        self._closing = False
        self._send(*self._init_message(app, names, res))
        kind, payload = self._wait_ready()
        if kind != "ready":
            self.close()
            raise EngineError(f"the engine process could not load the expert pool: {payload}")
        self.info: dict[str, Any] = self._describe(payload)
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _describe(self, pool: dict[str, Any]) -> dict[str, Any]:
        return {"engine": "process", "mixtures": True, **pool, "engine_pid": self.proc.pid}

    def _command(self, res: ResourceSpec) -> list[str]:
        """The engine process's command line, before its socket's fd (the vllm engine: another venv)."""
        return [sys.executable, "-m", "serving.engine.process"]

    def _init_message(self, app: AppConfig, names: Sequence[str], res: ResourceSpec) -> tuple[Any, ...]:
        return ("init", dataclasses.asdict(app), list(names), dataclasses.asdict(res))

    def _wait_ready(self) -> tuple[str, Any]:
        waited = 0.0
        while not self.conn.poll(1.0):
            waited += 1.0
            if self.proc.poll() is not None:
                return "failed", f"it exited with code {self.proc.returncode} while loading"
            if waited > READY_TIMEOUT_S:
                return "failed", f"not ready after {READY_TIMEOUT_S:.0f} s"
        try:
            kind, payload = _recv(self.conn)
            return kind, payload
        except (EOFError, OSError) as exc:
            return "failed", f"it closed the connection while loading ({exc})"

    def _send(self, *message: Any) -> None:
        with self._send_lock:
            _send(self.conn, *message)

    def alive(self) -> bool:
        return self.error is None and self.proc.poll() is None

    def _submit(self, batch: int, requests: Sequence[GenerationRequest]) -> None:
        try:
            self._send("decode", batch, [encode_request(r) for r in requests])
        except GONE as exc:
            raise EngineError(f"the engine process went away ({exc})") from exc

    def _cancel(self, batch: int) -> None:
        with contextlib.suppress(*GONE):
            self._send("cancel", batch, None)

    def _read(self) -> None:
        """Hand each message of the child to the batch it belongs to (runs in a thread)."""
        try:
            while True:
                kind, *rest = _recv(self.conn)
                if kind == "info":
                    self.info = self._describe(rest[0])
                    continue
                batch, payload = rest
                if kind == "step":
                    payload = [decode_delta(d) for d in payload]
                elif kind == "error":
                    payload = decode_error(payload)
                self.deliver(kind, batch, payload)
        except (EOFError, OSError):
            try:
                self.error = f"the engine process exited (code {self.proc.wait(5.0)})"
            except subprocess.TimeoutExpired:
                self.error = "the engine process closed its connection"
        except Exception as exc:  # a message that cannot be read: nothing more can be trusted
            self.error = f"unreadable message from the engine process: {exc!r}"
        (log.info if self._closing else log.error)("expert pool engine stopped: %s", self.error)
        self.fail_all(self.error)

    def close(self, timeout_s: float = 10.0) -> None:
        self._closing = True
        with contextlib.suppress(*GONE):
            self._send("stop", None, None)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(*GONE):
            self.conn.close()


# --------------------------------------------------------------------------------------------
# The engine process
# --------------------------------------------------------------------------------------------
def serve_forever(conn: Connection) -> None:
    """The engine loop: read batches, step every held batch (`scheduler.Scheduler`: a batch that
    arrives while others decode is merged into them after its prefill), send every step back."""
    from serving.engine.prepare import load_pool, pool_info
    from serving.engine.scheduler import Scheduler

    kind, fields, names, resources = _recv(conn)
    assert kind == "init", kind
    try:
        app = build(AppConfig, fields)
        pool = load_pool(app, names, build(ResourceSpec, resources))
    except Exception as exc:  # reported to the replica, which fails to start with it
        log.exception("could not load the expert pool")
        _send(conn, "failed", f"{type(exc).__name__}: {exc}")
        return
    scheduler = Scheduler(pool, app.serve.max_batch_size * app.serve.max_concurrent_batches, emitter(conn))
    _send(conn, "ready", pool_info(pool))
    while True:
        while conn.poll(0 if scheduler.busy else None):
            kind, batch, payload = _recv(conn)
            if kind == "stop":
                return
            if kind == "cancel":
                scheduler.cancel(batch)
            elif scheduler.submit(batch, [decode_request(r) for r in payload]):
                _send(conn, "info", pool_info(pool))
        scheduler.step()


def emitter(conn: Connection) -> Callable[[str, int, Any], None]:
    """The scheduler's events as messages to the replica: deltas and errors encoded."""

    def emit(kind: str, batch: int, payload: Any) -> None:
        if kind == "step":
            payload = [encode_delta(d) for d in payload]
        elif kind == "error":
            payload = encode_error(payload)
        _send(conn, kind, batch, payload)

    return emit


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):  # the replica went away
        serve_forever(conn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
