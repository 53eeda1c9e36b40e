"""The expert pool deployment: one Ray Serve replica holding one engine (`serving.engine.Engine`).

The base model once and the adapters of `names`; mixed-expert batches, streamed per step. What
decodes is the engine's business (`serve.pool.engine`, `serving.engine.make_engine`); the replica
batches requests, paces their deltas into messages, and reports the engine's health and info.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from experts.config import AppConfig, ResourceSpec
from serving.engine import Delta, GenerationRequest, make_engine, paced

log = logging.getLogger(__name__)


@serve.deployment
class ExpertPoolDeployment:
    """The base model once and the adapters of `names`, decoded by the engine `res.engine` names."""

    def __init__(self, app: AppConfig, names: list[str], res: ResourceSpec):
        self.engine = make_engine(app, names, res)
        self.stream_interval_s = app.serve.stream_interval_s
        # Ray Serve's batcher runs one batch at a time unless told otherwise (a request arriving
        # mid-batch would wait for all of it); the engine interleaves the steps of those it holds.
        self._decode_batch: Any = serve.batch(
            max_batch_size=app.serve.max_batch_size,
            batch_wait_timeout_s=app.serve.batch_wait_timeout_s,
            max_concurrent_batches=app.serve.max_concurrent_batches,
        )(self._decode)  # type: ignore[arg-type]  # Ray types a batch handler as returning a list
        info = self.info()
        log.info(
            "expert pool ready (%s engine): %s on %s (%s, base weights %s)",
            info["engine"],
            info["experts"],
            info["device"],
            info["dtype"],
            info["base_weights"],
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream one request's deltas (call with `handle.options(stream=True)`): the first token's
        at once (a refusal surfaces before any byte), then, for `request.stream`, what the decoder
        made since the last one at most every `serve.stream_interval_s` (0: one per token), or
        else the rest in one. Each message through Ray, the ingress and the proxy costs CPU time
        the decoder shares."""
        # A plain async generator in front of the batched one: Ray Serve 2.60 treats the
        # `@serve.batch` wrapper of a generator as a sync method and refuses to stream it.
        interval = self.stream_interval_s if request.stream else math.inf
        async for message in paced(self._decode_batch(request), interval):
            yield message

    async def _decode(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        """What `self._decode_batch` runs for each batch of requests: decode them; each step
        yields one Delta per request (StopIteration once it ended). A request that fails (its
        adapter does not load, its input is refused) gets a Delta with its error; the others
        decode on."""
        async for step in self.engine.decode(requests):
            yield [StopIteration if d is None else d for d in step]

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine stopped."""
        if not self.engine.alive():
            raise RuntimeError(self.engine.error or "the engine stopped")

    def info(self) -> dict[str, Any]:
        return dict(self.engine.info)

    def __del__(self) -> None:  # Ray Serve calls this when it stops the replica
        if getattr(self, "engine", None) is not None:
            self.engine.close()
