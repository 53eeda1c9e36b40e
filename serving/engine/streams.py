"""The replica's side of an engine that decodes on another thread or process: each batch in
flight is an asyncio queue that its `decode` reads and the engine's side feeds (thread-safe)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from serving.engine.protocol import EngineError
from serving.engine.requests import Delta, GenerationRequest


class StreamingEngine:
    """What the process and thread engines share: `decode` streams the events the engine's side
    hands to `deliver` ("step", "done", "error"); `_submit` and `_cancel` reach that side."""

    info: dict[str, Any]

    def __init__(self) -> None:
        self.error: str | None = None
        self._ids = itertools.count()
        self._batches: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._lock = threading.Lock()

    def alive(self) -> bool:
        raise NotImplementedError

    def _submit(self, batch: int, requests: Sequence[GenerationRequest]) -> None:
        raise NotImplementedError

    def _cancel(self, batch: int) -> None:
        raise NotImplementedError

    def deliver(self, kind: str, batch: int, payload: Any) -> None:
        """Hand an event of the engine's side to the batch it belongs to (from any thread)."""
        with self._lock:
            target = self._batches.get(batch)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    def fail_all(self, error: str) -> None:
        """The engine stopped: every batch in flight fails with `error`."""
        with self._lock:
            pending = list(self._batches.values())
        for loop, queue in pending:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", EngineError(error)))

    async def decode(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[list[Delta | None]]:
        """One list of Delta-or-None per step of this batch, adapters loaded first."""
        if not self.alive():
            raise EngineError(self.error or "the engine stopped")
        batch = next(self._ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with self._lock:
            self._batches[batch] = (asyncio.get_running_loop(), queue)
        try:
            self._submit(batch, requests)
            while True:
                kind, payload = await queue.get()
                if kind == "step":
                    yield payload
                elif kind == "done":
                    return
                else:  # "error": the batch failed as a whole (its forward pass, the engine)
                    raise payload
        finally:
            with self._lock:
                self._batches.pop(batch, None)
            if self.alive():
                self._cancel(batch)  # a no-op for a batch that ended
