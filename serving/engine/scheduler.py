"""The engine's one batching loop, shared by its modes (the engine process and the replica's thread).

Batches arrive (`submit`), each becomes a `Decoding` after the adapters it names are loaded; every
`step` runs one step of each decoding held and then merges each one that has started into the first
earlier one that can take it (the lean decoder, the same adapter stack, at most `max_rows` rows
together): from then on one forward pass a step serves both (iteration-level batching, as vLLM's
scheduler does). What each step gave goes to `emit(kind, batch, payload)`:
"step" with the batch's Delta-or-None per request, "done" once all of its requests ended, "error"
with the exception that failed the batch as a whole (its shared forward pass, its setup). How the
events travel (a socket, an event loop's queue) is the mode's business, not the loop's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from experts.adapters import ExpertPool
from serving.engine.batch import Decoding, load_adapters, loaded_versions
from serving.engine.requests import GenerationRequest

log = logging.getLogger(__name__)

Emit = Callable[[str, int, Any], None]  # (kind, batch id, payload)


@dataclass
class _Held:
    """A decoding the loop steps, and the batches whose requests it holds: (batch id, its first
    request in the decoding, how many) in request order; a batch leaves once all of its ended."""

    decoding: Decoding
    batches: list[tuple[int, int, int]]


class Scheduler:
    """Iteration-level batching over one pool: `submit` batches, `cancel` them, `step` them all."""

    def __init__(self, pool: ExpertPool, max_rows: int, emit: Emit):
        self.pool, self.max_rows, self.emit = pool, max_rows, emit
        self.versions = loaded_versions(pool)  # expert -> adapter version loaded (`load_adapters`)
        self.held: list[_Held] = []
        self.merges = 0  # decodings taken into another

    @property
    def busy(self) -> bool:
        return bool(self.held)

    def submit(self, batch: int, requests: Sequence[GenerationRequest]) -> bool:
        """Hold a new batch, its adapters loaded first; True when the pool's experts changed."""
        known = len(self.pool.adapters), len(self.pool.failed)
        try:
            decoding = Decoding(self.pool, requests, load_adapters(self.pool, requests, self.versions))
        except Exception as exc:  # this batch only
            log.exception("batch %d failed", batch)
            self.emit("error", batch, exc)
        else:
            self.held.append(_Held(decoding, [(batch, 0, len(requests))]))
        return (len(self.pool.adapters), len(self.pool.failed)) != known

    def cancel(self, batch: int) -> None:
        """A batch's client went away: its requests stop; the others in its decoding go on."""
        for h in self.held:
            entry = next((e for e in h.batches if e[0] == batch), None)
            if entry is not None:
                h.batches.remove(entry)
                h.decoding.drop(range(entry[1], entry[1] + entry[2]))
        self.held[:] = [h for h in self.held if h.batches]

    def step(self) -> None:
        """One step of every held decoding, then merge what can be merged."""
        self.held[:] = [h for h in self.held if self._step(h)]
        self._merge()

    def _step(self, held: _Held) -> bool:
        """One step of a held decoding, emitted to its batches; False once it has ended."""
        try:
            step = held.decoding.step()
        except Exception as exc:  # a shared forward pass failed: its batches fail as a whole
            log.exception("batches %s failed", [b for b, _, _ in held.batches])
            for batch, _, _ in held.batches:
                self.emit("error", batch, exc)
            return False
        if step is None:
            for batch, _, _ in held.batches:
                self.emit("done", batch, None)
            return False
        active = set(held.decoding.active)
        for batch, first, count in list(held.batches):
            self.emit("step", batch, step[first : first + count])
            if active.isdisjoint(range(first, first + count)):  # every request of this batch ended
                self.emit("done", batch, None)
                held.batches.remove((batch, first, count))
        return bool(held.batches)

    def _merge(self) -> None:
        """Merge each decoding that has started into the first earlier one that can take it."""
        for i, target in enumerate(self.held):
            for other in self.held[i + 1 :]:
                if not (target.batches and other.batches) or other.decoding.batch is None:
                    continue
                if target.decoding.rows + other.decoding.rows > self.max_rows:
                    continue
                offset = len(target.decoding.requests)
                if target.decoding.absorb(other.decoding):
                    target.batches += [(b, first + offset, n) for b, first, n in other.batches]
                    other.batches = []
                    self.merges += 1
        self.held[:] = [h for h in self.held if h.batches]
