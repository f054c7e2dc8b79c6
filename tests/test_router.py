"""The router: tier precedence, fallback, rule reloads, shared rate limits, dead letters, replay."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import heddle
from heddle import names
from heddle.registry import Registry
from heddle.router import Router
from heddle.rules import RateLimit, RouterRules, RulesError, load_rules, parse_rate, parse_rules
from heddle.testing import aworker, running_worker
from tests.conftest import ROOT, dead_letters, wait_for


def _router_with(rules: RouterRules, tiers: dict[str, set[str]], defaults: dict[str, str]) -> Router:
    """A router whose worker registry holds the given live tiers (no servers needed to decide)."""
    router = Router(heddle.Heddle("decide"), rules=rules)
    registry = Registry.__new__(Registry)
    registry.tiers = {k: frozenset(v) for k, v in tiers.items()}
    registry.default_tier = defaults
    router.registry = registry
    return router


@pytest.mark.parametrize(
    ("rules", "tiers", "requested", "expected_tier", "reason"),
    [
        # rule override > requested > worker default
        (RouterRules(tier_overrides={"summ": "local"}), {"summ": {"*"}}, "frontier", "local", "rule override"),
        (RouterRules(), {"summ": {"*"}}, "frontier", "frontier", "requested by task"),
        (RouterRules(), {"summ": {"local"}}, None, "local", "worker default"),
        # fallback in order when the chosen tier has no live worker
        (RouterRules(fallback={"local": ("frontier", "standard")}), {"summ": {"standard"}}, "local",
         "standard", "fallback to standard (no local worker alive)"),
        (RouterRules(fallback={"local": ("standard",)}), {"summ": {"frontier"}}, "local", None,
         "no worker alive for 'summ' at tier local or standard"),
        (RouterRules(), {"summ": {"local"}}, "standard", None, "no worker alive for 'summ' at tier standard"),
        (RouterRules(), {}, None, None, "unknown worker type 'summ'"),
        # an override also goes through fallback
        (RouterRules(tier_overrides={"summ": "frontier"}, fallback={"frontier": ("standard",)}),
         {"summ": {"standard"}}, "local", "standard", "rule override: frontier, fallback to standard"),
    ],
)
def test_tier_precedence_and_fallback(rules, tiers, requested, expected_tier, reason):
    router = _router_with(rules, tiers, {"summ": "local"})
    route = router.resolve("summ", requested)
    assert route.tier == expected_tier
    assert reason in route.reason
    if expected_tier:
        assert route.subject == f"heddle.tasks.summ.{expected_tier}"
    assert router.resolve("summ", requested) is route  # decided once, then cached


def test_rule_files_report_every_error_with_its_line(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        "tier_overrides:\n  summarizer: huge\nrate_limits:\n  workers:\n"
        "    extractor: {rate: often, burst: 0}\nfallback:\n  local: standard\nextra: 1\n"
    )
    with pytest.raises(RulesError) as info:
        load_rules(bad)
    lines = [str(i) for i in info.value.issues]
    assert lines == [
        f"{bad}:2: tier_overrides.summarizer: 'huge' is not a tier; use one of local, standard, frontier",
        f"{bad}:5: rate_limits.workers.extractor.rate: rate 'often' is not like '10/s', '60/m' or '100/h'",
        f"{bad}:5: rate_limits.workers.extractor.burst must be a whole number >= 1, got '0'",
        f"{bad}:7: fallback.local must be a list of tiers, e.g. [standard]",
        f"{bad}:8: unknown key 'extra'; expected one of tier_overrides, rate_limits, fallback, "
        "unknown_worker_grace_seconds",
    ]
    with pytest.raises(RulesError, match="not valid YAML"):
        parse_rules("a: [", "x.yaml")
    assert parse_rate("60/m") == 1.0 and parse_rate("5/s") == 5.0 and parse_rate("3600/h") == 1.0
    ok = parse_rules("rate_limits:\n  tiers:\n    standard: {rate: 60/m, burst: 10}\n")
    assert ok.tier_limits["standard"] == RateLimit(1.0, 10, "delay")


def _tier_app(servers) -> heddle.Heddle:
    app = heddle.Heddle(f"r{uuid.uuid4().hex[:8]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url)

    @app.task(name="where")
    def where() -> str:
        return heddle.current_task().tier

    return app


async def test_a_rule_file_change_takes_effect_without_restart(heddle_servers, tmp_path):
    app = _tier_app(heddle_servers)
    rules = tmp_path / "router_rules.yaml"
    rules.write_text(f"tier_overrides:\n  {app.name}: local\n")
    router = Router(app, rules_path=rules)
    async with aworker(app, tier="local", router=False), aworker(app, tier="standard", router=False):
        runner = asyncio.ensure_future(router.run())
        await router.ready.wait()
        try:
            r = app.send_task("where", tier="standard")
            assert await r.aget(timeout=10) == "local"
            assert (await r._fetch())[1].meta["route"]["reason"] == "rule override"
            rules.write_text(f"tier_overrides:\n  {app.name}: standard\n")

            async def routed_to_standard() -> bool:
                res = app.send_task("where")
                return await res.aget(timeout=10) == "standard"

            deadline = time.monotonic() + 20
            while not await routed_to_standard():
                assert time.monotonic() < deadline, "the new rules never took effect"
            # A broken edit keeps the rules that work.
            rules.write_text("tier_overrides: [\n")
            assert router.reload() is False
            assert router.rules.tier_overrides == {app.name: "standard"}
        finally:
            router.request_stop()
            await runner
    await app.aclose()


async def test_an_unknown_worker_type_is_dead_lettered_and_its_result_fails(heddle_servers):
    app = heddle.Heddle(f"u{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url)
    router = Router(app, rules=RouterRules(unknown_worker_grace_s=0.5))
    runner = asyncio.ensure_future(router.run())
    await router.ready.wait()
    try:
        ghost = f"ghost{uuid.uuid4().hex[:6]}"
        r = app.send_task("anything", ({"x": 1},), worker_type=ghost)
        with pytest.raises(heddle.TaskError, match=f"unknown worker type '{ghost}'") as info:
            await r.aget(timeout=15)
        assert info.value.type_name == "heddle.Unroutable"
        letters = await dead_letters(heddle_servers.nats_url)
        mine = [h for h, _ in letters if h.get(names.HDR_TASK_ID) == r.id]
        assert len(mine) == 1
        assert "unroutable after 0.5s" in mine[0][names.HDR_REASON]
        assert mine[0][names.HDR_WORKER_TYPE] == ghost
    finally:
        router.request_stop()
        await runner
        await app.aclose()


async def test_over_limit_tasks_are_dead_lettered_when_the_rule_says_so(heddle_servers):
    app = heddle.Heddle(f"d{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url)

    @app.task(name="cheap")
    def cheap(i: int) -> int:
        return i

    rules = RouterRules(worker_limits={app.name: RateLimit(0.01, 3, "dead_letter")})
    router = Router(app, rules=rules)
    async with aworker(app, router=False):
        runner = asyncio.ensure_future(router.run())
        await router.ready.wait()
        try:
            results = [cheap.apply_async((i,)) for i in range(6)]
            outcomes = []
            for r in results:
                try:
                    outcomes.append(await r.aget(timeout=15))
                except heddle.TaskError as exc:
                    outcomes.append(exc.remote_message)
            passed = [o for o in outcomes if isinstance(o, int)]
            rejected = [o for o in outcomes if isinstance(o, str)]
            assert len(passed) == 3
            assert len(rejected) == 3
            assert all("rate limit exceeded" in o and "on_limit: dead_letter" in o for o in rejected)
        finally:
            router.request_stop()
            await runner
    await app.aclose()


def _start_router(rules: Path | None, servers, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "heddle", "router", *(["--rules", str(rules)] if rules else [])]
    env = {**os.environ, "NATS_URL": servers.nats_url, "VALKEY_URL": servers.valkey_url, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as f:
        return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)


def _wait_router(log: Path, proc: subprocess.Popen[bytes]) -> None:
    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        return "router consuming" in log.read_text()

    wait_for(up, 30, "the router to start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_two_routers_share_one_rate_limit_and_deliver_everything(heddle_servers, tmp_path):
    app = heddle.Heddle(f"l{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url)
    stamps: list[float] = []
    lock = threading.Lock()

    @app.task(name="limited")
    def limited(i: int) -> int:
        with lock:
            stamps.append(time.monotonic())
        return i

    rules = tmp_path / "rules.yaml"
    rules.write_text(f"rate_limits:\n  workers:\n    {app.name}: {{rate: 10/s, burst: 5}}\n")
    routers = [_start_router(rules, heddle_servers, tmp_path / f"router{i}.log") for i in range(2)]
    try:
        for i, p in enumerate(routers):
            _wait_router(tmp_path / f"router{i}.log", p)
        with running_worker(app, concurrency=16, router=False):
            n = 80
            results = [limited.delay(i) for i in range(n)]
            assert [r.get(timeout=60) for r in results] == list(range(n))
        stamps.sort()
        start = stamps[0]
        in_5s = sum(1 for t in stamps if t - start < 5.0)
        # Two replicas, one shared bucket: at most 10/s plus the burst of 5.
        assert in_5s <= 10 * 5 + 5, in_5s
        assert len(stamps) == n  # over-limit tasks were delayed, not dropped
        texts = [(tmp_path / f"router{i}.log").read_text() for i in range(2)]
        assert all("router consuming" in t for t in texts)
    finally:
        for p in routers:
            _stop(p)
        app.close()


def test_a_killed_router_loses_nothing(heddle_servers, tmp_path):
    app = heddle.Heddle(f"k{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url, ack_wait_s=2)

    @app.task(name="noop")
    def noop(i: int) -> int:
        return i

    first = _start_router(None, heddle_servers, tmp_path / "a.log")
    try:
        _wait_router(tmp_path / "a.log", first)
        with running_worker(app, concurrency=32, router=False) as worker:
            n = 1500
            results = [noop.delay(i) for i in range(n)]
            wait_for(lambda: worker.stats["received"] > 50, 30, "routing to be under way")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            second = _start_router(None, heddle_servers, tmp_path / "b.log")
            try:
                assert [r.get(timeout=60) for r in results] == list(range(n))
            finally:
                _stop(second)
    finally:
        _stop(first)
        app.close()


def test_a_replayed_dead_letter_runs_once_more_and_a_second_replay_does_nothing(heddle_app, heddle_servers):
    from heddle.dlq import list_dead_letters, replay

    attempts = []
    healed = threading.Event()

    @heddle_app.task
    def fragile(x: int) -> int:
        attempts.append(x)
        if not healed.is_set():
            raise RuntimeError("dependency down")
        return x * 10

    with running_worker(heddle_app):
        r = fragile.delay(4)
        with pytest.raises(heddle.TaskError, match="dependency down"):
            r.get(timeout=10)
        healed.set()

        async def do_replay() -> tuple[str, str]:
            letters = [d for d in await list_dead_letters(heddle_app) if d.task_id == r.id]
            assert len(letters) == 1
            first = await replay(heddle_app, letters[0].id, by="tester@ci")
            second = await replay(heddle_app, letters[0].id, by="tester@ci")
            await heddle_app.aclose()
            return first, second

        first, second = asyncio.run(do_replay())
        assert "replayed dead letter" in first and "by tester@ci" in first
        assert "already replayed" in second
        wait_for(lambda: heddle_app.AsyncResult(r.id).state == heddle.SUCCESS, 15, "the replayed task")
        assert heddle_app.AsyncResult(r.id).get(timeout=5) == 40
    assert attempts == [4, 4]


def test_the_dlq_command_lists_shows_and_replays(heddle_servers, tmp_path):
    env = {**os.environ, "NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url,
           "COLUMNS": "250"}
    app = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url)

    @app.task(name="sad")
    def sad() -> None:
        raise ValueError("sad path")

    with running_worker(app):
        r = sad.delay()
        with pytest.raises(heddle.TaskError):
            r.get(timeout=10)
    app.close()

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "heddle", "dlq", *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout + out.stderr

    listing = cli("list", "--limit", "500")
    row = next(line for line in listing.splitlines() if r.id in line)
    dl_id = row.split("│")[1].strip()
    shown = cli("show", dl_id)
    assert f"Heddle-Task-Id: {r.id}" in shown and "sad path" in shown and "'task': 'sad'" in shown
    assert "replayed dead letter" in cli("replay", dl_id)
    assert "already replayed" in cli("replay", dl_id)


def test_the_example_rules_file_is_valid():
    rules = load_rules(ROOT / "configs" / "router_rules.example.yaml")
    assert rules.tier_overrides == {"summarizer": "local"}
    assert rules.fallback == {"local": ("standard",)}
    assert rules.worker_limits["extractor"] == RateLimit(5.0, 5, "delay")


def test_a_client_that_replays_its_own_task_keeps_working(heddle_app, heddle_servers):
    """Two result notices for one watched task id must not break the client's connection."""
    from heddle.dlq import list_dead_letters, replay

    healed = threading.Event()

    @heddle_app.task
    def flaky_once(x: int) -> int:
        if not healed.is_set():
            raise RuntimeError("first time fails")
        return x

    with running_worker(heddle_app):

        async def scenario() -> int:
            r = flaky_once.apply_async((5,))
            await r.sent()
            # Not r.aget(): its notice subscription stays open, so the replay's
            # second notice reaches it.
            probe = heddle_app.AsyncResult(r.id)
            deadline = time.monotonic() + 15
            while await probe.astate() != heddle.FAILURE:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            healed.set()
            letter = next(d for d in await list_dead_letters(heddle_app) if d.task_id == r.id)
            await replay(heddle_app, letter.id)
            again = heddle_app.AsyncResult(r.id)
            deadline = time.monotonic() + 15
            while await again.astate() != heddle.SUCCESS:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            # The same connection still sends and receives.
            value = await flaky_once.apply_async((6,)).aget(timeout=10)
            await heddle_app.aclose()
            return value

        assert asyncio.run(scenario()) == 6


async def test_sighup_reloads_the_rules(heddle_servers, tmp_path):
    rules = tmp_path / "router_rules.yaml"
    rules.write_text("tier_overrides:\n  summarizer: local\n")
    app = heddle.Heddle(f"h{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url)
    router = Router(app, rules_path=rules, watch_rules=False)  # only SIGHUP can reload
    runner = asyncio.ensure_future(router.run())
    await router.ready.wait()
    try:
        rules.write_text("tier_overrides:\n  summarizer: frontier\n")
        assert router.rules.tier_overrides == {"summarizer": "local"}  # not watched: unchanged
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while router.rules.tier_overrides != {"summarizer": "frontier"}:
            assert time.monotonic() < deadline, "SIGHUP did not reload the rules"
            await asyncio.sleep(0.02)
    finally:
        router.request_stop()
        await runner
        await app.aclose()
