"""``/healthz``, ``/readyz`` and ``/metrics``, and ``heddle healthcheck``, against real servers.

Most tests run real ``heddle worker`` processes (``tests.apps.probed``) with
``--health-port`` and talk to them over HTTP, as kubelet and Prometheus do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import heddle
from heddle import names
from heddle.broker import Broker
from heddle.health import HealthServer
from heddle.testing import free_port
from tests.conftest import ROOT, wait_for

PROBED = "tests.apps.probed"


# -- helpers -------------------------------------------------------------------------


def fetch(port: int, path: str) -> tuple[int, Any] | None:
    """(status, JSON body or text) from the health server, or None if it does not answer."""
    try:
        r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5.0)
    except httpx.HTTPError:
        return None
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.status_code, r.json()
    return r.status_code, r.text


def status(port: int, path: str) -> int | None:
    got = fetch(port, path)
    return got[0] if got else None


def problems(port: int, path: str) -> str:
    got = fetch(port, path)
    return "; ".join(got[1]["problems"]) if got and isinstance(got[1], dict) else ""


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heddle", "healthcheck", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "HEDDLE_HEALTH_PORT"},
    )


def probed_env(servers: Any, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": servers.nats_url,
        "VALKEY_URL": servers.valkey_url,
        "HEDDLE_TEST_APP": f"h{uuid.uuid4().hex[:10]}",
        **extra,
    }


@pytest.fixture
def client() -> Iterator[Callable[[dict[str, str]], heddle.Heddle]]:
    """The sending side: an app named like the worker's, closed after the test."""
    apps: list[heddle.Heddle] = []

    def make(env: dict[str, str]) -> heddle.Heddle:
        app = heddle.Heddle(env["HEDDLE_TEST_APP"], nats_url=env["NATS_URL"], valkey_url=env["VALKEY_URL"])
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def start_probed(spawn_worker: Any, env: dict[str, str], *extra: str) -> int:
    """A ``heddle worker`` for tests.apps.probed serving health on a port of its own; wait until ready."""
    port = free_port()
    spawn_worker(PROBED, env, "--health-port", str(port), *extra, ready=False)
    wait_for(lambda: status(port, "/readyz") == 200, 30, "the worker to report ready")
    return port


@contextlib.contextmanager
def loop_thread() -> Iterator[Callable[..., Any]]:
    """An event loop in a thread of its own, like a worker process's; yields ``call(coro)``."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-actors", daemon=True)
    thread.start()

    def call(coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    try:
        yield call
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- readiness -----------------------------------------------------------------------


def test_readiness_turns_ready_only_after_the_worker_has_subscribed(heddle_servers, monkeypatch):
    app = heddle.Heddle(
        f"r{uuid.uuid4().hex[:10]}", nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url
    )
    at_subscribe = threading.Event()
    gate: dict[str, asyncio.Event] = {}
    real_pull_subscribe = Broker.pull_subscribe

    subscribed = threading.Event()

    async def held_pull_subscribe(self: Broker, durable: str, stream: str = names.TASKS_STREAM) -> Any:
        # Hold the worker between "connected, consumer created" and "subscribed".
        at_subscribe.set()
        await gate["open"].wait()
        puller = await real_pull_subscribe(self, durable, stream)
        subscribed.set()
        return puller

    monkeypatch.setattr(Broker, "pull_subscribe", held_pull_subscribe)
    from heddle.worker import Worker

    with loop_thread() as call:

        async def setup() -> tuple[Worker, HealthServer, asyncio.Future[None]]:
            gate["open"] = asyncio.Event()
            worker = Worker(app, concurrency=2, grace_s=2)
            server = HealthServer([worker], port=0, host="127.0.0.1")
            await server.start()
            return worker, server, asyncio.ensure_future(worker.run())

        worker, server, runner = call(setup())
        try:
            assert at_subscribe.wait(20), "the worker never reached its subscription"
            # Connected, streams and consumer created: and still not ready.
            assert worker.conns is not None and worker.conns.broker.connected
            assert status(server.port, "/readyz") == 503
            assert "worker " + app.name + ": not subscribed" in problems(server.port, "/readyz")
            assert status(server.port, "/healthz") == 200

            call(_set(gate["open"]))
            wait_for(lambda: status(server.port, "/readyz") == 200, 20, "readiness after subscribing")
            assert subscribed.is_set(), "ready was reported before the pull subscription existed"
        finally:
            call(_stop(worker, runner, server, app))


async def _set(event: asyncio.Event) -> None:
    event.set()


async def _stop(worker: Any, runner: asyncio.Future[None], server: HealthServer, app: heddle.Heddle) -> None:
    worker.request_stop()
    await asyncio.wait_for(runner, 30)
    await server.stop()
    await app.aclose()


def test_readyz_fails_while_nats_or_valkey_is_down_and_recovers_when_they_return(
    fresh_servers, spawn_worker
):
    env = probed_env(fresh_servers)
    port = start_probed(spawn_worker, env)
    assert healthcheck("--ready", "--port", str(port)).returncode == 0

    fresh_servers.nats.stop()
    wait_for(lambda: status(port, "/readyz") == 503, 20, "/readyz to fail without nats-server")
    said = problems(port, "/readyz")
    # What is wrong, never where the servers are: /readyz is for anyone who can reach the port.
    assert "NATS: not connected to the server" in said and "nats://" not in said
    out = healthcheck("--ready", "--port", str(port))
    assert out.returncode == 1 and "NATS: not connected" in out.stderr
    # A broker outage is no reason to restart the worker: it stays live.
    assert status(port, "/healthz") == 200

    fresh_servers.nats.start()
    wait_for(lambda: status(port, "/readyz") == 200, 30, "/readyz to recover with nats-server")

    fresh_servers.valkey.stop()
    wait_for(lambda: status(port, "/readyz") == 503, 20, "/readyz to fail without valkey-server")
    assert "Valkey:" in problems(port, "/readyz")
    fresh_servers.valkey.start()
    wait_for(lambda: status(port, "/readyz") == 200, 30, "/readyz to recover with valkey-server")


# -- liveness ------------------------------------------------------------------------


def test_a_blocked_event_loop_fails_healthz_until_it_runs_again(heddle_servers, spawn_worker, client, tmp_path):
    env = probed_env(heddle_servers, HEDDLE_TEST_LIVENESS="3")
    port = start_probed(spawn_worker, env)
    assert status(port, "/healthz") == 200
    flag = tmp_path / "release"
    result = client(env).send_task(f"{PROBED}.hog_the_loop", (str(flag),))

    wait_for(lambda: status(port, "/healthz") == 503, 30, "/healthz to fail on the blocked loop")
    assert "the event loop has been blocked" in problems(port, "/healthz")
    out = healthcheck("--port", str(port))
    assert out.returncode == 1 and "blocked" in out.stderr

    flag.touch()
    assert result.get(timeout=30) == "released"
    wait_for(lambda: status(port, "/healthz") == 200, 20, "/healthz to recover")
    assert healthcheck("--port", str(port)).returncode == 0


class _Actor:
    """A bare actor: enough for the health server (no connections, no consumers)."""

    def __init__(self, last_tick: float) -> None:
        self.ready = asyncio.Event()
        self.last_tick = last_tick
        self.actor_kind = "stuck"


def test_a_hung_message_loop_fails_healthz_and_draining_is_live_but_not_ready():
    with loop_thread() as call:
        stale = _Actor(time.monotonic() - 120)  # its loop stopped going round two minutes ago
        fresh = _Actor(time.monotonic() + 3600)

        async def start() -> HealthServer:
            stale.ready.set()
            fresh.ready.set()
            server = HealthServer([stale, fresh], port=0, host="127.0.0.1", liveness_timeout_s=30)
            await server.start()
            return server

        server = call(start())
        try:
            assert status(server.port, "/healthz") == 503
            said = problems(server.port, "/healthz")
            assert "stuck: its message loop last went round" in said and "limit 30s" in said
            assert said.count("stuck:") == 1, "the live actor was reported too"
            assert status(server.port, "/readyz") == 200

            server.mark_draining()
            assert status(server.port, "/healthz") == 200
            assert status(server.port, "/readyz") == 503
            assert "shutting down" in problems(server.port, "/readyz")
        finally:
            call(server.stop())


def test_the_health_server_answers_unknown_paths_and_methods_and_garbage_with_http_errors():
    with loop_thread() as call:
        actor = _Actor(time.monotonic())

        async def start() -> HealthServer:
            server = HealthServer([actor], port=0, host="127.0.0.1")
            await server.start()
            return server

        server = call(start())
        try:
            base = f"http://127.0.0.1:{server.port}"
            r = httpx.get(f"{base}/nope", timeout=5)
            assert r.status_code == 404 and "/healthz" in r.text
            assert httpx.post(f"{base}/healthz", timeout=5).status_code == 405
            assert httpx.head(f"{base}/readyz", timeout=5).status_code == 503  # not ready: never subscribed
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"HELLO\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 400")
        finally:
            call(server.stop())


# -- metrics -------------------------------------------------------------------------


def test_metrics_parse_with_the_prometheus_parser_and_count_tasks_by_task_and_tier(
    heddle_servers, spawn_worker, client, tmp_path
):
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is in the dev extra")
    env = probed_env(heddle_servers)
    port = start_probed(spawn_worker, env, "--concurrency", "1")
    app = client(env)
    model = f"model-{uuid.uuid4().hex[:6]}"
    assert [app.send_task(f"{PROBED}.echo", (n,)).get(timeout=20) for n in (1, 2)] == [1, 2]
    failed = app.send_task(f"{PROBED}.always_fails", (7,))
    assert isinstance(failed.get(timeout=20, propagate=False), heddle.TaskError)
    app.send_task(f"{PROBED}.use_tokens", (model,)).get(timeout=20)

    def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        out = {}
        for family in parser.text_string_to_metric_families(r.text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def value(metrics: dict[Any, float], name: str, **labels: str) -> float | None:
        return metrics.get((name, frozenset(labels.items())))

    wt, tier = env["HEDDLE_TEST_APP"], "standard"
    consumer = {"stream": names.TASKS_STREAM, "consumer": names.consumer_name(wt)}

    # One slot, held: one message in flight and unacked, the next two wait in the consumer.
    flag = tmp_path / "release"
    held = app.send_task(f"{PROBED}.hold_a_slot", (str(flag),))
    wait_for(lambda: value(scrape(), "heddle_tasks_in_flight", actor="worker", worker_type=wt) == 1, 20,
             "the held task to be in flight")
    queued = [app.send_task(f"{PROBED}.echo", (n,)) for n in (3, 4)]
    wait_for(lambda: value(scrape(), "heddle_consumer_pending", **consumer) == 2, 20, "two pending messages")
    m = scrape()
    assert value(m, "heddle_consumer_ack_pending", **consumer) == 1
    assert value(m, "heddle_actor_ready", actor="worker", worker_type=wt) == 1

    flag.touch()
    assert held.get(timeout=20) == "released"
    assert [r.get(timeout=20) for r in queued] == [3, 4]

    m = scrape()
    echo = {"worker_type": wt, "task": f"{PROBED}.echo", "tier": tier}
    fails = {"worker_type": wt, "task": f"{PROBED}.always_fails", "tier": tier}
    assert value(m, "heddle_tasks_received_total", **echo) == 4
    assert value(m, "heddle_tasks_succeeded_total", **echo) == 4
    assert value(m, "heddle_tasks_received_total", **fails) == 2  # the first attempt and its retry
    assert value(m, "heddle_tasks_retried_total", **fails) == 1
    assert value(m, "heddle_tasks_failed_total", **fails) == 1
    assert value(m, "heddle_task_duration_seconds_count", **echo) == 4
    assert value(m, "heddle_task_duration_seconds_bucket", **echo, le="+Inf") == 4
    assert value(m, "heddle_llm_tokens_total", model=model, kind="input") == 10
    assert value(m, "heddle_llm_tokens_total", model=model, kind="output") == 5
    assert value(m, "heddle_tasks_in_flight", actor="worker", worker_type=wt) == 0


async def test_every_llm_call_counts_its_tokens_by_model():
    from heddle.llm import complete
    from heddle.metrics import LLM_TOKENS
    from tests.fake_providers import FakeProvider, Reply, settings_for

    with FakeProvider("anthropic") as provider:
        tier, settings = settings_for(provider)
        model = settings.frontier_model if tier == "frontier" else settings.standard_model
        before = LLM_TOKENS.value((model, "input")), LLM_TOKENS.value((model, "output"))
        provider.add(Reply(text="fine", input_tokens=12, output_tokens=3))
        c = await complete("How are you?", tier=tier, settings=settings)
    assert c.model == model
    assert LLM_TOKENS.value((model, "input")) - before[0] == 12
    assert LLM_TOKENS.value((model, "output")) - before[1] == 3


def test_metric_label_values_are_escaped_so_the_parser_reads_them_back():
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is in the dev extra")
    from heddle import metrics

    registry = metrics.Registry()
    c = registry.counter("weird_total", "Help with a \\ backslash\nand a newline.", ("name",))
    odd = 'quote " backslash \\ newline \n end'
    c.inc((odd,), 2)
    h = registry.histogram("lat_seconds", "Latency.", ("name",), buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe((odd,), v)
    text = metrics.render(registry.families()).decode()
    got = {(s.name, s.labels.get("le")): s.value for f in parser.text_string_to_metric_families(text) for s in f.samples
           if s.labels.get("name") == odd}
    assert got[("weird_total", None)] == 2
    assert [got[("lat_seconds_bucket", le)] for le in ("0.1", "1.0", "+Inf")] == [1, 2, 3]
    assert got[("lat_seconds_count", None)] == 3 and got[("lat_seconds_sum", None)] == pytest.approx(5.55)


def test_a_metric_keeps_at_most_max_series_label_sets():
    from heddle.metrics import OVERFLOW_LABEL, Counter

    c = Counter("tasks_total", "Tasks.", ("task",), max_series=3)
    for n in range(10):
        c.inc((f"garbage-{n}",))
    assert len(c.family().samples) == 4
    assert c.value((OVERFLOW_LABEL,)) == 7
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(("a", "b"))


# -- bad input -----------------------------------------------------------------------


def test_a_taken_health_port_stops_the_worker_with_a_clear_error(heddle_servers, tmp_path):
    env = {**os.environ, **probed_env(heddle_servers), "PYTHONPATH": str(ROOT)}
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "heddle", "worker", "-A", PROBED, "--quiet", "--health-port", str(port)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 2, out.stderr
    assert f"cannot serve /healthz, /readyz and /metrics on 0.0.0.0:{port}" in out.stderr
    assert "HEDDLE_HEALTH_PORT" in out.stderr


def test_bad_health_ports_are_clear_errors():
    out = subprocess.run(
        [sys.executable, "-m", "heddle", "healthcheck"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "HEDDLE_HEALTH_PORT": "eighty"},
    )
    assert out.returncode == 1  # Docker reserves exit code 2 of a HEALTHCHECK
    assert "HEDDLE_HEALTH_PORT must be a TCP port number (0-65535), got 'eighty'" in out.stderr

    out = healthcheck()
    assert out.returncode == 1 and "pass --port or set HEDDLE_HEALTH_PORT" in out.stderr

    out = healthcheck("--port", "99999")
    assert out.returncode == 2 and "must be a TCP port number" in out.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nothing answers there
        out = healthcheck("--port", str(port), "--ready")
    assert out.returncode == 1 and f"nothing listens on 127.0.0.1:{port}" in out.stderr

    with pytest.raises(heddle.ConfigError, match="health_port"):
        heddle.Heddle("x", health_port=70000)

