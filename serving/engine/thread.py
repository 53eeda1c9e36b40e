"""The engine in a thread of the pool replica (`serve.pool.engine: thread`): the batching loop
(`scheduler.Scheduler`) runs on one thread of its own, fed through a queue, so the replica's event
loop keeps accepting requests while torch decodes, and a request that arrives while others decode
joins their forward pass after its prefill, as in the engine process."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

from experts.config import AppConfig, ResourceSpec
from serving.engine.prepare import load_pool, pool_info
from serving.engine.requests import GenerationRequest
from serving.engine.scheduler import Scheduler
from serving.engine.streams import StreamingEngine

log = logging.getLogger(__name__)


class ThreadEngine(StreamingEngine):
    """The pool in this process, decoded by one engine thread."""

    def __init__(self, app: AppConfig, names: Sequence[str], res: ResourceSpec):
        super().__init__()
        self.pool = load_pool(app, names, res)
        max_rows = app.serve.max_batch_size * app.serve.max_concurrent_batches
        self.scheduler = Scheduler(self.pool, max_rows, self.deliver)
        self.info = self._describe()
        self._inbox: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def _describe(self) -> dict[str, Any]:
        return {**pool_info(self.pool), "engine": "thread", "mixtures": True}

    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def _submit(self, batch: int, requests: Sequence[GenerationRequest]) -> None:
        self._inbox.put(("decode", batch, requests))

    def _cancel(self, batch: int) -> None:
        self._inbox.put(("cancel", batch, None))

    def _run(self) -> None:
        """Take what arrived (wait for it when nothing decodes), then step every batch held."""
        try:
            while True:
                wait = not self.scheduler.busy
                while True:
                    try:
                        kind, batch, payload = self._inbox.get(block=wait)
                    except queue.Empty:
                        break
                    wait = False
                    if kind == "stop":
                        self.error = "the engine was closed"
                        self.fail_all(self.error)
                        return
                    if kind == "cancel":
                        self.scheduler.cancel(batch)
                    elif self.scheduler.submit(batch, payload):
                        self.info = self._describe()
                self.scheduler.step()
        except Exception as exc:  # a fault of the loop itself: nothing it holds can be trusted
            log.exception("the engine thread failed")
            self.error = f"the engine thread failed: {exc!r}"
            self.fail_all(self.error)

    def close(self, timeout_s: float = 10.0) -> None:
        self._inbox.put(("stop", -1, None))
        self._thread.join(timeout_s)
