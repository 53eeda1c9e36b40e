"""The query log: every served request, and every human review of one, in a SQL database.

`QueryLog(url_or_path)` opens embedded SQLite by default (a file path, WAL mode) or any
SQLAlchemy URL, e.g. `postgresql://user@host/db` for several serving nodes writing one log.

`record(entry)` never blocks and never raises: the entry goes on a bounded queue that one
background thread drains, committing a small batch at a time (so rows committed before a crash
survive it). When the queue is full, or the database refuses a batch, the entries are counted in
`dropped` and the request goes on. `close()` drains the queue and commits what is left; it is
also registered with `atexit`, so nothing is lost on a clean shutdown.

Reviews (`add_review`) are written synchronously: a reviewer wants to know it landed.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experts.errors import ConfigError, MoeError

log = logging.getLogger(__name__)

VERDICTS = ("accept", "reject", "correct", "misrouted")
DEFAULT_PATH = Path("logs") / "queries.sqlite"  # under the artifacts folder

# SQLAlchemy dialect -> the pip package that gives it a driver (for a clear error when missing).
_DRIVERS = {
    "postgresql": "psycopg2-binary (postgresql://) or psycopg[binary] (postgresql+psycopg://)",
    "mysql": "pymysql (mysql+pymysql://)",
}


@dataclass
class QueryEntry:
    """One served request. The ingress fills what it knows; everything but `prompt` is optional."""

    prompt: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts: float = field(default_factory=time.time)  # unix seconds when the request arrived
    model: str = "auto"  # what the client asked for: auto, base or an expert slug
    expert: str | None = None  # the expert that answered (top-1 for a mixture, the fallback model)
    experts: dict[str, float] = field(default_factory=dict)  # every expert used, with its weight
    confidence: float | None = None  # the router's top-1 probability
    decision: str | None = None  # routed, mixture, fallback or forced
    output: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)  # retrieved passages (doc_id, title, ...)
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: str = "ok"  # ok, or the error type of a failed request
    endpoint: str = "chat"  # chat or completions


_ENTRY_FIELDS = [f.name for f in dataclasses.fields(QueryEntry)]
_JSON_FIELDS = ("experts", "sources")


def _tables(metadata: Any) -> tuple[Any, Any]:
    from sqlalchemy import Column, Float, Index, Integer, String, Table, Text

    queries = Table(
        "queries",
        metadata,
        Column("request_id", String(64), primary_key=True),
        Column("ts", Float, nullable=False),
        Column("model", String(64)),
        Column("expert", String(64)),
        Column("experts", Text),  # JSON
        Column("confidence", Float),
        Column("decision", String(16)),
        Column("prompt", Text, nullable=False),
        Column("output", Text),
        Column("sources", Text),  # JSON
        Column("latency_s", Float),
        Column("prompt_tokens", Integer),
        Column("completion_tokens", Integer),
        Column("status", String(32)),
        Column("endpoint", String(16)),
        Index("ix_queries_expert", "expert"),
        Index("ix_queries_confidence", "confidence"),
    )
    reviews = Table(
        "reviews",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("request_id", String(64), nullable=False, index=True),
        Column("reviewer", String(128), nullable=False),
        Column("ts", Float, nullable=False),
        Column("verdict", String(16), nullable=False),  # accept, reject, correct, misrouted
        Column("correction", Text),  # the edited answer (correct; optional with misrouted)
        Column("correct_expert", String(64)),  # the right expert (misrouted)
        Column("note", Text),
    )
    return queries, reviews


def resolve_url(url_or_path: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a file path (a path means SQLite)."""
    text = str(url_or_path)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().absolute()}"


def _entry_row(entry: QueryEntry | Mapping[str, Any]) -> dict[str, Any]:
    data = dataclasses.asdict(entry) if dataclasses.is_dataclass(entry) else dict(entry)  # type: ignore[arg-type]
    unknown = set(data) - set(_ENTRY_FIELDS)
    if unknown:
        raise ValueError(f"unknown query log field(s) {sorted(unknown)}; allowed: {_ENTRY_FIELDS}")
    row = dataclasses.asdict(QueryEntry(**data))  # defaults for what the caller left out
    for key in _JSON_FIELDS:
        row[key] = json.dumps(row[key])
    row["request_id"] = str(row["request_id"])
    return row


def _decode(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in _JSON_FIELDS:
        if key in out and isinstance(out[key], str):
            with contextlib.suppress(json.JSONDecodeError):
                out[key] = json.loads(out[key])
    return out


class ReviewError(MoeError):
    """A review names an unknown request or expert, or misses what its verdict needs."""


def safe_url(url: str) -> str:
    """The URL without its password (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def create_log_engine(url: str) -> Any:
    """A SQLAlchemy engine for the log; SQLite in WAL mode. ConfigError names a bad URL or driver."""
    from sqlalchemy import create_engine, event

    is_sqlite = url.startswith("sqlite")
    if is_sqlite and ":memory:" in url:
        raise ConfigError("serve.log_db ':memory:' would vanish with its thread; give a file path")
    try:
        kwargs: dict[str, Any] = {"future": True}
        if is_sqlite:
            # The writer thread and request threads share the engine; each connection is
            # used by one thread at a time, so SQLite's same-thread check is not needed.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 5.0}
        else:
            kwargs["pool_pre_ping"] = True
        engine = create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        dialect = url.split(":", 1)[0].split("+")[0]
        hint = _DRIVERS.get(dialect, f"a SQLAlchemy driver for {dialect!r}")
        raise ConfigError(
            f"serve.log_db {safe_url(url)!r} needs a database driver that is not installed "
            f"({exc.name}): pip install {hint}"
        ) from None
    except Exception as exc:  # a malformed URL: name it
        raise ConfigError(f"serve.log_db {safe_url(url)!r} is not a usable database URL: {exc}") from None
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, fast
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

    return engine


def check_review(
    verdict: str,
    reviewer: str,
    correction: str | None,
    correct_expert: str | None,
    experts: Iterable[str] | None,
) -> str:
    """The stripped reviewer name, or ReviewError naming what the verdict misses."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict {verdict!r} is not allowed; allowed: {list(VERDICTS)}")
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise ReviewError("a review needs a reviewer name")
    if verdict == "correct" and not (correction or "").strip():
        raise ReviewError("verdict 'correct' needs the corrected answer (correction)")
    if verdict == "misrouted":
        allowed = sorted(experts) if experts is not None else None
        if not correct_expert:
            raise ReviewError(f"verdict 'misrouted' needs correct_expert; available: {allowed}")
        if allowed is not None and correct_expert not in allowed:
            raise ReviewError(f"unknown expert {correct_expert!r}; available: {allowed}")
    return reviewer


def pick_for_review(
    pending: list[dict[str, Any]], limit: int, low_confidence: int | None, seed: int | None
) -> list[dict[str, Any]]:
    """From unreviewed requests sorted least confident first: that head, then a seeded sample."""
    n_low = limit // 2 + limit % 2 if low_confidence is None else min(low_confidence, limit)
    head = pending[:n_low]
    rest = pending[n_low:]
    random.Random(seed).shuffle(rest)
    return head + rest[: max(0, limit - len(head))]


class QueryLog:
    """A query log over SQLite (default) or any SQLAlchemy database URL.

    Args:
        url_or_path: a file path (SQLite, created with its folder) or a URL such as
            `postgresql://user@host/db` (needs that dialect's driver installed).
        max_queue: entries waiting to be written; beyond it `record` drops and counts.
        batch_size: entries per commit; small, so a crash loses at most one batch in flight.
    """

    def __init__(self, url_or_path: str | Path, max_queue: int = 10_000, batch_size: int = 32):
        from sqlalchemy import MetaData

        self.url = resolve_url(url_or_path)
        self.engine = create_log_engine(self.url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.metadata = MetaData()
        self.queries, self.reviews = _tables(self.metadata)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self.batch_size = batch_size
        self.recorded = 0  # rows committed by the writer
        self.dropped = 0  # entries lost: queue full, database unwritable, or a malformed entry
        self._closed = False
        self._warned = False
        self._count_lock = threading.Lock()  # record() runs on many request threads
        self._writer = threading.Thread(target=self._drain, name="querylog-writer", daemon=True)
        self._writer.start()
        atexit.register(self.close)

    # -- plumbing -----------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if self.is_sqlite:
                Path(self.engine.url.database or "").parent.mkdir(parents=True, exist_ok=True)
            self.metadata.create_all(self.engine)
            self._schema_ready = True

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            rows = [r for r in batch if r is not None]
            if rows:
                self._write(rows)
            for _ in batch:
                self._queue.task_done()
            if stop:
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            self._ensure_schema()
            with self.engine.begin() as conn:  # one transaction per batch
                conn.execute(self.queries.insert(), rows)
            self.recorded += len(rows)
        except Exception as exc:
            if "UNIQUE" in str(exc).upper():
                if len(rows) > 1:  # one duplicate id must not sink the batch
                    for row in rows:
                        self._write([row])
                    return
                if "~" not in rows[0]["request_id"]:  # a client reused its X-Request-Id: keep both
                    self._write(
                        [{**rows[0], "request_id": f"{rows[0]['request_id']}~{uuid.uuid4().hex[:8]}"}]
                    )
                    return
            self._drop(len(rows))
            if not self._warned:  # once: a dead database must not flood the serving log
                log.warning("query log %s: dropped %d entries (%s)", safe_url(self.url), len(rows), exc)
                self._warned = True

    def _drop(self, n: int) -> None:
        with self._count_lock:
            self.dropped += n

    # -- writing ------------------------------------------------------------------------------
    def record(self, entry: QueryEntry | Mapping[str, Any]) -> str | None:
        """Queue one served request for writing; never blocks, never raises.

        Returns the request id, or None when the entry was dropped (counted in `dropped`).
        """
        try:
            if self._closed:
                raise RuntimeError("query log is closed")
            row = _entry_row(entry)
            self._queue.put_nowait(row)
            return row["request_id"]
        except Exception as exc:  # full queue, closed log, malformed entry: count it, carry on
            self._drop(1)
            if not self._warned:
                log.warning("query log: dropped an entry (%s: %s)", type(exc).__name__, exc)
                self._warned = True
            return None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued entry is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, stop the writer and release the database. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # the writer is wedged; what is still queued is lost
            self.dropped += self._queue.qsize()
        self._writer.join(timeout)
        self.engine.dispose()
        atexit.unregister(self.close)

    def __enter__(self) -> QueryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counters(self) -> dict[str, int]:
        """recorded / dropped / queued entries since this log was opened (for metrics)."""
        return {"recorded": self.recorded, "dropped": self.dropped, "queued": self._queue.qsize()}

    # -- reviews ------------------------------------------------------------------------------
    def add_review(
        self,
        request_id: str,
        verdict: str,
        reviewer: str,
        correction: str | None = None,
        correct_expert: str | None = None,
        note: str | None = None,
        experts: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Store one review (synchronously) and return it; the latest review of a request wins.

        `verdict`: accept, reject, correct (needs `correction`) or misrouted (needs
        `correct_expert`, one of `experts` when given). Raises ReviewError on bad input.
        """
        reviewer = check_review(verdict, reviewer, correction, correct_expert, experts)
        if self.get(request_id) is None:
            raise ReviewError(f"unknown request {request_id!r}")
        row = {
            "request_id": request_id,
            "reviewer": reviewer,
            "ts": time.time(),
            "verdict": verdict,
            "correction": correction or None,
            "correct_expert": correct_expert if verdict == "misrouted" else None,
            "note": note,
        }
        self._ensure_schema()
        with self.engine.begin() as conn:
            conn.execute(self.reviews.insert(), [row])
        return row

    # -- reading ------------------------------------------------------------------------------
    def _select(self, stmt: Any) -> list[dict[str, Any]]:
        self._ensure_schema()
        with self.engine.connect() as conn:
            return [_decode(r._mapping) for r in conn.execute(stmt)]

    def get(self, request_id: str) -> dict[str, Any] | None:
        """One logged request with its latest review (`review`: None when unreviewed)."""
        from sqlalchemy import select

        rows = self._select(select(self.queries).where(self.queries.c.request_id == request_id))
        if not rows:
            return None
        reviews = self._select(
            select(self.reviews)
            .where(self.reviews.c.request_id == request_id)
            .order_by(self.reviews.c.ts.desc(), self.reviews.c.id.desc())
        )
        return {**rows[0], "review": reviews[0] if reviews else None}

    def requests(self, since: float | None = None) -> list[dict[str, Any]]:
        """Every logged request (oldest first), optionally only those after `since`."""
        from sqlalchemy import select

        stmt = select(self.queries).order_by(self.queries.c.ts)
        if since is not None:
            stmt = stmt.where(self.queries.c.ts >= since)
        return self._select(stmt)

    def latest_reviews(self) -> dict[str, dict[str, Any]]:
        """request_id -> its latest review."""
        from sqlalchemy import select

        out: dict[str, dict[str, Any]] = {}
        for r in self._select(select(self.reviews).order_by(self.reviews.c.ts, self.reviews.c.id)):
            out[r["request_id"]] = r
        return out

    def review_queue(
        self, limit: int = 20, low_confidence: int | None = None, seed: int | None = None
    ) -> list[dict]:
        """Unreviewed successful requests to review: the lowest router confidence first, then a
        random sample of the rest (requests without a confidence, e.g. forced, come last).

        `low_confidence`: how many of `limit` are the least confident ones (default: half).
        """
        from sqlalchemy import select

        reviewed = set(self.latest_reviews())
        q = self.queries.c
        pending = [
            r
            for r in self._select(
                select(self.queries)
                .where(q.status == "ok")
                .order_by(q.confidence.is_(None), q.confidence, q.ts)
            )
            if r["request_id"] not in reviewed
        ]
        return pick_for_review(pending, limit, low_confidence, seed)


def query_log_url(app: Any) -> str:
    """The configured log as an absolute URL: `serve.log_db`, else artifacts/logs/queries.sqlite.

    Resolve it where the config is read (the driver) and hand the string to replicas, whose
    working directory may differ.
    """
    return resolve_url(app.serve.log_db or app.paths.artifacts_dir / DEFAULT_PATH)


def open_query_log(app: Any) -> QueryLog:
    """Open the configured log (see `query_log_url`)."""
    return QueryLog(query_log_url(app))
