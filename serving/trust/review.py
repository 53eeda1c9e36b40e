"""Human review of served answers: a web page at `/review` and the terminal `moe review`.

Both show the requests most worth a look first (lowest router confidence, then a random sample)
and store one verdict per look in the query log's `reviews` table, with reviewer and time:
accept, reject, correct (an edited answer) or misrouted (the right expert). `moe feedback
export` turns those into training data.

The web page is a FastAPI `APIRouter` the ingress mounts: `app.include_router(review_router(log,
experts))`. Its routes: GET /review (the page), GET /review/api/queue, POST /review/api/{request_id}.
"""

# No `from __future__ import annotations` here: FastAPI reads the route's `body: ReviewIn` when the
# ingress replica rebuilds its routes, from the globals Ray Serve pickled with the (nested) endpoint;
# a string annotation there does not resolve, and the body became a required *query* parameter
# (every POST /review/api/... answered 400).
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any, TextIO

from pydantic import BaseModel, Field

from serving.trust.querylog import VERDICTS, QueryLog, ReviewError, open_query_log, safe_url


class ReviewIn(BaseModel):
    """The body of POST /review/api/{request_id}."""

    verdict: str = Field(description=f"one of {list(VERDICTS)}")
    reviewer: str
    correction: str | None = None  # the edited answer (verdict correct)
    correct_expert: str | None = None  # the right expert (verdict misrouted)
    note: str | None = None


def review_page() -> str:
    """The page's HTML (a package resource: serving/trust/static/review.html)."""
    return resources.files("serving.trust").joinpath("static/review.html").read_text(encoding="utf-8")


def _card(row: dict[str, Any]) -> dict[str, Any]:
    """What the page and the terminal show of one request."""
    keys = (
        "request_id",
        "ts",
        "model",
        "expert",
        "experts",
        "confidence",
        "decision",
        "prompt",
        "output",
        "sources",
        "latency_s",
    )
    return {k: row.get(k) for k in keys}


def review_router(
    log: QueryLog | Callable[[], QueryLog],
    experts: Iterable[str] | Callable[[], Iterable[str] | None] | None = None,
    prefix: str = "/review",
    dependencies: list[Any] | None = None,
    clusters: Callable[[], dict[str, Any] | None] | None = None,
) -> Any:
    """A FastAPI router with the review page and its JSON API.

    Args:
        log: the query log the ingress records into, or a function returning it (for a router
            mounted at import time whose log is opened later, e.g. in a Ray Serve replica).
        experts: slugs a misroute may name (the router's labels), or a function returning them
            (the labels change when a running endpoint adds an expert); None accepts any slug.
        prefix: where the page lives.
        dependencies: FastAPI dependencies run before each JSON route (the ingress checks API keys).
        clusters: returns the last `moe propose-experts` summary (the fallback clusters), or None.
    """
    from fastapi import APIRouter, HTTPException
    from fastapi.responses import HTMLResponse

    current: Callable[[], QueryLog] = (lambda: log) if isinstance(log, QueryLog) else log

    def allowed() -> list[str] | None:
        names = experts() if callable(experts) else experts
        return sorted(names) if names is not None else None

    router = APIRouter(prefix=prefix, tags=["review"])
    deps = dependencies or []  # on the JSON API only: the page is static HTML with no data

    @router.get("", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(review_page())

    @router.get("/api/queue", dependencies=deps)
    def queue(limit: int = 20, seed: int | None = None) -> dict[str, Any]:
        if not 1 <= limit <= 500:
            raise HTTPException(400, f"limit {limit} must lie in [1, 500]")
        items = [_card(r) for r in current().review_queue(limit=limit, seed=seed)]
        return {"items": items, "experts": allowed(), "verdicts": list(VERDICTS)}

    @router.get("/api/clusters", dependencies=deps)
    def fallback_clusters() -> dict[str, Any]:
        return {"summary": clusters() if clusters is not None else None}

    @router.post("/api/{request_id}", dependencies=deps)
    def review(request_id: str, body: ReviewIn) -> dict[str, Any]:
        try:
            row = current().add_review(
                request_id,
                body.verdict,
                body.reviewer,
                correction=body.correction,
                correct_expert=body.correct_expert,
                note=body.note,
                experts=allowed(),
            )
        except ReviewError as exc:
            status = 404 if str(exc).startswith("unknown request") else 400
            raise HTTPException(status, str(exc)) from None
        return {"ok": True, "review": row}

    return router


# ------------------------------------------------------------------------------------------------
# Terminal
# ------------------------------------------------------------------------------------------------
_KEYS = {"a": "accept", "r": "reject", "c": "correct", "m": "misrouted"}


def _show(row: dict[str, Any], n: int, total: int, out: TextIO) -> None:
    conf = row.get("confidence")
    conf_text = "-" if conf is None else f"{conf:.2f}"
    print(
        f"\n[{n}/{total}] {row['request_id']}  expert={row.get('expert')}  decision={row.get('decision')}  "
        f"confidence={conf_text}",
        file=out,
    )
    print(f"  prompt: {row['prompt']}", file=out)
    print(f"  answer: {row.get('output') or ''}", file=out)
    for s in row.get("sources") or []:
        print(f"  source: {s.get('doc_id')} {s.get('title', '')}", file=out)


def review_loop(
    log: QueryLog,
    reviewer: str,
    experts: Iterable[str] | None,
    limit: int = 20,
    inp: TextIO | None = None,
    out: TextIO | None = None,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Ask for a verdict on each queued request; lines come from `inp` (a terminal or a pipe).

    Per request: `a` accept, `r` reject, `c` correct (next line: the corrected answer), `m`
    misrouted (next line: the right expert), `s` skip, `q` quit. Returns the stored reviews.
    """
    inp = inp or sys.stdin
    out = out or sys.stdout
    allowed = sorted(experts) if experts is not None else None
    items = log.review_queue(limit=limit, seed=seed)
    if not items:
        print("nothing to review", file=out)
        return []
    done: list[dict[str, Any]] = []

    def ask(prompt: str) -> str | None:
        print(prompt, end="", file=out, flush=True)
        line = inp.readline()
        return None if line == "" else line.rstrip("\n")  # "" = end of input

    for n, row in enumerate(items, 1):
        _show(row, n, len(items), out)
        while True:
            key = ask("  [a]ccept [r]eject [c]orrect [m]isrouted [s]kip [q]uit > ")
            if key is None or key.strip().lower() == "q":
                return done
            key = key.strip().lower()
            if key == "s":
                break
            if key not in _KEYS:
                print(f"  unknown key {key!r}; use a, r, c, m, s or q", file=out)
                continue
            correction = expert = None
            if key == "c":
                correction = ask("  corrected answer > ")
            elif key == "m":
                expert = ask(f"  right expert {allowed or ''} > ")
                expert = expert.strip() if expert else expert
            try:
                done.append(
                    log.add_review(
                        row["request_id"],
                        _KEYS[key],
                        reviewer,
                        correction=correction,
                        correct_expert=expert,
                        experts=allowed,
                    )
                )
                print(f"  saved: {_KEYS[key]}", file=out)
                break
            except ReviewError as exc:
                print(f"  {exc}", file=out)
    return done


def _options(args: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for arg in args:
        if not arg.startswith("--"):
            raise ReviewError(f"unexpected argument {arg!r}; use --reviewer=NAME --limit=N --list --seed=N")
        key, _, value = arg[2:].partition("=")
        if key not in ("reviewer", "limit", "list", "seed"):
            raise ReviewError(f"unknown option --{key}; allowed: --reviewer=NAME --limit=N --list --seed=N")
        opts[key] = value
    return opts


def review_command(app: Any, ctx: Any) -> list[dict[str, Any]]:
    """`moe review [--reviewer=NAME] [--limit=N] [--list]`: review logged answers in the terminal.

    Reads verdicts from stdin, so it scripts too: `printf 'a\\nm\\nlegal\\n' | moe review`.
    `--list` prints the queue as JSON lines and stores nothing.
    """
    opts = _options(list(ctx.args))
    limit = int(opts.get("limit") or 20)
    seed = int(opts["seed"]) if opts.get("seed") else None
    experts = [e.name for e in app.experts if e.routable]
    with open_query_log(app) as log:
        if "list" in opts:
            for row in log.review_queue(limit=limit, seed=seed):
                print(json.dumps(_card(row)))
            return []
        reviewer = opts.get("reviewer") or os.environ.get("MOE_REVIEWER") or getpass.getuser()
        done = review_loop(log, reviewer, experts, limit=limit, seed=seed)
    print(f"\n{len(done)} review(s) stored by {reviewer!r} in {safe_url(log.url)}")
    return done
