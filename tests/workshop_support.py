"""What the Workshop's tests share: a Workshop on a free port, an app with tasks, a browser page."""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from heddle import Heddle
from heddle.testing import EmbeddedServers, running_worker
from heddle.workshop import Workshop
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
XSS = "<script>window.__heddle_xss = 1</script>"


@contextlib.contextmanager
def running_workshop(servers: EmbeddedServers, **options: Any) -> Iterator[Workshop]:
    """A Workshop on a free loopback port, on an event loop in a thread of its own."""
    app = Heddle("workshop", nats_url=servers.nats_url, valkey_url=servers.valkey_url)
    options.setdefault("config_dirs", [ROOT / "configs"])
    with serving(Workshop(app, port=0, **options)) as ws:
        yield ws


@contextlib.contextmanager
def serving(ws: Workshop) -> Iterator[Workshop]:
    """Run ``ws`` on an event loop in a thread of its own until the block ends."""
    errors: list[BaseException] = []
    loop = asyncio.new_event_loop()

    def run() -> None:
        try:
            loop.run_until_complete(ws.run())
        except BaseException as exc:
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="workshop", daemon=True)
    thread.start()
    wait_for(lambda: ws.ready.is_set() or errors, 20, "the Workshop to serve")
    if errors:
        raise errors[0]
    try:
        yield ws
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(ws.request_stop)
        thread.join(15)
        assert not thread.is_alive(), "the Workshop did not stop"


def make_app(servers: EmbeddedServers) -> Heddle:
    app = Heddle(f"w{uuid.uuid4().hex[:10]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def echo(text: str) -> str:
        return text

    @app.task
    def boom(text: str) -> None:
        raise ValueError(f"bad input {text}")

    return app


@pytest.fixture
def shop(heddle_servers: EmbeddedServers) -> Iterator[Heddle]:
    """An app with three tasks, its worker running."""
    app = make_app(heddle_servers)
    with running_worker(app):
        yield app
    app.close()


@pytest.fixture
def ws(heddle_servers: EmbeddedServers) -> Iterator[Workshop]:
    with running_workshop(heddle_servers) as w:
        yield w


@pytest.fixture
def client(ws: Workshop) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ws.url, timeout=10) as c:
        yield c


def post(client: httpx.Client, ws: Workshop, url: str, data: dict[str, str]) -> httpx.Response:
    return client.post(url, data=data, headers={"X-CSRF-Token": ws.csrf_token})


def task_name(app: Heddle, short: str) -> str:
    return next(n for n in app.tasks if n == short or n.endswith(f".{short}"))


def submit(client: httpx.Client, ws: Workshop, app: Heddle, task: str, args: str) -> str:
    key = f"task:{app.name}:{task_name(app, task)}"
    wait_for(lambda: html.escape(key) in client.get("/try").text, 10, f"{task} to be offered")
    r = post(client, ws, "/try", {"target": key, "args": args, "kwargs": "{}"})
    assert r.status_code == 200, r.text
    return r.text.split('data-task-id="', 1)[1].split('"', 1)[0]


CHROMIUM = os.environ.get("HEDDLE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists(),
    reason=f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium)",
)


@pytest.fixture
def page() -> Iterator[Any]:
    """A page in headless Chromium (Debian's, driven by Playwright); screenshots go to tests/artifacts/."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 800})
            pg.set_default_timeout(15_000)
            yield pg
        finally:
            browser.close()


def choose_target(page: Any, key: str) -> None:
    """Choose ``key`` on the Try page and wait for its form.

    The page opens with the first target's form already shown; choosing fetches the
    form again (htmx) and swaps it in, so what is typed before the swap is lost.
    Waiting for the form that replaced the one on the page makes typing safe.
    """
    from playwright.sync_api import expect

    page.evaluate("() => { const f = document.querySelector('#run-form'); if (f) { f.dataset.replaced = '1'; } }")
    page.select_option("select[name=target]", key)
    expect(page.locator("#run-form:not([data-replaced])")).to_have_count(1)
