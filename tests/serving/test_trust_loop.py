"""The trust loop on the real app: serve -> query log -> review in a browser -> export -> retrain ->
the endpoint reflects the feedback. Two user experts written for the test (astronomy `toy`, cooking
`cook`, which grounds its answers in its own corpus) on the tiny base model, a TF-IDF router, the
real Ray Serve app on 127.0.0.1, the real SQLite log and Debian chromium."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOY_WORDS, write_toy_folder
from tests.router.test_expert_matrix import COOKING
from tests.serving.test_review_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.serve, pytest.mark.integration, pytest.mark.slow]
PORT = 8152
COMMON = [
    "base_model=tiny",
    "train=tiny",
    "train.seq_len=160",  # room for a chat-template correction (system + question + answer)
    "router=tfidf",
    "router.background=false",
    "router.max_windows_per_expert=300",
    "experts=[toy,cook]",
    f"serve.port={PORT}",
    "serve.pool.torch_threads=1",
    "serve.max_tokens_limit=16",
]
# Mostly astronomy with a little cooking: the router sends it to `toy`; the reviewer says `cook`.
MISROUTED = "comet orbit telescope nebula galaxy simmer"
QUESTION = "how long should i knead dough with yeast and flour"
CORRECTION = "Knead the dough for ten minutes, until it is smooth and springs back."


def _expert_yaml(conf: Path, slug: str, folder: Path, retrieval: bool) -> None:
    serving = "  serving:\n    retrieval: true\n    retrieval_top_k: 2\n" if retrieval else ""
    (conf / "expert" / f"{slug}.yaml").write_text(
        f"# @package _global_\nexpert:\n  name: {slug}\n  description: {slug} notes written for the tests.\n"
        f"  data:\n    source: folder\n    path: {folder}\n    split: [0.6, 0.2, 0.2]\n"
        "  generation:\n    system_prompt: Answer briefly.\n"
        f"{serving}"
    )


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_app):
    """Config dir + artifacts with two trained experts, a router, cook's index; the app serving them."""
    from experts.config import compose, config_dir
    from experts.data import build_corpus
    from experts.retrieval import build_index
    from experts.train import train_expert
    from router.train import train_router
    from serving.app import start_server, stop_server

    root = tmp_path_factory.mktemp("loop")
    conf = root / "conf"
    shutil.copytree(config_dir(), conf)
    write_toy_folder(root / "toy_texts", seed=1, words=TOY_WORDS)
    write_toy_folder(root / "cook_texts", seed=2, words=COOKING)
    _expert_yaml(conf, "toy", root / "toy_texts", retrieval=False)
    _expert_yaml(conf, "cook", root / "cook_texts", retrieval=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_CONFIG_DIR", str(conf))
        mp.setenv("MOE_ARTIFACTS", str(root / "artifacts"))
        app = compose(COMMON)
        for slug in ("toy", "cook"):
            sub = compose([*COMMON, f"expert={slug}"])
            build_corpus(sub.expert, sub)
            train_expert(sub, sub.expert, sub.paths.expert_dir(slug), progress=False)
        build_index(app, app.get_expert("cook"))
        train_router(app)
        url = start_server(app)
        try:
            yield {"url": url, "root": url.removesuffix("/v1"), "app": app}
        finally:
            stop_server()


def _chat(url: str, model: str, text: str, **extra) -> httpx.Response:
    body = {
        "model": model,
        "max_tokens": 6,
        "temperature": 0,
        "messages": [{"role": "user", "content": text}],
    }
    return httpx.post(f"{url}/chat/completions", json={**body, **extra}, timeout=120)


def _rows(app, want: set[str], timeout: float = 30.0) -> dict[str, dict]:
    """The log rows of the request ids `want` (the writer thread commits them shortly after)."""
    from serving.trust.querylog import open_query_log

    deadline = time.monotonic() + timeout
    with open_query_log(app) as log:
        while True:
            rows = {r["request_id"]: r for r in log.requests() if r["request_id"] in want}
            if set(rows) == want or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


def _stream(url: str, model: str, text: str) -> tuple[str, list[dict]]:
    body = {"model": model, "max_tokens": 6, "temperature": 0, "stream": True, "prompt": text}
    chunks = []
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return rid, chunks


def test_every_request_lands_in_the_query_log(loop):
    url, app = loop["url"], loop["app"]
    auto = _chat(url, "auto", " ".join(TOY_WORDS[:8]))
    forced = _chat(url, "cook", QUESTION)
    streamed_id, chunks = _stream(url, "toy", "the comet")
    missing = _chat(url, "nope", "hello")
    assert (auto.status_code, forced.status_code, missing.status_code) == (200, 200, 404)
    ids = {r.headers["x-request-id"] for r in (auto, forced, missing)} | {streamed_id}
    rows = _rows(app, ids)
    assert set(rows) == ids
    a = rows[auto.headers["x-request-id"]]
    body = auto.json()
    assert (a["model"], a["expert"], a["decision"]) == (
        "auto",
        body["routing"]["expert"],
        body["routing"]["decision"],
    )
    assert a["confidence"] == pytest.approx(body["routing"]["confidence"])
    assert a["experts"] == pytest.approx(body["routing"]["experts"])
    assert a["output"] == body["choices"][0]["message"]["content"] and a["status"] == "ok"
    assert (a["prompt_tokens"], a["completion_tokens"]) == (
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )
    assert a["prompt"] == " ".join(TOY_WORDS[:8]) and a["endpoint"] == "chat" and a["latency_s"] > 0
    s = rows[streamed_id]
    assert s["output"] == "".join(c["choices"][0]["text"] for c in chunks) and s["endpoint"] == "completions"
    assert s["expert"] == "toy" and s["decision"] == "forced"
    m = rows[missing.headers["x-request-id"]]
    assert m["status"] == missing.json()["error"]["type"] and m["output"] == ""


def test_grounded_answers_list_their_sources(loop):
    from experts.data import load_corpus

    url, app = loop["url"], loop["app"]
    reply = _chat(url, "cook", QUESTION)
    sources = reply.json()["sources"]
    train_ids = set(load_corpus("cook", app.paths)["train"]["doc_id"])
    assert len(sources) == 2 and {s["doc_id"] for s in sources} <= train_ids
    assert sources[0]["score"] >= sources[1]["score"] > 0
    assert any(w in sources[0]["snippet"] for w in ("knead", "dough", "yeast", "flour"))
    # the prompt really carried them: far more prompt tokens than the bare question
    bare = _chat(url, "toy", QUESTION)
    assert "sources" not in bare.json()
    assert reply.json()["usage"]["prompt_tokens"] > bare.json()["usage"]["prompt_tokens"] + 50
    _, chunks = _stream(url, "cook", QUESTION)
    assert chunks[0]["sources"] == sources and "sources" not in chunks[1]
    (row,) = _rows(app, {reply.headers["x-request-id"]}).values()
    assert row["sources"] == sources


def _answer_loss(app, adapter: Path, prompt: str, response: str) -> float:
    """Mean loss of `response` given `prompt` under `adapter` (what the correction trains)."""
    import torch
    from peft import PeftModel

    from experts.base_model import load_base_model, load_tokenizer
    from experts.train_data import instruction_rows

    tok = load_tokenizer(app.base_model, app.paths)
    ids, labels, mask = instruction_rows(
        [{"prompt": prompt, "response": response}], tok, 160, "Answer briefly."
    )
    model = PeftModel.from_pretrained(load_base_model(app.base_model, app.paths, "cpu"), str(adapter))
    with torch.inference_mode():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def _wait_saved(card, verdict: str) -> None:
    """The card's status once its POST answered: 'saved: <verdict>', or the server's error."""
    status = card.locator(".status")
    deadline = time.monotonic() + 20
    while status.inner_text() in ("", "saving...") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status.inner_text() == f"saved: {verdict}", status.inner_text()


def test_review_in_the_browser_then_retraining_fixes_the_misroute(loop, tmp_path):
    """The done-criterion of the trust loop, end to end on the running endpoint."""
    from experts.config import compose
    from experts.train import train_expert
    from router.train import train_router
    from serving.cli import main

    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: run `make system-deps` (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (a dev dependency)")
    url, root, app = loop["url"], loop["root"], loop["app"]
    misrouted = _chat(url, "auto", MISROUTED)
    assert misrouted.json()["routing"]["expert"] == "toy"  # the router's mistake
    answered = _chat(url, "cook", QUESTION)
    ids = {misrouted.headers["x-request-id"], answered.headers["x-request-id"]}
    assert set(_rows(app, ids)) == ids

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{root}/review")
            page.wait_for_selector("body[data-loaded=true]", timeout=20_000)
            page.fill("#reviewer", "ana")
            page.dispatch_event("#reviewer", "change")
            card = page.locator(f"section.card[data-request-id='{misrouted.headers['x-request-id']}']")
            card.locator("select.expert").select_option("cook")
            card.locator("button[data-verdict=misrouted]").click()
            _wait_saved(card, "misrouted")
            card = page.locator(f"section.card[data-request-id='{answered.headers['x-request-id']}']")
            card.locator("textarea.correction").fill(CORRECTION)
            card.locator("button[data-verdict=correct]").click()
            _wait_saved(card, "correct")
        finally:
            browser.close()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_ARTIFACTS", str(app.paths.artifacts_dir))
        assert main(["feedback", "export", *COMMON]) == 0
        feedback = app.paths.artifacts_dir / "feedback"
        (router_row,) = [json.loads(line) for line in (feedback / "router.jsonl").read_text().splitlines()]
        assert (router_row["text"], router_row["label"]) == (MISROUTED, "cook")
        (cook_row,) = [json.loads(line) for line in (feedback / "cook.jsonl").read_text().splitlines()]
        assert (cook_row["prompt"], cook_row["response"]) == (QUESTION, CORRECTION)

        # Retrain the expert with and without its correction, the same run otherwise: only the
        # feedback can make the corrected answer more likely. (Few steps of a tiny random model
        # move its loss little, so the comparison is between the two retrained adapters.)
        cook_dir = app.paths.expert_dir("cook")
        shutil.rmtree(cook_dir / "checkpoint", ignore_errors=True)  # a fresh run, not a resume
        retrain = [*COMMON, "expert=cook", "train.steps=24", "train.max_train_blocks=8", "train.lr=3e-2"]
        control = compose([*retrain, "train.include_feedback=false"])
        without = train_expert(control, control.expert, tmp_path / "cook_without", progress=False)
        assert "feedback" not in without["train_blocks"]
        sub = compose([*retrain, "train.include_feedback=true"])
        metrics = train_expert(sub, sub.expert, cook_dir, progress=False)
        assert metrics["train_blocks"]["feedback"] == sub.train.feedback_repeat
        loss_without = _answer_loss(app, tmp_path / "cook_without", QUESTION, CORRECTION)
        loss_with = _answer_loss(app, cook_dir, QUESTION, CORRECTION)
        print(f"answer loss of the correction: {loss_without:.3f} without feedback, {loss_with:.3f} with")
        assert loss_with < loss_without - 0.1, (loss_without, loss_with)

        # Retrain the router with the misroute, swap it into the running endpoint.
        train_router(compose([*COMMON, "router.include_feedback=true"]))
        reload = httpx.post(f"{root}/admin/reload", timeout=120)
        assert reload.status_code == 200, reload.text
    fixed = _chat(url, "auto", MISROUTED)
    assert fixed.json()["routing"]["expert"] == "cook", fixed.json()["routing"]
    # the rest of the astronomy queries still go to toy
    assert _chat(url, "auto", " ".join(TOY_WORDS[:8])).json()["routing"]["expert"] == "toy"


def test_the_review_api_serves_the_last_fallback_clusters(loop):
    """What `moe propose-experts` wrote last (artifacts/reports/proposals.json) reaches /review."""
    from serving.trust.proposals import REPORT_NAME

    url, app = loop["root"], loop["app"]
    path = app.paths.reports_dir / f"{REPORT_NAME}.json"
    assert httpx.get(f"{url}/review/api/clusters", timeout=30).json() == {"summary": None}
    summary = {
        "created": 1.0,
        "requests": 9,
        "uncovered": 6,
        "noise": 1,
        "clusters": [{"slug": "bees", "size": 5}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    try:
        assert httpx.get(f"{url}/review/api/clusters", timeout=30).json() == {"summary": summary}
    finally:
        path.unlink()
