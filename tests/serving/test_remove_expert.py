"""`moe remove-expert` against a running endpoint that routes with the default `tuned` router.

Three user experts (astronomy, cooking and sailing notes written for the test) are built, trained
on the tiny base model and served for real, routed by the `tuned` pipeline (MiniLM fine-tuned for a
few steps, mixed with TF-IDF). Requests stream in the background while the real CLI removes
`cook`: none of them may fail; afterwards the model list and the router no longer offer `cook` and
a request naming it gets a clear 404.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from experts.config import compose
from tests.conftest import TOY_WORDS, run_moe, write_toy_folder
from tests.router.test_expert_matrix import COOKING
from tests.serving.test_add_expert import MORE, expert_yaml

PORT = 8460
SAIL = MORE["sail"]
THREE = ["toy", "cook", "sail"]
COMMON = [
    "base_model=tiny",
    "train=tiny",
    # the default router (`tuned`), fine-tuned for a few steps only
    "router.finetune.max_steps=6",
    "router.finetune.batch_size=16",
    "router.finetune.warmup_steps=2",
    "router.background=false",
    "router.max_windows_per_expert=150",
    "router.policy=top1",  # a 6-step encoder is not confident enough for the fallback threshold
    f"serve.port={PORT}",
    "serve.pool.torch_threads=1",
    f"experts=[{','.join(THREE)}]",
]
QUERIES = {"toy": TOY_WORDS, "cook": COOKING, "sail": SAIL}

pytestmark = [pytest.mark.serve, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


def ask(client: httpx.Client, url: str, model: str, words: list[str], start: int = 0) -> httpx.Response:
    return client.post(
        f"{url}/chat/completions",
        json={
            "model": model,
            "max_tokens": 3,
            "temperature": 0,
            "messages": [{"role": "user", "content": " ".join(words[start : start + 6])}],
        },
    )


def test_remove_expert_live_with_the_tuned_router(user_conf, tiny_app, tmp_path):
    from experts.data import build_corpus
    from experts.train import train_expert
    from router.model import Router
    from router.train import train_router
    from serving.app import start_server, stop_server

    write_toy_folder(tmp_path / "cook_texts", seed=5, words=COOKING)
    expert_yaml(user_conf, "cook", tmp_path / "cook_texts")
    write_toy_folder(tmp_path / "sail_texts", seed=20, words=SAIL)
    expert_yaml(user_conf, "sail", tmp_path / "sail_texts")
    app = compose(COMMON)
    assert app.router.pipeline == "tuned"  # the default, not a cheaper one
    for slug in THREE:
        sub = compose([*COMMON, f"expert={slug}"])
        build_corpus(sub.expert, sub)
        train_expert(sub, sub.expert, sub.paths.expert_dir(slug), progress=False)
    train_router(app)
    router_dir = app.paths.router_dir
    assert json.loads((router_dir / "router.json").read_text())["pipeline"] == "tuned"

    url = start_server(app)
    statuses: list[int] = []
    picks: list[str] = []
    stop = threading.Event()
    first = threading.Event()

    def background_stream() -> None:
        with httpx.Client(timeout=120) as client:
            i = 0
            while not stop.is_set():
                words = list(QUERIES.values())[i % 3]
                try:
                    reply = ask(client, url, "auto", words, i % 5)
                    statuses.append(reply.status_code)
                    if reply.status_code == 200:
                        picks.append(reply.json()["routing"]["expert"])
                except httpx.HTTPError:
                    statuses.append(-1)
                first.set()
                i += 1

    thread = threading.Thread(target=background_stream, daemon=True)
    try:
        with httpx.Client(timeout=120) as client:
            # Routing through the served tuned router: each domain's words reach its expert.
            for slug, words in QUERIES.items():
                for start in (0, 3):
                    reply = ask(client, url, "auto", words, start)
                    assert reply.status_code == 200, reply.text
                    assert reply.json()["routing"]["expert"] == slug, (slug, reply.json()["routing"])
                    assert reply.headers["X-MoE-Expert"] == slug
            assert ask(client, url, "cook", COOKING).status_code == 200

            thread.start()
            assert first.wait(120)
            done = run_moe("remove-expert", "cook", *COMMON)
            requests_during = len(statuses)
            stop.set()
            thread.join(timeout=120)
            print(done.stdout[-2000:], done.stderr[-2000:])
            print(f"{requests_during} requests during the removal")
            assert done.returncode == 0, done.stderr[-2000:]
            assert "removed 'cook'" in done.stdout and "updated" in done.stdout, done.stdout[-2000:]
            assert (user_conf / "expert" / "cook.yaml.removed").exists()
            assert not (user_conf / "expert" / "cook.yaml").exists()
            assert requests_during >= 3 and set(statuses) == {200}, statuses

            models = {m["id"] for m in client.get(f"{url}/models").json()["data"]}
            assert models == {"toy", "sail", "auto", "base"}
            retrained = Router.load(router_dir, ["toy", "sail"], downloads=app.paths.downloads_dir)
            assert retrained.pipeline == "tuned" and "cook" not in retrained.classes
            for slug, words in QUERIES.items():
                reply = ask(client, url, "auto", words)
                assert reply.status_code == 200, reply.text
                routing = reply.json()["routing"]
                assert "cook" not in routing["experts"], routing
                if slug != "cook":
                    assert routing["expert"] == slug, (slug, routing)
            route = client.post(f"{url}/route", json={"text": " ".join(COOKING[:8])}).json()
            assert "cook" not in route["experts"], route
            forced = ask(client, url, "cook", COOKING)
            assert forced.status_code == 404, forced.text
            error = forced.json()["error"]
            assert "unknown expert 'cook'" in error["message"] and "'sail'" in error["message"], error
    finally:
        stop.set()
        stop_server()
