"""Token-aware rate limits: tokens_per_minute per tier and worker type (#19 item 6).

Routers charge a task its estimate (its message at ~4 bytes a token, plus its
workers' most output) to shared model-token buckets in Valkey; over-limit tasks
are delayed, never dropped; the worker settles the charge with the usage the
provider reported, and a provider 429 empties the buckets for as long as it asked.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import valkey

import heddle
from heddle.ratelimit import bucket_key
from heddle.router import Router
from heddle.rules import RulesError, parse_rules
from heddle.testing import aworker
from tests.fake_providers import FakeProvider, Reply, settings_for


def test_tokens_per_minute_is_a_limit_of_its_own_or_beside_a_rate():
    rules = parse_rules(
        "rate_limits:\n"
        "  tiers:\n    standard: {rate: 60/m, burst: 10, tokens_per_minute: 40000}\n"
        "  workers:\n    summarizer: {tokens_per_minute: 6000}\n"
    )
    assert rules.tier_limits["standard"].rate_per_s == 1.0
    assert rules.tier_token_limits["standard"].rate_per_s == pytest.approx(40000 / 60)
    assert rules.tier_token_limits["standard"].burst == 40000
    assert "summarizer" not in rules.worker_limits and rules.worker_token_limits["summarizer"].burst == 6000
    # Either kind of limit sends the worker type's tasks through the router.
    assert rules.limited_workers == {"summarizer"} and rules.limited_tiers == {"standard"}


def test_a_bad_or_misspelt_token_limit_names_its_line_and_the_fix():
    with pytest.raises(RulesError) as info:
        parse_rules(
            "rate_limits:\n  tiers:\n"
            "    standard: {tokens_per_minute: lots}\n"
            "    frontier: {token_per_minute: 100}\n"
        )
    text = str(info.value)
    assert "<rules>:3: rate_limits.tiers.standard.tokens_per_minute must be a whole number" in text
    assert "<rules>:4: rate_limits.tiers.frontier: unknown key 'token_per_minute' (did you mean " \
           "'tokens_per_minute'?)" in text


def _bucket(url: str, key: str) -> dict[str, float]:
    client = valkey.Valkey.from_url(url)
    try:
        return {k.decode(): float(v) for k, v in client.hgetall(key).items()}
    finally:
        client.close()


async def test_over_the_token_limit_tasks_wait_and_all_run_and_unused_tokens_come_back(heddle_servers):
    app = heddle.Heddle(f"tok{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url)

    @app.task(name="tok.echo")
    def echo(blob: str) -> int:
        return len(blob)

    # 6,000 tokens a minute: 100 a second, a minute's worth at once. Each task's estimate is
    # ~3,020 tokens (its ~12 KB message at ~4 bytes a token): the second of two waits ~0.5 s.
    rules = parse_rules(f"rate_limits:\n  workers:\n    {app.name}: {{tokens_per_minute: 6000}}\n")
    key = bucket_key("tokens-worker", app.name)
    # Sent before the router runs, so it takes them in one batch.
    sent = [echo.apply_async(("x" * 12000,)) for _ in range(2)]
    await asyncio.gather(*(r.sent() for r in sent))
    router = Router(app, rules=rules)
    async with aworker(app, router=False):
        runner = asyncio.ensure_future(router.run())
        await router.ready.wait()
        try:
            assert [await r.aget(timeout=30) for r in sent] == [12000] * 2  # none dropped
            assert router.stats["delayed"] >= 1
            assert router.stats["dead_lettered"] == 0
        finally:
            router.request_stop()
            await runner
    # A Python task that calls no model used no tokens: every charge came back.
    assert _bucket(heddle_servers.valkey_url, key)["tokens"] >= 6000 - 1
    await app.aclose()


async def test_a_provider_429_empties_the_token_bucket_and_usage_settles_the_estimate(heddle_servers):
    app = heddle.Heddle(f"tok{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url)
    with FakeProvider("anthropic") as provider:
        tier, llm_settings = settings_for(provider)

        @app.task(name="tok.ask")
        async def ask(question: str) -> str:
            c = await heddle.llm.complete(question, tier=tier, settings=llm_settings)
            return c.text

        rules = parse_rules(f"rate_limits:\n  workers:\n    {app.name}: {{tokens_per_minute: 60000}}\n")
        key = bucket_key("tokens-worker", app.name)
        provider.add(Reply(text="first", input_tokens=5000, output_tokens=1000))
        router = Router(app, rules=rules)
        async with aworker(app, router=False):
            runner = asyncio.ensure_future(router.run())
            await router.ready.wait()
            try:
                began = time.monotonic()
                r = ask.apply_async(("How many?",))
                assert await r.aget(timeout=30) == "first"
                took = time.monotonic() - began
                # Charged ~the message's size (no max output for a Python task), settled with the 6,000
                # tokens used: 54,000 left, plus at most what 1,000 tokens a second refilled meanwhile.
                settled = _bucket(heddle_servers.valkey_url, key)["tokens"]
                assert 60000 - 6000 - 100 <= settled <= 60000 - 6000 + 1000 * took + 100
                provider.add(Reply(status=429, error="slow down", headers={"retry-after": "1"}),
                             Reply(text="second", input_tokens=10, output_tokens=10))
                r2 = ask.apply_async(("And now?",))
                assert await r2.aget(timeout=30) == "second"
                record = await asyncio.to_thread(lambda: r2.record)
                assert record is not None and record.meta["rate_limited_s"] == 1.0
                # The 429's second of waiting emptied the bucket: a second's refill in debt, then refilling.
                assert _bucket(heddle_servers.valkey_url, key)["tokens"] <= 0
            finally:
                router.request_stop()
                await runner
    await app.aclose()
