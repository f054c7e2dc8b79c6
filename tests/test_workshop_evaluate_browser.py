"""The Evaluate page in a real headless Chromium: a run fills in live, two runs compared, no XSS.

Screenshots go to tests/artifacts/evaluate.png, evaluate-run.png and evaluate-compare.png;
docs/img/workshop-evaluate.png is one of them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from heddle.testing import EmbeddedServers, running_worker
from tests.test_workshop_evaluate import gated_app
from tests.workshop_support import ARTIFACTS, XSS, needs_chromium, page, running_workshop, task_name

pytestmark = needs_chromium
__all__ = ["page"]  # a fixture, imported for pytest


def suite(city: str) -> str:
    """A suite for the ``hold`` task (it returns its argument): field match, with one exact case."""
    return json.dumps({"name": "people and places", "target": "hold", "match": "field", "cases": [
        {"name": "cold food", "input": [{"label": "negative", "confidence": 0.92}], "expected": {"label": "negative"}},
        {"name": "nested fields", "input": [{"person": {"name": "Ada", "city": "London"}}],
         "expected": {"person.name": "Ada", "person.city": city}},
        {"name": "markup stays text", "input": [{"text": XSS}], "expected": {"text": XSS}},
        {"name": "waits for the gate", "input": ["wait"], "expected": "wait", "match": "exact"},
    ]}, indent=1)


def test_a_person_runs_a_suite_sees_it_fill_in_live_and_compares_two_runs(
    heddle_servers: EmbeddedServers, page: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    gate = threading.Event()
    app = gated_app(heddle_servers, gate)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        with running_worker(app), running_workshop(heddle_servers, eval_db=tmp_path / "e.sqlite3") as ws:
            page.goto(ws.url + "/evaluate")
            expect(page.locator("#live")).to_have_text("live")
            key = f"task:{app.name}:{task_name(app, 'hold')}"
            expect(page.locator(f"select[name=target] option[value='{key}']")).to_have_count(1)

            # First run: one field deliberately wrong, one case held back until the page is open.
            page.fill("textarea[name=suite_json]", suite(city="Paris"))
            page.click("#start")
            expect(page.locator("h1")).to_contain_text("Evaluation run #1")
            page.evaluate("window.__marker = 'same page'")
            expect(page.locator("#progress")).to_have_text("3 of 4 cases done")
            expect(page.locator("#run-state")).to_have_text("running")
            gate.set()  # the last case finishes now, while the page is open
            expect(page.locator("#progress")).to_have_text("4 of 4 cases done")
            expect(page.locator("#run-state")).to_have_text("finished")
            expect(page.locator("#run-score")).to_have_text("0.88")
            expect(page.locator("#cases tr.case-fail")).to_have_count(1)
            expect(page.locator("#cases tr.case-fail")).to_contain_text('✗ person.city: got "London"')
            expect(page.locator("#cases")).to_contain_text("<script>window.__heddle_xss = 1</script>")
            assert page.evaluate("window.__marker") == "same page"  # filled in without a reload
            assert page.evaluate("window.__heddle_xss") is None  # data is text, never run
            page.screenshot(path=str(ARTIFACTS / "evaluate-run.png"), full_page=True)

            # Second run with the expectation fixed, then compare the two from the list.
            page.goto(ws.url + "/evaluate")
            page.fill("textarea[name=suite_json]", suite(city="London"))
            page.click("#start")
            expect(page.locator("#run-state")).to_have_text("finished")
            page.goto(ws.url + "/evaluate")
            expect(page.locator("#runs tbody tr")).to_have_count(2)
            page.screenshot(path=str(ARTIFACTS / "evaluate.png"), full_page=True)
            page.check("#runs input[name=a][value='1']")
            page.check("#runs input[name=b][value='2']")
            page.click("#compare")
            expect(page.locator("h1")).to_have_text("Run #1 (A) against run #2 (B)")
            expect(page.locator("#compare tr[data-case='nested fields'] .verdict")).to_have_text("improved")
            expect(page.locator("#compare tr.verdict-same")).to_have_count(3)
            expect(page.locator("#delta")).to_contain_text("+0.12")
            assert page.evaluate("window.__heddle_xss") is None
            assert page.locator("script:not([src])").count() == 0
            page.screenshot(path=str(ARTIFACTS / "evaluate-compare.png"), full_page=True)
    finally:
        gate.set()
        app.close()
    assert not errors, errors
