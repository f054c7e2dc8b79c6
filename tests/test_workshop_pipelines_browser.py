"""The Pipelines pages in a real headless Chromium: run a pipeline and watch its stages finish live.

Screenshots go to tests/artifacts/ (gitignored); docs/img/workshop-pipeline.png is one of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from heddle.testing import EmbeddedServers
from tests.test_workshop_pipelines import pipelines_running
from tests.workshop_support import ARTIFACTS, XSS, needs_chromium, page

pytestmark = needs_chromium
__all__ = ["page"]  # a fixture, imported for pytest


def test_a_person_runs_a_pipeline_and_watches_its_stages_complete_without_a_reload(
    heddle_servers: EmbeddedServers, tmp_path: Path, page: Any
) -> None:
    from playwright.sync_api import expect

    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with pipelines_running(heddle_servers, tmp_path, pause_s=2.0) as r:
        page.goto(r.ws.url + "/pipelines")
        page.click("#pipelines a[href='/pipelines/claims']")
        expect(page.locator("#stage-graph g.stage")).to_have_count(4)
        # A problem with the input is said on the page, and nothing is sent.
        page.fill("#pipeline-form textarea[name=input]", '{"text": "One."')
        page.click("#run-pipeline")
        expect(page.locator("#run-problem .problem")).to_contain_text("the input is not JSON")
        assert "/pipelines/runs/" not in page.url
        page.fill("#pipeline-form textarea[name=input]", json.dumps({"text": "One. Two.", "note": XSS}))
        page.click("#run-pipeline")
        page.wait_for_url("**/pipelines/runs/**")
        run = page.locator("#pipeline-run")
        # It lands while the two-second stage is still going, and follows it from there.
        assert run.get_attribute("data-state") != "SUCCESS"
        page.evaluate("window.__marker = 'same page'")
        expect(page.locator("#stage-graph g[data-stage=wait]")).to_have_attribute("data-status", "running")
        page.screenshot(path=str(ARTIFACTS / "pipeline-running.png"), full_page=True)
        expect(run).to_have_attribute("data-state", "SUCCESS", timeout=20_000)
        expect(page.locator("#stage-timings tr[data-stage=never]")).to_have_attribute("data-status", "skipped")
        expect(page.locator("#stage-timings tr[data-stage=wait] td").nth(4)).to_contain_text(" s")
        expect(page.locator("#pipeline-output")).to_contain_text("<script>")
        assert page.evaluate("window.__marker") == "same page"  # updated in place
        assert page.evaluate("window.__heddle_xss") is None
        page.screenshot(path=str(ARTIFACTS / "pipeline-run.png"), full_page=True)
    assert not errors, errors
