"""Query log: WAL, durability across reopen, concurrent writers, never raising, drop counting."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from experts.errors import ConfigError
from serving.trust.querylog import QueryEntry, QueryLog, ReviewError


def test_wal_and_rows_survive_a_reopen(tmp_path):
    path = tmp_path / "logs" / "queries.sqlite"
    with QueryLog(path) as log:
        rid = log.record(
            QueryEntry(
                prompt="what is fork",
                expert="unix_man",
                experts={"unix_man": 1.0},
                confidence=0.9,
                decision="routed",
                output="a call",
                latency_s=0.2,
                sources=[{"doc_id": "fork", "title": "fork(2)"}],
                prompt_tokens=4,
            )
        )
        log.record({"prompt": "second", "request_id": "r2"})
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with QueryLog(path) as again:
        row = again.get(rid)
        assert row["expert"] == "unix_man" and row["experts"] == {"unix_man": 1.0}
        assert row["sources"][0]["doc_id"] == "fork" and row["review"] is None
        assert [r["request_id"] for r in again.requests()] == [rid, "r2"]


def test_committed_rows_survive_without_close(tmp_path):
    """An unclean exit (no close) keeps what the writer committed: commits are per small batch."""
    path = tmp_path / "q.sqlite"
    log = QueryLog(path, batch_size=4)
    for i in range(10):
        log.record({"prompt": f"p{i}"})
    assert log.flush()
    # Read from a separate connection while the log is still open (as after a crash).
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM queries").fetchone()[0] == 10
    log.close()


def test_committed_rows_survive_a_killed_process(tmp_path):
    """A process that dies without close (os._exit: no atexit, no flush of Python state) keeps
    every row its writer had committed."""
    import subprocess
    import sys

    path = tmp_path / "q.sqlite"
    code = (
        "import os; from serving.trust.querylog import QueryLog\n"
        f"log = QueryLog({str(path)!r}, batch_size=4)\n"
        "[log.record({'prompt': f'p{i}'}) for i in range(10)]\n"
        "assert log.flush()\n"
        "os._exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 3
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM queries").fetchone()[0] == 10


def test_concurrent_records_all_land(tmp_path):
    log = QueryLog(tmp_path / "q.sqlite", batch_size=16)
    threads = [
        threading.Thread(target=lambda t=t: [log.record({"prompt": f"t{t}-{i}"}) for i in range(50)])
        for t in range(8)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    assert log.counters() == {"recorded": 400, "dropped": 0, "queued": 0}
    assert len(QueryLog(tmp_path / "q.sqlite").requests()) == 400


def test_record_never_raises_on_an_unwritable_database(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    log = QueryLog(blocker / "q.sqlite")  # its folder can never be created
    assert log.record({"prompt": "x"}) is not None  # queued: the writer thread meets the error, not us
    assert log.record({"prompt": "y", "bogus_field": 1}) is None  # malformed: counted, not raised
    log.close()
    assert log.dropped == 2 and log.recorded == 0
    assert log.record({"prompt": "after close"}) is None and log.dropped == 3


def test_full_queue_drops_and_counts(tmp_path):
    log = QueryLog(tmp_path / "q.sqlite", max_queue=1, batch_size=1)
    gate = threading.Lock()
    gate.acquire()
    real_write = log._write
    log._write = lambda rows: (gate.acquire(), real_write(rows))  # hold the writer
    results: list = []
    caller = threading.Thread(
        target=lambda: results.extend(log.record({"prompt": f"p{i}"}) for i in range(5))
    )
    caller.start()
    caller.join(60)
    # the writer is stuck (it holds the gate until below), yet every record call returned
    assert not caller.is_alive() and len(results) == 5
    gate.release()
    log.close()
    assert results.count(None) == log.dropped >= 3  # one in the writer's hands, one queued, rest dropped


def test_postgres_url_without_driver_names_it():
    with pytest.raises(ConfigError, match=r"psycopg2.*pip install") as err:
        QueryLog("postgresql://user:secret@db.example/moe")
    assert "secret" not in str(err.value)


def test_review_queue_lowest_confidence_first_then_sample(tmp_path):
    with QueryLog(tmp_path / "q.sqlite") as log:
        for i, c in enumerate([0.9, 0.2, 0.5, 0.95, 0.1, None, 0.8]):
            log.record({"prompt": f"p{i}", "request_id": f"r{i}", "confidence": c})
        log.record({"prompt": "failed", "request_id": "bad", "confidence": 0.0, "status": "RequestError"})
        log.flush()
        queue = log.review_queue(limit=4, seed=0)
        assert [r["request_id"] for r in queue[:2]] == ["r4", "r1"]  # 0.1, 0.2
        assert len(queue) == 4 and "bad" not in {r["request_id"] for r in queue}
        log.add_review("r4", "accept", "ana")
        assert "r4" not in {r["request_id"] for r in log.review_queue(limit=10)}
        assert len(log.review_queue(limit=10)) == 6


def test_review_validation(tmp_path):
    with QueryLog(tmp_path / "q.sqlite") as log:
        log.record({"prompt": "p", "request_id": "r"})
        log.flush()
        with pytest.raises(ReviewError, match="allowed"):
            log.add_review("r", "maybe", "ana")
        with pytest.raises(ReviewError, match="corrected answer"):
            log.add_review("r", "correct", "ana", correction=" ")
        with pytest.raises(ReviewError, match=r"unknown expert 'lgal'; available: \['legal'\]"):
            log.add_review("r", "misrouted", "ana", correct_expert="lgal", experts=["legal"])
        with pytest.raises(ReviewError, match="unknown request"):
            log.add_review("nope", "accept", "ana")
        log.add_review("r", "reject", "ana")
        log.add_review("r", "misrouted", "bo", correct_expert="legal", experts=["legal"])
        assert log.get("r")["review"]["verdict"] == "misrouted"  # the latest wins


def test_a_database_url_works_like_a_path(tmp_path):
    """Any SQLAlchemy URL is taken as is (postgresql://... the same way, with its driver installed)."""
    url = f"sqlite:///{tmp_path / 'by_url.sqlite'}"
    with QueryLog(url) as log:
        log.record({"prompt": "via url", "request_id": "u1"})
    with QueryLog(url) as again:
        assert again.get("u1")["prompt"] == "via url"


@pytest.mark.parametrize("batch", [1, 32])
def test_a_reused_request_id_keeps_both_rows(tmp_path, batch):
    """A client may send the same X-Request-Id twice; neither answer is lost, alone or in a batch."""
    with QueryLog(tmp_path / "q.sqlite", batch_size=batch) as log:
        log.record({"prompt": "first", "request_id": "dup"})
        assert log.flush()
        for prompt in ("second", "third"):
            log.record({"prompt": prompt, "request_id": "dup"})
        log.record({"prompt": "other", "request_id": "r9"})
        assert log.flush()
        rows = {r["prompt"]: r["request_id"] for r in log.requests()}
    assert rows["first"] == "dup" and rows["other"] == "r9" and log.dropped == 0
    assert rows["second"].startswith("dup~") and rows["third"].startswith("dup~")
    assert rows["second"] != rows["third"]
