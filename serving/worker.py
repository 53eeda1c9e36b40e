"""The expert pool's engine in a process of its own, torch on that process's initial thread.

Why: a Ray Serve replica runs user code off its process's initial thread, and libgomp (torch's
OpenMP) counts the initial thread among the threads it manages; once they outnumber the CPUs it
throttles every team's spinning, so each of the ~120 parallel GEMVs of a batch-1 decode step pays a
futex wake-up. On 2 CPUs, 2 torch threads in a replica decode slower than 1
(benchmarks/openmp_threads_bench.py). In a child process whose initial thread runs torch, the team
is the only one and spins as it should (vLLM runs its engine in a separate process too).

`EngineProcess` (in the replica) starts `python -m serving.worker FD` over a private socket pair,
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

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from experts.errors import ArtifactError, ConfigError, DataError, MoeError, UnknownExpertError
from experts.schema import AppConfig, ResourceSpec, build
from serving.api import OverloadedError, RequestError, UnavailableError
from serving.engine import Delta, GenerationRequest

log = logging.getLogger(__name__)

GONE = (OSError, EOFError, ValueError)  # talking to a process that may have exited
READY_TIMEOUT_S = 900.0  # loading the base model and every adapter (a cold disk, a big model)


class EngineError(UnavailableError):
    """The engine process failed or went away; the requests it held fail with this (HTTP 503:
    the replica's health check fails with it too, and Ray Serve starts a new one)."""


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
class EngineProcess:
    """A running engine process: `decode` batches on it, `info` about its pool, `close` it."""

    def __init__(self, app: AppConfig, names: Sequence[str], res: ResourceSpec):
        parent, child = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])  # this project, wherever the replica's cwd is
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(res.torch_threads), "PYTHONPATH": path}
        self.proc = subprocess.Popen(
            [*self._command(res), str(child.fileno())], pass_fds=(child.fileno(),), env=env
        )
        child.close()
        self.conn = Connection(parent.detach())
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._batches: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._lock = threading.Lock()
        self.error: str | None = None
        self._closing = False
        self._send(*self._init_message(app, names, res))
        kind, payload = self._wait_ready()
        if kind != "ready":
            self.close()
            raise EngineError(f"the engine process could not load the expert pool: {payload}")
        self.info: dict[str, Any] = payload
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _command(self, res: ResourceSpec) -> list[str]:
        """The engine process's command line, before its socket's fd (the vllm engine: another venv)."""
        return [sys.executable, "-m", "serving.worker"]

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

    def _read(self) -> None:
        """Hand each message of the child to the batch it belongs to (runs in a thread)."""
        try:
            while True:
                kind, *rest = _recv(self.conn)
                if kind == "info":
                    self.info = rest[0]
                    continue
                batch, payload = rest
                if kind == "step":
                    payload = [decode_delta(d) for d in payload]
                elif kind == "error":
                    payload = decode_error(payload)
                with self._lock:
                    target = self._batches.get(batch)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        except (EOFError, OSError):
            try:
                self.error = f"the engine process exited (code {self.proc.wait(5.0)})"
            except subprocess.TimeoutExpired:
                self.error = "the engine process closed its connection"
        except Exception as exc:  # a message that cannot be read: nothing more can be trusted
            self.error = f"unreadable message from the engine process: {exc!r}"
        (log.info if self._closing else log.error)("expert pool engine stopped: %s", self.error)
        with self._lock:
            pending = list(self._batches.values())
        for loop, queue in pending:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", EngineError(self.error)))

    async def decode(self, requests: Sequence[Any]) -> AsyncIterator[list[Any]]:
        """`serving.engine.decode` on the engine process, adapters loaded first: one list of
        Delta-or-None per step."""
        if not self.alive():
            raise EngineError(self.error or f"the engine process exited (code {self.proc.returncode})")
        batch = next(self._ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with self._lock:
            self._batches[batch] = (asyncio.get_running_loop(), queue)
        try:
            try:
                self._send("decode", batch, [encode_request(r) for r in requests])
            except GONE as exc:
                raise EngineError(f"the engine process went away ({exc})") from exc
            while True:
                kind, payload = await queue.get()
                if kind == "step":
                    yield payload
                elif kind == "done":
                    return
                else:  # "error": the batch failed as a whole (its forward pass, the process)
                    raise payload
        finally:
            with self._lock:
                self._batches.pop(batch, None)
            if self.alive():
                with contextlib.suppress(*GONE):
                    self._send("cancel", batch, None)  # a no-op for a batch that ended

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
def pool_info(pool: Any) -> dict[str, Any]:
    from serving.packed import layout

    return {
        "experts": list(pool.adapters),
        "failed": dict(pool.failed),
        "device": pool.device,
        "dtype": str(pool.dtype).removeprefix("torch."),
        "base_weights": layout(pool.model),
    }


def load_pool(app: Any, names: Sequence[str], res: ResourceSpec) -> Any:
    """The serving pool: threads set, base weights in the compute dtype and `res.base_weights`."""
    import torch

    from experts.adapters import ExpertPool
    from serving.engine import serving_weights

    torch.set_num_threads(res.torch_threads)  # replicas share cores; oversubscribed threads fight
    pool = ExpertPool.load(app, list(names), strict=False)
    serving_weights(pool, res.base_weights)  # adapters loaded later wrap these same base weights
    return pool


@dataclasses.dataclass
class _Held:
    """A decoding the engine steps, and the batches whose requests it holds: (batch id, its first
    request in the decoding, how many) in request order; a batch leaves once all of its ended."""

    decoding: Any  # serving.engine.Decoding
    batches: list[tuple[int, int, int]]


def _step(conn: Connection, held: _Held) -> bool:
    """One step of a held decoding, sent to its batches; False once it has ended."""
    try:
        step = held.decoding.step()
    except Exception as exc:  # a shared forward pass failed: its batches fail as a whole
        log.exception("batches %s failed", [b for b, _, _ in held.batches])
        for batch, _, _ in held.batches:
            _send(conn, "error", batch, encode_error(exc))
        return False
    if step is None:
        for batch, _, _ in held.batches:
            _send(conn, "done", batch, None)
        return False
    active = set(held.decoding.active)
    for batch, first, count in list(held.batches):
        _send(conn, "step", batch, [encode_delta(d) for d in step[first : first + count]])
        if active.isdisjoint(range(first, first + count)):  # every request of this batch ended
            _send(conn, "done", batch, None)
            held.batches.remove((batch, first, count))
    return bool(held.batches)


def _merge(held: list[_Held], max_rows: int) -> None:
    """Merge each decoding that has started into the first earlier one that can take it (the lean
    decoder, the same adapter stack, at most max_rows rows together): one forward pass a step
    for all of them instead of one each (iteration-level batching)."""
    for i, target in enumerate(held):
        for other in held[i + 1 :]:
            if not (target.batches and other.batches) or other.decoding.batch is None:
                continue
            if target.decoding.rows + other.decoding.rows > max_rows:
                continue
            offset = len(target.decoding.requests)
            if target.decoding.absorb(other.decoding):
                target.batches += [(b, first + offset, n) for b, first, n in other.batches]
                other.batches = []
    held[:] = [h for h in held if h.batches]


def _cancel(held: list[_Held], batch: int) -> None:
    """A batch's client went away: its requests stop; the others in its decoding go on."""
    for h in held:
        entry = next((e for e in h.batches if e[0] == batch), None)
        if entry is not None:
            h.batches.remove(entry)
            h.decoding.drop(range(entry[1], entry[1] + entry[2]))
    held[:] = [h for h in held if h.batches]


def serve_forever(conn: Connection) -> None:
    """The engine loop: read batches, step every held decoding in turn, send every step back. A
    batch that arrives while others decode is merged into them after its prefill (`_merge`)."""
    from serving.engine import Decoding, load_adapters, loaded_versions

    kind, fields, names, resources = _recv(conn)
    assert kind == "init", kind
    try:
        app = build(AppConfig, fields)
        pool = load_pool(app, names, build(ResourceSpec, resources))
    except Exception as exc:  # reported to the replica, which fails to start with it
        log.exception("could not load the expert pool")
        _send(conn, "failed", f"{type(exc).__name__}: {exc}")
        return
    max_rows = app.serve.max_batch_size * app.serve.max_concurrent_batches
    versions = loaded_versions(pool)
    _send(conn, "ready", pool_info(pool))
    held: list[_Held] = []
    while True:
        while conn.poll(0 if held else None):
            kind, batch, payload = _recv(conn)
            if kind == "stop":
                return
            if kind == "cancel":
                _cancel(held, batch)
                continue
            requests = [decode_request(r) for r in payload]
            known = len(pool.adapters), len(pool.failed)
            try:
                decoding = Decoding(pool, requests, load_adapters(pool, requests, versions))
            except Exception as exc:  # this batch only
                log.exception("batch %d failed", batch)
                _send(conn, "error", batch, encode_error(exc))
            else:
                held.append(_Held(decoding, [(batch, 0, len(requests))]))
            if (len(pool.adapters), len(pool.failed)) != known:
                _send(conn, "info", pool_info(pool))
        held[:] = [h for h in held if _step(conn, h)]
        _merge(held, max_rows)


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):  # the replica went away
        serve_forever(conn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
