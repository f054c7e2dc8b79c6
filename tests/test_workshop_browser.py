"""The Workshop in a real headless Chromium (Debian's, driven by Playwright): live results, no XSS.

Screenshots go to tests/artifacts/ (gitignored); docs/img/workshop.png is one of them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from heddle.testing import EmbeddedServers, running_worker
from tests.test_workshop import XSS, make_app, running_workshop, task_name

CHROMIUM = os.environ.get("HEDDLE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists(),
    reason=f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium)",
)


@pytest.fixture
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 800})
            pg.set_default_timeout(15_000)
            yield pg
        finally:
            browser.close()


def test_a_person_tries_a_task_sees_the_result_arrive_live_and_no_script_runs(
    heddle_servers: EmbeddedServers, page: Any
) -> None:
    from playwright.sync_api import expect

    app = make_app(heddle_servers)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with running_worker(app), running_workshop(heddle_servers) as ws:
        page.goto(ws.url + "/")
        expect(page.locator("#live")).to_have_text("live")
        expect(page.locator("#workers")).to_contain_text(app.name)
        page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

        # Try a worker: choose the task, fill in the form, run it; the result arrives without a reload.
        page.click("text=Try a worker")
        page.select_option("select[name=target]", f"task:{app.name}:{task_name(app, 'echo')}")
        expect(page.locator("#run-form textarea[name=args]")).to_be_visible()
        page.fill("#run-form textarea[name=args]", json.dumps([XSS]))
        page.evaluate("window.__marker = 'same page'")
        page.click("#run")
        result = page.locator("#submitted .result").first
        expect(result).to_have_attribute("data-state", "SUCCESS")
        expect(result.locator("pre.value")).to_contain_text("<script>window.__heddle_xss = 1</script>")
        assert page.evaluate("window.__marker") == "same page"  # no reload happened
        assert page.evaluate("window.__heddle_xss") is None  # the payload is text, never run
        page.screenshot(path=str(ARTIFACTS / "try-a-worker.png"), full_page=True)

        # Its task page: arguments, result and timeline, all as text.
        page.click("#submitted a.task-link")
        expect(page.locator("h1")).to_contain_text("Task")
        expect(page.locator("#args")).to_contain_text("<script>")
        expect(page.locator("#timeline")).to_contain_text("succeeded")
        assert page.evaluate("window.__heddle_xss") is None
        assert page.locator("script:not([src])").count() == 0
        page.screenshot(path=str(ARTIFACTS / "task.png"), full_page=True)

        # Back on the overview, the throughput counter has moved.
        page.goto(ws.url + "/")
        expect(page.locator("#ok-per-min")).not_to_have_text("0")
    assert not errors, errors
