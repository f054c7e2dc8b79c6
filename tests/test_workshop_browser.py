"""The Workshop in a real headless Chromium (Debian's, driven by Playwright): live results, no XSS.

Screenshots go to tests/artifacts/ (gitignored); docs/img/workshop.png is one of them.
"""

from __future__ import annotations

import json
from typing import Any

from heddle.testing import EmbeddedServers, running_worker
from tests.workshop_support import (
    ARTIFACTS,
    XSS,
    choose_target,
    make_app,
    needs_chromium,
    page,
    running_workshop,
    task_name,
)

pytestmark = needs_chromium
__all__ = ["page"]  # a fixture, imported for pytest


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
        choose_target(page, f"task:{app.name}:{task_name(app, 'echo')}")
        expect(page.locator("#run-form textarea[name=args]")).to_be_visible()
        # Bad arguments are refused with a message on the page.
        page.fill("#run-form textarea[name=args]", "[1,")
        page.click("#run")
        expect(page.locator("#submitted .problem")).to_contain_text("arguments must be a JSON list")
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


def test_the_overview_chart_shows_its_axes_and_units_inside_the_chart(
    heddle_servers: EmbeddedServers, page: Any
) -> None:
    from playwright.sync_api import expect

    app = make_app(heddle_servers)
    with running_worker(app), running_workshop(heddle_servers) as ws:
        page.goto(ws.url + "/")
        chart = page.locator("svg#throughput")
        expect(chart.locator(".axis.x text.title")).to_have_text("time (minutes ago)")
        expect(chart.locator(".axis.y text.title")).to_have_text("tasks / 10 s")
        box = chart.bounding_box()
        assert box is not None
        labels = chart.locator(".axis text")
        assert labels.count() >= 9  # six minute ticks, two or three y ticks, two titles
        for i in range(labels.count()):
            b = labels.nth(i).bounding_box()
            assert b is not None and b["width"] > 0, labels.nth(i).text_content()
            inside = (box["x"] <= b["x"] and b["x"] + b["width"] <= box["x"] + box["width"]
                      and box["y"] <= b["y"] and b["y"] + b["height"] <= box["y"] + box["height"])
            assert inside, (labels.nth(i).text_content(), b, box)
        chart.screenshot(path=str(ARTIFACTS / "overview-chart.png"))
