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
HANG_MS = 120_000  # a page stuck this long has hung (the machine may be busy: no speed is asserted)

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
    expect = sync_api.expect
    # Every wait below ends when the page reaches the state; the limit only turns a hang into a failure.
    expect.set_options(timeout=HANG_MS)
    with QueryLog(tmp_path / "queries.sqlite") as log:
        fill_log(log)
        with serve_review(log) as url, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(HANG_MS)
                page.goto(f"{url}/review")
                expect(page.locator("body")).to_have_attribute("data-loaded", "true")
                cards = page.locator("section.card")
                expect(cards).to_have_count(5)
                # lowest confidence first: r4 (0.12) then r1 (0.31)
                expect(cards.nth(0)).to_have_attribute("data-request-id", "r4")
                expect(cards.nth(1)).to_have_attribute("data-request-id", "r1")

                page.fill("#reviewer", "ana")
                page.dispatch_event("#reviewer", "change")
                misrouted = page.locator("section.card[data-request-id=r1]")
                misrouted.locator("select.expert").select_option("unix_man")
                misrouted.locator("button[data-verdict=misrouted]").click()
                expect(misrouted).to_have_attribute("data-state", "saved")
                expect(misrouted.locator(".status")).to_have_text("saved: misrouted")

                corrected = page.locator("section.card[data-request-id=r4]")
                corrected.locator("textarea.correction").fill("I only answer questions about my domains.")
                corrected.locator("button[data-verdict=correct]").click()
                expect(corrected).to_have_attribute("data-state", "saved")
                expect(corrected.locator("button[data-verdict=accept]")).to_be_disabled()

                page.click("#reload")  # reviewed requests leave the queue
                expect(cards).to_have_count(3)
                expect(page.locator("section.card[data-request-id=r1]")).to_have_count(0)
                expect(page.locator("section.card[data-request-id=r4]")).to_have_count(0)
            finally:
                browser.close()
        reviews = log.latest_reviews()
    assert set(reviews) == {"r1", "r4"}
    assert reviews["r1"]["verdict"] == "misrouted" and reviews["r1"]["correct_expert"] == "unix_man"
    assert reviews["r4"]["verdict"] == "correct"
    assert reviews["r4"]["correction"] == "I only answer questions about my domains."
    assert {r["reviewer"] for r in reviews.values()} == {"ana"}
