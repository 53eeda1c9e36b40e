"""Review API over real HTTP (uvicorn), the terminal loop, and `moe review` through the CLI."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from serving.trust.querylog import QueryLog
from serving.trust.review import review_loop
from tests.serving.review_helpers import EXPERTS, fill_log, serve_review


@pytest.fixture()
def log(tmp_path):
    with QueryLog(tmp_path / "logs" / "queries.sqlite") as log:
        fill_log(log)
        yield log


def test_review_api_over_http(log):
    with serve_review(log) as url:
        page = httpx.get(f"{url}/review")
        assert page.status_code == 200 and "<title>moe review</title>" in page.text
        queue = httpx.get(f"{url}/review/api/queue", params={"limit": 3, "seed": 0}).json()
        assert [i["request_id"] for i in queue["items"][:2]] == ["r4", "r1"]  # 0.12, 0.31 first
        assert queue["experts"] == EXPERTS and len(queue["items"]) == 3

        ok = httpx.post(
            f"{url}/review/api/r1",
            json={"verdict": "misrouted", "reviewer": "ana", "correct_expert": "unix_man"},
        )
        assert ok.status_code == 200 and ok.json()["review"]["correct_expert"] == "unix_man"
        bad_expert = httpx.post(
            f"{url}/review/api/r3", json={"verdict": "misrouted", "reviewer": "ana", "correct_expert": "lgal"}
        )
        assert bad_expert.status_code == 400 and "unknown expert 'lgal'" in bad_expert.json()["detail"]
        missing = httpx.post(f"{url}/review/api/nope", json={"verdict": "accept", "reviewer": "ana"})
        assert missing.status_code == 404
        assert (
            httpx.post(f"{url}/review/api/r3", json={"verdict": "accept"}).status_code == 422
        )  # no reviewer
        assert httpx.get(f"{url}/review/api/queue", params={"limit": 0}).status_code == 400

        after = httpx.get(f"{url}/review/api/queue", params={"limit": 10}).json()["items"]
        assert "r1" not in {i["request_id"] for i in after} and len(after) == 4
    review = log.get("r1")["review"]
    assert review["reviewer"] == "ana" and review["verdict"] == "misrouted" and review["ts"] > 0


def test_terminal_loop_reads_verdicts_from_a_stream(log):
    # r4 (0.12): correct; r1 (0.31): a typo, then misrouted -> unix_man; r3 (0.55): skip; r5: accept; quit
    script = "c\nTry asking a comedian.\nx\nm\nunix_man\ns\n"
    out = io.StringIO()
    done = review_loop(log, "bo", EXPERTS, limit=5, inp=io.StringIO(script + "a\nq\n"), out=out, seed=0)
    verdicts = {d["request_id"]: d["verdict"] for d in done}
    assert list(verdicts.values()) == ["correct", "misrouted", "accept"]
    assert verdicts["r4"] == "correct" and verdicts["r1"] == "misrouted"
    assert "unknown key 'x'" in out.getvalue()
    assert log.get("r4")["review"]["correction"] == "Try asking a comedian."
    assert log.get("r3")["review"] is None  # skipped


def test_terminal_loop_stops_at_end_of_input(log):
    assert (
        review_loop(log, "bo", EXPERTS, inp=io.StringIO("a\n"), out=io.StringIO())
        and len(log.latest_reviews()) == 1
    )


def test_moe_review_cli_reads_stdin(tmp_path, monkeypatch, capsys):
    from serving.cli import main

    monkeypatch.setenv("MOE_ARTIFACTS", str(tmp_path / "artifacts"))
    with QueryLog(tmp_path / "artifacts" / "logs" / "queries.sqlite") as log:
        fill_log(log)
    monkeypatch.setattr("sys.stdin", io.StringIO("m\nlegal\nr\nq\n"))
    assert main(["review", "--reviewer=cli", "--seed=0"]) == 0
    assert "2 review(s) stored by 'cli'" in capsys.readouterr().out
    assert main(["review", "--list", "--limit=2"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(listed) == 2 and {"r4", "r1"}.isdisjoint(i["request_id"] for i in listed)
    with pytest.raises(SystemExit) as exit_:
        main(["review", "--bogus"])
    assert exit_.value.code == 2
    assert "unknown option --bogus" in capsys.readouterr().err


def test_review_router_takes_the_log_itself(log):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serving.trust.review import review_router

    app = FastAPI()
    app.include_router(review_router(log, EXPERTS, prefix="/admin/review"))
    client = TestClient(app)
    assert len(client.get("/admin/review/api/queue").json()["items"]) == 5
    assert (
        client.post("/admin/review/api/r2", json={"verdict": "accept", "reviewer": "cy"}).status_code == 200
    )
    assert log.get("r2")["review"]["reviewer"] == "cy"
