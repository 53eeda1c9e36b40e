"""The engine protocol: what the expert pool deployment drives, whatever decodes.

`ExpertPoolDeployment` holds one `Engine` and nothing engine-specific; `make_engine` picks the
implementation by `ResourceSpec.engine`: "process" (`process.EngineProcess`: a child process
decodes, torch on its initial thread) or "thread" (`thread.ThreadEngine`: a thread of the replica
decodes). Both run the same batching loop (`scheduler.Scheduler`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from experts.config import AppConfig, ResourceSpec
from serving.api import UnavailableError
from serving.engine.requests import Delta, GenerationRequest


class EngineError(UnavailableError):
    """The engine failed or went away; the requests it held fail with this (HTTP 503: the
    replica's health check fails with it too, and Ray Serve starts a new one)."""


class Engine(Protocol):
    """One pool replica's decoder of `GenerationRequest` batches."""

    # At least: engine, experts, device, dtype, base_weights, mixtures (bool: can mix adapters)
    info: dict[str, Any]
    error: str | None  # why it stopped, once alive() is False

    def alive(self) -> bool: ...

    def decode(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[list[Delta | None]]:
        """One list per step, one entry per request (None once it ended); a failed request gets a
        Delta with finish_reason "error" and its error, the others go on. Adapters named in
        request.adapters at a version the engine lacks are loaded first (this is how hot add /
        retrain reaches every replica); an expert that is no longer named anywhere may be unloaded."""
        ...

    def close(self) -> None: ...


def make_engine(app: AppConfig, names: Sequence[str], res: ResourceSpec) -> Engine:
    """The engine `res.engine` names, serving the adapters of `names` (loaded when this returns)."""
    if res.engine == "process":
        from serving.engine.process import EngineProcess

        return EngineProcess(app, names, res)
    if res.engine == "thread":
        from serving.engine.thread import ThreadEngine

        return ThreadEngine(app, names, res)
    if res.engine == "vllm":
        from serving.engine.vllm import VllmEngine

        return VllmEngine(app, names, res)
    raise ValueError(f"unknown engine {res.engine!r}; available: ['process', 'thread', 'vllm']")
