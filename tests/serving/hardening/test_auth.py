"""API keys on the real endpoint: every route but /health wants one; 401 in OpenAI's shape; the keys
never reach a log (the Ray logs of every process, the query log)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.hardening.conftest import assert_openai_error, logged_rows

pytestmark = pytest.mark.serve

CHAT = {
    "model": "legal",
    "messages": [{"role": "user", "content": "Who may sublicense this?"}],
    "max_tokens": 2,
}
# Every route the app serves with a request that passes validation (so only the key is missing).
PROTECTED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "base", "prompt": "The licensee", "max_tokens": 2}),
    ("POST", "/v1/route", {"text": "copyright notice"}),
    ("POST", "/admin/reload", None),
    ("GET", "/review/api/queue", None),
    ("GET", "/review/api/clusters", None),
    ("POST", "/review/api/0123456789abcdef", {"verdict": "accept", "reviewer": "ana"}),
]
WRONG_KEY = "sk-moe-wrong-0f1e2d3c4b5a69788796a5b4"


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
@pytest.mark.parametrize("header", [None, "Bearer " + WRONG_KEY, "Basic Zm9vOmJhcg==", "Bearer"])
def test_every_route_but_health_wants_a_key(endpoint, method, path, body, header):
    headers = {"Authorization": header} if header is not None else {}
    reply = httpx.request(method, f"{endpoint.url}{path}", json=body, headers=headers, timeout=60)
    error = assert_openai_error(reply, 401)
    assert error["type"] == "authentication_error" and "API key" in error["message"]


def test_a_bad_body_without_a_key_is_still_401(endpoint):
    """Validation must not answer before authentication (it would describe the API to anyone)."""
    reply = httpx.post(f"{endpoint.url}/v1/chat/completions", content=b"{not json", timeout=60)
    assert_openai_error(reply, 401)


def test_health_is_open_and_keys_from_env_and_file_both_work(endpoint):
    assert httpx.get(f"{endpoint.url}/health", timeout=30).json()["status"] == "ok"
    for key in (endpoint.key, endpoint.file_key):
        reply = httpx.get(f"{endpoint.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == "auto"
    assert endpoint.get("/review/api/queue").status_code == 200


def test_the_openai_client_with_a_key(endpoint):
    good = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=endpoint.key, timeout=60, max_retries=0)
    assert good.chat.completions.create(**CHAT).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=WRONG_KEY, timeout=60, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/no/such/route"])
def test_schema_and_docs_want_the_key_like_every_route(endpoint, path):
    """Without a key every path but /health is 401, so not even which paths exist is told to a caller
    without one; with it the schema and Swagger UI are served (vLLM's and FastAPI's users look there)."""
    assert_openai_error(httpx.get(f"{endpoint.url}{path}", timeout=30), 401)
    reply = endpoint.get(path)
    if path == "/openapi.json":
        assert reply.status_code == 200, reply.text[:300]
        assert {"/v1/chat/completions", "/v1/completions", "/v1/route"} <= set(reply.json()["paths"])
    elif path == "/docs":
        assert reply.status_code == 200 and "text/html" in reply.headers["content-type"]
        assert "/openapi.json" in reply.text  # the page loads the schema it documents
    else:
        assert_openai_error(reply, 404)


def test_the_review_page_itself_is_static(endpoint):
    """/review is a static page (no data; the browser asks for the key); its JSON API needs the key."""
    page = httpx.get(f"{endpoint.url}/review", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert endpoint.key not in page.text and "Who may sublicense" not in page.text


def test_keys_never_reach_a_log(endpoint):
    # answered requests with each key, and rejected ones with a wrong key; then look everywhere
    rids = []
    for key in (endpoint.key, endpoint.file_key):
        headers = {"Authorization": f"Bearer {key}"}
        reply = httpx.post(f"{endpoint.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
        assert reply.status_code == 200
        rids.append(reply.headers["x-request-id"])
    for path in ("/v1/chat/completions", "/v1/route", "/v1/models"):
        httpx.post(
            f"{endpoint.url}{path}", json=CHAT, headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=60
        )
    assert len(logged_rows(endpoint, rids)) == 2  # the query log has them: its files hold data to search
    files = [p for p in endpoint.logs.rglob("*") if p.is_file()]
    files += [p for p in (endpoint.app.paths.artifacts_dir / "logs").iterdir() if p.is_file()]
    assert any(p.name.startswith("queries.sqlite") for p in files) and len(files) > 3
    for path in files:
        data = path.read_bytes()
        for secret in (endpoint.key, endpoint.file_key, WRONG_KEY):
            assert secret.encode() not in data, f"an API key is written in {path}"


def test_moe_reload_takes_its_key_from_the_keys_file(endpoint, monkeypatch):
    """`moe reload` / `add-expert` / `remove-expert` call /admin/reload with the endpoint's own keys:
    here only serve.api_keys_file has one (the environment variable is unset)."""
    import dataclasses

    from experts.errors import MoeError
    from serving.manage import update_endpoint
    from tests.serving.hardening.conftest import KEYS_ENV

    monkeypatch.delenv(KEYS_ENV, raising=False)
    status = update_endpoint(endpoint.app, endpoint.url)
    assert status.startswith(f"endpoint at {endpoint.url} updated"), status
    assert "'legal'" in status
    no_file = dataclasses.replace(
        endpoint.app, serve=dataclasses.replace(endpoint.app.serve, api_keys_file=None)
    )
    with pytest.raises(MoeError, match=r"refused the reload \(401\)"):
        update_endpoint(no_file, endpoint.url)
