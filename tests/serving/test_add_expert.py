"""Adding a seventh expert to a running endpoint: one YAML file, `moe add-expert`, no failed request.

Six user experts (astronomy, cooking, sailing, chess, weather and pottery notes written for the test)
are built, trained and served for real on the tiny base model; then a seventh (gardening) is added
with `add_expert` while a background stream of requests runs. Every request must succeed, and
afterwards gardening queries must reach the new expert.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from experts.config import compose
from serving.manage import add_expert
from tests.conftest import write_toy_folder
from tests.router.test_expert_matrix import COOKING

GARDEN = [
    "compost",
    "mulch",
    "seedling",
    "prune",
    "trellis",
    "perennial",
    "tomato",
    "soil",
    "fertiliser",
    "weeding",
    "hoe",
    "bulb",
    "greenhouse",
    "germinate",
    "rake",
    "hedge",
    "lawn",
]
# Vocabularies of the other user experts (astronomy is tests.conftest.TOY_WORDS, cooking COOKING).
MORE = {
    "sail": [
        "keel",
        "mast",
        "jib",
        "tack",
        "hull",
        "rudder",
        "anchor",
        "starboard",
        "port",
        "gybe",
        "halyard",
    ],
    "chess": ["pawn", "rook", "bishop", "knight", "castling", "gambit", "checkmate", "endgame", "opening"],
    "weather": ["cyclone", "humidity", "isobar", "drizzle", "barometer", "front", "monsoon", "hail", "frost"],
    "pottery": ["kiln", "glaze", "clay", "wheel", "slip", "bisque", "stoneware", "porcelain", "throwing"],
}
PORT = 8141
COMMON = [
    "base_model=tiny",
    "train=tiny",
    "router=tfidf",
    "router.background=false",
    "router.max_windows_per_expert=300",
    f"serve.port={PORT}",
    "serve.pool.torch_threads=1",
]

pytestmark = [pytest.mark.serve, pytest.mark.integration]


def expert_yaml(conf, slug: str, folder) -> None:
    (conf / "expert" / f"{slug}.yaml").write_text(
        f"# @package _global_\nexpert:\n  name: {slug}\n  description: {slug} notes written for the tests.\n"
        f"  data:\n    source: folder\n    path: {folder}\n    split: [0.6, 0.2, 0.2]\n"
        f"  examples: ['{' '.join(GARDEN[:6])}']\n"
    )


def test_add_expert_live_without_failed_requests(user_conf, tiny_app, tmp_path):
    from experts.data import build_corpus
    from experts.train import train_expert
    from router.train import train_router
    from serving.app import start_server, stop_server

    write_toy_folder(tmp_path / "cook_texts", seed=5, words=COOKING)
    expert_yaml(user_conf, "cook", tmp_path / "cook_texts")
    for i, (slug, words) in enumerate(MORE.items()):
        write_toy_folder(tmp_path / f"{slug}_texts", seed=20 + i, words=words)
        expert_yaml(user_conf, slug, tmp_path / f"{slug}_texts")
    six = ["toy", "cook", *MORE]
    overrides = [*COMMON, f"experts=[{','.join(six)}]"]
    app = compose(overrides)
    for slug in six:
        sub = compose([*overrides, f"expert={slug}"])
        build_corpus(sub.expert, sub)
        train_expert(sub, sub.expert, sub.paths.expert_dir(slug), progress=False)
    train_router(app)

    url = start_server(app)
    root = url.removesuffix("/v1")
    statuses: list[int] = []
    stop = threading.Event()

    def background_stream() -> None:
        with httpx.Client(timeout=120) as client:
            i = 0
            while not stop.is_set():
                words = COOKING if i % 2 else GARDEN
                body = {
                    "model": "auto",
                    "max_tokens": 3,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": " ".join(words[i % 5 : i % 5 + 6])}],
                }
                try:
                    statuses.append(client.post(f"{url}/chat/completions", json=body).status_code)
                except httpx.HTTPError:
                    statuses.append(-1)
                i += 1

    thread = threading.Thread(target=background_stream, daemon=True)
    try:
        thread.start()
        write_toy_folder(tmp_path / "garden_texts", seed=9, words=GARDEN)
        expert_yaml(user_conf, "garden", tmp_path / "garden_texts")
        started = time.perf_counter()
        result = add_expert(app, "garden", overrides, endpoint=root)
        took = time.perf_counter() - started
        time.sleep(2)  # a few requests after the swap, too
        stop.set()
        thread.join(timeout=120)
        print(f"add-expert took {took:.1f} s; {len(statuses)} requests during the update")
        assert "updated" in result["endpoint"], result["endpoint"]
        assert len(statuses) >= 3 and set(statuses) == {200}, statuses
        models = {m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]}
        assert models == {"garden", *six, "auto", "base"}
        reply = httpx.post(
            f"{url}/chat/completions",
            timeout=120,
            json={
                "model": "auto",
                "max_tokens": 3,
                "messages": [{"role": "user", "content": " ".join(GARDEN[3:10])}],
            },
        )
        assert reply.status_code == 200 and reply.json()["routing"]["expert"] == "garden"
        assert reply.headers["X-MoE-Expert"] == "garden"
        forced = httpx.post(
            f"{url}/chat/completions",
            timeout=120,
            json={"model": "garden", "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]},
        )
        assert forced.status_code == 200 and forced.json()["routing"]["decision"] == "forced"
    finally:
        stop.set()
        stop_server()
