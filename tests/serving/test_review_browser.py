"""The review page in a real headless browser (Debian chromium driven by Playwright) against a real
uvicorn server: the queue loads, one request is marked misrouted, one corrected; the rows land."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving.trust.querylog import QueryLog
from tests.serving.review_helpers import fill_log, serve_review

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(
        not CHROMIUM.exists() and shutil.which("apt-get") is None,
        reason="needs Debian chromium at /usr/bin/chromium (`make system-deps` installs it) and apt-get is absent",
    ),
]


def test_review_page_in_chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: run `make system-deps` (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (a dev dependency)")
    with QueryLog(tmp_path / "queries.sqlite") as log:
        fill_log(log)
        with serve_review(log) as url, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"{url}/review")
                page.wait_for_selector("body[data-loaded=true]", timeout=10_000)
                cards = page.locator("section.card")
                assert cards.count() == 5
                # lowest confidence first: r4 (0.12) then r1 (0.31)
                assert cards.nth(0).get_attribute("data-request-id") == "r4"
                assert cards.nth(1).get_attribute("data-request-id") == "r1"

                page.fill("#reviewer", "ana")
                page.dispatch_event("#reviewer", "change")
                misrouted = page.locator("section.card[data-request-id=r1]")
                misrouted.locator("select.expert").select_option("unix_man")
                misrouted.locator("button[data-verdict=misrouted]").click()
                page.wait_for_selector("section.card[data-request-id=r1][data-state=saved]", timeout=5_000)
                assert misrouted.locator(".status").inner_text() == "saved: misrouted"

                corrected = page.locator("section.card[data-request-id=r4]")
                corrected.locator("textarea.correction").fill("I only answer questions about my domains.")
                corrected.locator("button[data-verdict=correct]").click()
                page.wait_for_selector("section.card[data-request-id=r4][data-state=saved]", timeout=5_000)
                assert corrected.locator("button[data-verdict=accept]").is_disabled()

                page.click("#reload")  # reviewed requests leave the queue
                page.wait_for_function(
                    "document.querySelectorAll('section.card').length === 3", timeout=5_000
                )
            finally:
                browser.close()
        reviews = log.latest_reviews()
    assert set(reviews) == {"r1", "r4"}
    assert reviews["r1"]["verdict"] == "misrouted" and reviews["r1"]["correct_expert"] == "unix_man"
    assert reviews["r4"]["verdict"] == "correct"
    assert reviews["r4"]["correction"] == "I only answer questions about my domains."
    assert {r["reviewer"] for r in reviews.values()} == {"ana"}
