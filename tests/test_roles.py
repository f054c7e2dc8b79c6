"""Least privilege on the bus: ``heddle auth nats`` users against a real nats-server that includes them.

Every refusal the role table promises is tried as its role would try it (a
client forging a result notice, an event or a max-deliveries advisory, deleting
or purging a stream or a consumer, subscribing to every result; a worker pulling
from, acking for, reading or re-creating the router's or the orchestrator's
consumer); each is refused by nats-server, logged by Heddle at WARNING with the
subject, and never reaches the role it would have fooled. Then client, router,
worker and orchestrator, each with nothing but its own role's file, run tasks, a
failing task and a chain end to end, and the operator's commands run as the
workshop role, as does the Workshop itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import heddle
from heddle import names
from heddle.auth import ROLES, inbox_prefix, write_nats_auth
from heddle.broker import Broker
from heddle.router import Router
from heddle.rules import RouterRules
from heddle.settings import AUTH_SETTINGS, Settings
from heddle.testing import EmbeddedNats, EmbeddedValkey, running_actors, running_worker
from heddle.testing.orchestrators import running_orchestrator
from tests.conftest import ROOT

ENV_VARS = ["NATS_URL", "VALKEY_URL", *(var for _, _, var in AUTH_SETTINGS.values())]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def read_env(path: Path) -> dict[str, str]:
    """A ``KEY=value`` file as a dict (comments and blank lines skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


class Bus:
    """A nats-server with ``heddle auth nats``'s users, a valkey-server, and each role's variables."""

    def __init__(self, out: Path, nats: EmbeddedNats, valkey: EmbeddedValkey) -> None:
        self.out, self.nats, self.valkey = out, nats, valkey
        self.env = {role: {**read_env(out / f"{role}.env"), "NATS_URL": nats.url} for role in ROLES}

    def settings(self, role: str) -> dict[str, Any]:
        """``role``'s login as Heddle(...) arguments, taken from its env file alone."""
        env = self.env[role]
        return {"nats_url": self.nats.url, "valkey_url": self.valkey.url, "nats_user": env["NATS_USER"],
                "nats_password": env["NATS_PASSWORD"], "nats_inbox_prefix": env["NATS_INBOX_PREFIX"],
                "direct_routing": env["HEDDLE_DIRECT_ROUTING"] == "1"}

    def app(self, role: str, name: str) -> heddle.Heddle:
        return heddle.Heddle(name, connect_timeout_s=3, **self.settings(role))


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    out = tmp_path_factory.mktemp("auth")
    written = write_nats_auth(out)
    assert {p.name for p in written} == {"nats-auth.conf", *(f"{r}.env" for r in ROLES)}
    # The include as nats-server's config of its own (an include resolves against the config's folder).
    with EmbeddedNats("127.0.0.1", None, None, config=(out / "nats-auth.conf").read_text()) as nats, \
            EmbeddedValkey("127.0.0.1", None, None) as valkey:
        yield Bus(out, nats, valkey)


@pytest.fixture(scope="module")
def streams(bus: Bus) -> None:
    """The streams and the router's and orchestrator's consumers exist, made by their own roles."""

    async def make() -> None:
        for role, durable, subject, stream in (
            ("router", names.ROUTER_CONSUMER, names.INCOMING_SUBJECT, names.TASKS_STREAM),
            ("orchestrator", names.ORCHESTRATOR_CONSUMER, names.GOALS_SUBJECT, names.GOALS_STREAM),
        ):
            async with connected(bus, role) as broker:
                await broker.ensure_streams()
                await broker.ensure_named_consumer(durable, subject, max_deliver=5, stream=stream)

    asyncio.run(make())


class connected:
    """A Broker logged in as ``role`` (async context manager)."""

    def __init__(self, bus: Bus, role: str) -> None:
        self.broker = Broker(Settings.load(connect_timeout_s=3, **{
            k: v for k, v in bus.settings(role).items() if k != "valkey_url"}), f"test-{role}")

    async def __aenter__(self) -> Broker:
        await self.broker.connect()
        return self.broker

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.close()


def violations(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Heddle's WARNING lines about refused permissions (nats-py lowercases the server's text)."""
    return [r.getMessage() for r in caplog.records
            if r.name == "heddle.broker" and r.levelno == logging.WARNING and "permissions violation" in r.getMessage()]


def refused(caplog: pytest.LogCaptureFixture, action: str, subject: str) -> bool:
    """Whether a WARNING says ``action`` (``publish``, ``subscription``) on ``subject`` was refused."""
    return any(f'permissions violation for {action} to "{subject.lower()}"' in v for v in violations(caplog))


async def until(predicate: Any, what: str, timeout_s: float = 5.0) -> None:
    """Wait for ``predicate()`` without blocking the loop (the refusal arrives on it)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def refused_publish(bus: Bus, role: str, subject: str, listener: str, caplog: pytest.LogCaptureFixture) -> None:
    """``role`` publishes on ``subject``: refused, logged at WARNING with the subject, unseen by ``listener``."""
    got: list[str] = []

    async def seen(msg: Any) -> None:
        got.append(msg.subject)

    async with connected(bus, listener) as ear, connected(bus, role) as mouth:
        await ear.subscribe(subject, cb=seen)
        await ear.flush()
        await mouth.publish_core(subject, b"forged")
        await mouth.flush()
        await until(lambda: refused(caplog, "publish", subject), f"a WARNING that publishing to {subject} was refused")
        await asyncio.sleep(0.3)
    assert got == [], f"{listener} received what {role} may not publish"


# -- what a client may not do ------------------------------------------------------------


def test_a_client_cannot_publish_a_result_notice(bus, caplog):
    forged = names.notice_subject(names.NO_SENDER, uuid.uuid4().hex)
    asyncio.run(refused_publish(bus, "client", forged, "orchestrator", caplog))


def test_a_client_cannot_publish_events(bus, caplog):
    asyncio.run(refused_publish(bus, "client", f"{names.TASK_EVENTS_PREFIX}succeeded", "workshop", caplog))


def test_a_client_cannot_publish_a_max_deliveries_advisory(bus, caplog):
    subject = names.MAX_DELIVERIES_ADVISORY.format(stream=names.TASKS_STREAM, consumer="heddle-victim")
    asyncio.run(refused_publish(bus, "client", subject, "worker", caplog))


def test_a_client_cannot_delete_or_purge_streams_or_consumers(bus, streams, caplog):
    async def attempt() -> list[str]:
        denied = []
        async with connected(bus, "client") as broker:
            assert broker.js is not None
            jsm = broker.nc.jetstream(timeout=1)  # type: ignore[union-attr]
            for what, call in (
                ("delete stream", jsm.delete_stream(names.TASKS_STREAM)),
                ("purge stream", jsm.purge_stream(names.TASKS_STREAM)),
                ("delete consumer", jsm.delete_consumer(names.TASKS_STREAM, names.ROUTER_CONSUMER)),
                ("delete goals consumer", jsm.delete_consumer(names.GOALS_STREAM, names.ORCHESTRATOR_CONSUMER)),
            ):
                try:
                    await call
                except Exception:
                    denied.append(what)
        async with connected(bus, "workshop") as admin:  # everything is still there
            await admin.consumer_info(names.TASKS_STREAM, names.ROUTER_CONSUMER)
            await admin.consumer_info(names.GOALS_STREAM, names.ORCHESTRATOR_CONSUMER)
        return denied

    assert asyncio.run(attempt()) == ["delete stream", "purge stream", "delete consumer", "delete goals consumer"]
    for api in (f"STREAM.DELETE.{names.TASKS_STREAM}", f"STREAM.PURGE.{names.TASKS_STREAM}",
                f"CONSUMER.DELETE.{names.TASKS_STREAM}.{names.ROUTER_CONSUMER}"):
        assert refused(caplog, "publish", f"$JS.API.{api}"), api


def test_a_client_cannot_subscribe_to_all_results(bus, caplog):
    async def attempt() -> list[str]:
        got: list[str] = []

        async def seen(msg: Any) -> None:
            got.append(msg.subject)

        async with connected(bus, "client") as spy, connected(bus, "worker") as worker:
            await spy.subscribe(f"{names.RESULT_SUBJECT_PREFIX}>", cb=seen)
            await spy.subscribe(f"{names.RESULT_SUBJECT_PREFIX}*", cb=seen)
            await spy.flush()
            await worker.publish_core(names.notice_subject(names.NO_SENDER, uuid.uuid4().hex), b"a result")
            await worker.flush()
            await until(lambda: refused(caplog, "subscription", "heddle.results.>")
                        and refused(caplog, "subscription", "heddle.results.*"), "both subscriptions refused")
            await asyncio.sleep(0.3)
        return got

    assert asyncio.run(attempt()) == []


def test_a_client_cannot_read_another_roles_replies_or_deliveries(bus, caplog):
    async def attempt() -> None:
        async with connected(bus, "client") as spy:
            await spy.subscribe(f"{inbox_prefix('worker')}.>")
            await spy.subscribe("_INBOX.>")
            await spy.flush()
            await until(lambda: refused(caplog, "subscription", f"{inbox_prefix('worker')}.>")
                        and refused(caplog, "subscription", "_INBOX.>"), "both subscriptions refused")

    asyncio.run(attempt())


# -- what a worker may not do -------------------------------------------------------------


def test_a_worker_cannot_touch_the_routers_or_the_orchestrators_consumer(bus, streams, caplog):
    async def attempt() -> list[str]:
        denied = []
        async with connected(bus, "worker") as broker:
            jsm = broker.nc.jetstream(timeout=1)  # type: ignore[union-attr]
            for stream, durable in ((names.TASKS_STREAM, names.ROUTER_CONSUMER),
                                    (names.GOALS_STREAM, names.ORCHESTRATOR_CONSUMER)):
                for what, call in (
                    ("info", jsm.consumer_info(stream, durable)),
                    ("delete", jsm.delete_consumer(stream, durable)),
                    ("update", broker.ensure_named_consumer(durable, names.INCOMING_SUBJECT, max_deliver=2,
                                                            stream=stream)),
                ):
                    try:
                        await asyncio.wait_for(call, 3)
                    except (Exception, TimeoutError):
                        denied.append(f"{what} {durable}")
            # Pull from and ack for the router's consumer directly, by subject.
            assert broker.nc is not None
            await broker.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{names.TASKS_STREAM}.{names.ROUTER_CONSUMER}",
                                    b'{"batch":1}', reply=f"{inbox_prefix('worker')}.steal")
            await broker.nc.publish(f"$JS.ACK.{names.TASKS_STREAM}.{names.ROUTER_CONSUMER}.1.1.1.1.0", b"+ACK")
            await broker.flush()
            subjects = (f"$JS.API.CONSUMER.MSG.NEXT.{names.TASKS_STREAM}.{names.ROUTER_CONSUMER}",
                        f"$JS.ACK.{names.TASKS_STREAM}.{names.ROUTER_CONSUMER}.1.1.1.1.0",
                        f"$JS.API.CONSUMER.INFO.{names.GOALS_STREAM}.{names.ORCHESTRATOR_CONSUMER}")
            await until(lambda: all(refused(caplog, "publish", s) for s in subjects), "the pull and the ack refused")
        return denied

    assert asyncio.run(attempt()) == [f"{w} {d}" for d in (names.ROUTER_CONSUMER, names.ORCHESTRATOR_CONSUMER)
                                      for w in ("info", "delete", "update")]


def test_a_worker_cannot_hear_the_routers_advisories(bus, caplog):
    async def attempt() -> None:
        async with connected(bus, "worker") as broker:
            advisory = names.MAX_DELIVERIES_ADVISORY.format(stream=names.TASKS_STREAM, consumer=names.ROUTER_CONSUMER)
            await broker.subscribe(advisory)
            await broker.flush()
            await until(lambda: refused(caplog, "subscription", advisory), "the subscription refused")

    asyncio.run(attempt())


# -- every role still does its own work -----------------------------------------------------


def define(app: heddle.Heddle) -> dict[str, Any]:
    @app.task(name="roles.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="roles.fail")
    def fail() -> int:
        raise ValueError("on purpose")

    @app.task(name="roles.stream")
    async def stream(*pieces: str) -> str:
        from heddle.chunks import task_writer

        writer = task_writer()
        assert writer is not None
        writer.begin()
        for piece in pieces:
            await writer.write(piece)
        assert not writer.failed  # the worker role may publish its task's chunks
        return "".join(pieces)

    return {"add": add, "fail": fail, "stream": stream}


@pytest.fixture
def actors(bus: Bus) -> Iterator[dict[str, Any]]:
    """Router, worker and orchestrator, each logged in with its own role's file only."""
    name = f"roles{uuid.uuid4().hex[:8]}"
    apps = {role: bus.app(role, name) for role in ("client", "worker", "router", "orchestrator")}
    for role in ("client", "worker"):
        define(apps[role])
    router = apps["router"]
    try:
        with running_actors(router, lambda: [Router(router, rules=RouterRules(unknown_worker_grace_s=30.0))]), \
                running_worker(apps["worker"], router=False, concurrency=4, grace_s=1), \
                running_orchestrator(apps["orchestrator"]):
            yield apps
    finally:
        for a in apps.values():
            a.close()


def test_client_router_worker_and_orchestrator_do_their_work_with_their_own_credentials_only(bus, actors, caplog):
    client = actors["client"]
    add, fail = client.tasks["roles.add"], client.tasks["roles.fail"]
    assert add.delay(2, 3).get(timeout=30) == 5
    with pytest.raises(heddle.TaskError, match="on purpose"):
        fail.delay().get(timeout=30)
    assert (add.s(1, 2) | add.s(3) | add.s(4)).delay().get(timeout=60) == 10
    assert heddle.group(add.s(i, i) for i in range(3)).delay().get(timeout=60) == [0, 2, 4]
    # Only the client's own result-notice subscriptions were refused (it reads Valkey
    # instead, docs/security.md), said once, not once a task; the actors never hit a permission.
    notices = [v for v in violations(caplog) if 'subscription to "heddle.results.' in v]
    assert len(notices) == 1 and "NATS user 'client'" in notices[0]
    others = [v for v in violations(caplog) if v not in notices]
    assert others == []


def test_the_client_role_hears_its_results_at_once_on_valkey_though_the_bus_gives_it_no_notices(
    bus, actors, monkeypatch
):
    # With the periodic re-read of the store an hour away, a result that arrives came by its notice.
    import heddle.notices
    import heddle.results

    add = actors["client"].tasks["roles.add"]
    assert add.delay(1, 1).get(timeout=30) == 2  # connected, following its channel
    monkeypatch.setattr(heddle.notices, "RECHECK_S", 3600.0)
    monkeypatch.setattr(heddle.results, "RECHECK_S", 3600.0)
    assert add.delay(20, 22).get(timeout=15) == 42

    async def waited() -> int:
        try:
            return await add.apply_async((2, 2)).aget(timeout=15)
        finally:
            await actors["client"].aclose()  # this loop's connections

    assert asyncio.run(waited()) == 4


def test_a_worker_streams_chunks_that_the_client_and_the_workshop_roles_replay(bus, actors, caplog):
    client = actors["client"]
    pieces = ["Once ", "upon ", "a ", "time."]
    r = client.tasks["roles.stream"].delay(*pieces)
    assert [str(c) for c in r.stream(timeout=30)] == pieces
    assert r.get(timeout=30) == "Once upon a time."
    workshop = bus.app("workshop", client.name)
    try:
        assert list(heddle.AsyncResult(r.id, workshop).stream(timeout=30)) == pieces
    finally:
        workshop.close()
    notices = [v for v in violations(caplog) if 'subscription to "heddle.results.' in v]
    assert [v for v in violations(caplog) if v not in notices] == []


def test_the_workshop_serves_its_pages_with_the_workshop_role_only(bus, actors, caplog):
    pytest.importorskip("starlette")
    import httpx

    from heddle.workshop import Workshop

    done = actors["client"].tasks["roles.add"].delay(20, 22)
    assert done.get(timeout=30) == 42
    app = bus.app("workshop", "workshop")
    ws = Workshop(app, port=0, config_dirs=[ROOT / "configs"])
    with running_actors(app, lambda: [ws]):
        paths = ("/", "/tasks", "/dlq", f"/tasks/{done.id}")
        pages = {path: httpx.get(f"{ws.url}{path}", timeout=30) for path in paths}
    app.close()
    for path, page in pages.items():
        assert page.status_code == 200, (path, page.text[:500])
    assert names.ROUTER_CONSUMER in pages["/"].text  # read from JetStream: CONSUMER.LIST
    assert "42" in pages[f"/tasks/{done.id}"].text
    others = [v for v in violations(caplog) if 'subscription to "heddle.results.' not in v]
    assert others == []


def heddle_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.run([sys.executable, "-m", "heddle", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=90)


def test_the_operators_commands_run_as_the_workshop_role_and_preflight_as_any_role(bus, streams):
    env = {**bus.env["workshop"], "VALKEY_URL": bus.valkey.url}
    out = heddle_cli("status", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert names.TASKS_STREAM in out.stdout and "permissions violation" not in out.stdout + out.stderr
    for role in ROLES:
        out = heddle_cli("preflight", "--timeout", "3", env={**bus.env[role], "VALKEY_URL": bus.valkey.url})
        assert out.returncode == 0, role + out.stdout + out.stderr
        assert bus.env[role]["NATS_PASSWORD"] not in out.stdout + out.stderr


def test_heddle_auth_nats_writes_private_files_with_fresh_passwords_each_run(tmp_path):
    out = heddle_cli("auth", "nats", "--out", str(tmp_path / "a"), "--url", "nats://nats:4222", env={})
    assert out.returncode == 0, out.stderr
    first = {r: read_env(tmp_path / "a" / f"{r}.env") for r in ROLES}
    for role, env in first.items():
        assert env["NATS_USER"] == role and env["NATS_INBOX_PREFIX"] == inbox_prefix(role)
        assert env["NATS_URL"] == "nats://nats:4222" and len(env["NATS_PASSWORD"]) >= 40
        assert env["NATS_PASSWORD"] not in out.stdout + out.stderr
        assert (tmp_path / "a" / f"{role}.env").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a" / "nats-auth.conf").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    heddle_cli("auth", "nats", "--out", str(tmp_path / "a"), env={})
    again = {r: read_env(tmp_path / "a" / f"{r}.env")["NATS_PASSWORD"] for r in ROLES}
    assert all(again[r] != first[r]["NATS_PASSWORD"] for r in ROLES)
    assert len(set(again.values())) == len(ROLES)



def test_heddle_auth_nats_with_nkeys_puts_only_public_keys_in_the_include_and_keeps_the_permissions(tmp_path, caplog):
    out = heddle_cli("auth", "nats", "--out", str(tmp_path / "k"), "--nkeys", env={})
    assert out.returncode == 0, out.stderr
    conf = (tmp_path / "k" / "nats-auth.conf").read_text()
    seeds = {r: (tmp_path / "k" / f"{r}.nk").read_text().strip() for r in ROLES}
    assert all(seed.startswith("SU") and seed not in conf for seed in seeds.values())
    assert "password" not in conf.split("authorization", 1)[1]
    env = {r: read_env(tmp_path / "k" / f"{r}.env") for r in ROLES}
    assert all(Path(env[r]["NATS_NKEY"]) == (tmp_path / "k" / f"{r}.nk").resolve() for r in ROLES)

    async def attempt(url: str) -> None:
        settings = {r: dict(nats_url=url, nats_nkey=env[r]["NATS_NKEY"], nats_inbox_prefix=env[r]["NATS_INBOX_PREFIX"])
                    for r in ROLES}
        for role in ROLES:  # each logs in and may ask JetStream for its account
            broker = Broker(Settings.load(connect_timeout_s=3, **settings[role]), f"nkey-{role}")
            await broker.connect()
            try:
                await broker.account_info()
                if role == "client":
                    subject = names.notice_subject(names.NO_SENDER, uuid.uuid4().hex)
                    await broker.publish_core(subject, b"forged")
                    await broker.flush()
                    await until(lambda s=subject: refused(caplog, "publish", s), "the forged notice refused")
            finally:
                await broker.close()

    with EmbeddedNats("127.0.0.1", None, None, config=conf) as nats:
        asyncio.run(attempt(nats.url))


def test_a_worker_with_periodic_schedules_runs_them_with_the_worker_role_only(bus, streams, tmp_path):
    # #18 items 1, 2: the worker role covers the schedules stream, its definitions and tick consumer;
    # the workshop role lists them.
    app_name = f"roles{uuid.uuid4().hex[:8]}"
    log = tmp_path / "beats.log"
    env = {**os.environ, **bus.env["worker"], "VALKEY_URL": bus.valkey.url, "HEDDLE_TEST_APP": app_name,
           "HEDDLE_TEST_LOG": str(log), "PYTHONPATH": str(ROOT)}
    for var in ENV_VARS:
        if var not in bus.env["worker"] and var != "VALKEY_URL":
            env.pop(var, None)
    out = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - handed to the child
    # As deployed: the worker role hosts no router and no orchestrator; a router of its own role routes.
    router = bus.app("router", app_name)
    routing = running_actors(router, lambda: [Router(router, rules=RouterRules(unknown_worker_grace_s=30.0))])
    routing.__enter__()
    proc = subprocess.Popen([sys.executable, "-m", "heddle", "worker", "-A", "tests.apps.periodic", "--quiet",
                             "--no-router", "--no-orchestrator"],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        assert log.exists() and "heartbeat" in log.read_text(), (tmp_path / "worker.log").read_text()
        listed = heddle_cli("schedules", "-A", "tests.apps.periodic",
                            env={**bus.env["workshop"], "VALKEY_URL": bus.valkey.url, "HEDDLE_TEST_APP": app_name,
                                 "PYTHONPATH": str(ROOT)})
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "heartbeat" in listed.stdout and "weekly-report" in listed.stdout
        # Only the notice subscription its sends would wait on is refused (as for a client: results are read
        # from Valkey, docs/security.md); nothing of the schedules is.
        said = [line for line in (tmp_path / "worker.log").read_text().splitlines() if "permissions violation" in line]
        assert all('subscription to "heddle.results.' in line for line in said), said
    finally:
        proc.kill()
        proc.wait(10)
        out.close()
        routing.__exit__(None, None, None)
        router.close()
