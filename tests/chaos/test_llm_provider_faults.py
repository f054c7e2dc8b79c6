"""Chaos 6: a misbehaving LLM provider (a local fake speaking the OpenAI wire
protocol, as LM Studio does) behind a YAML LLM worker: 429 with retry-after,
500s, timeouts, a truncated HTTP body and truncated model JSON. Each task must
be retried exactly as the worker config says (``retries: 2`` per model request,
``timeout_seconds: 1``) and end in the state the policy gives.

The worker runs in-process (``heddle.testing.aworker``) against real servers,
because the fake provider's script must be consumed one task at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest

import heddle
from heddle import names
from heddle.llm import worker_app
from heddle.testing import aworker
from tests.chaos._support import TIMEOUT_S, emit
from tests.conftest import dead_letters
from tests.fake_providers import FakeProvider, Reply, settings_for

pytestmark = pytest.mark.timeout(TIMEOUT_S)

OK = Reply(text='{"label": "positive"}')
HTTP_500 = Reply(status=500, error="internal error")
# (name, script, final state, model requests, error text, least seconds the task must take)
SCENARIOS: list[tuple[str, list[Reply], str, int, str, float]] = [
    ("429_retry_after", [Reply(status=429, error="slow down", headers={"retry-after": "1"}), OK],
     "SUCCESS", 2, "", 1.0),
    ("500_then_ok", [HTTP_500, HTTP_500, OK], "SUCCESS", 3, "", 0.0),
    ("500_exhausted", [HTTP_500, HTTP_500, HTTP_500], "FAILURE", 3, "gave up after 3 attempt(s)", 0.0),
    ("timeout_then_ok", [Reply(text='{"label": "positive"}', delay_s=3), OK], "SUCCESS", 2, "", 1.0),
    ("timeouts_exhausted", [Reply(hang=True), Reply(hang=True), Reply(hang=True)], "FAILURE", 3,
     "no reply within timeout_seconds=1", 3.0),
    ("truncated_body", [Reply(raw=b'{"id": "x", "choices": [{"message": {"content": "{\\"lab')], "FAILURE", 1,
     "not JSON", 0.0),
    ("truncated_model_json", [Reply(text='{"label": "posi'), OK], "SUCCESS", 2, "", 0.0),
    ("429_retry_after_too_long", [Reply(status=429, error="quota", headers={"retry-after": "3600"})], "FAILURE", 1,
     "not waiting that long", 0.0),
]


@pytest.fixture
def provider():
    with FakeProvider("openai") as p:
        yield p


async def test_provider_faults_end_in_the_states_the_retry_policy_gives(tmp_path, fresh_servers, provider):
    began = time.monotonic()
    name = f"chaosllm{uuid.uuid4().hex[:6]}"
    config = {
        "name": name,
        "system_prompt": "Label the sentiment.",
        "input_schema": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
        "output_schema": {
            "type": "object",
            "required": ["label"],
            "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}},
        },
        "default_model_tier": "local",
        "max_output_tokens": 20,
        "timeout_seconds": 1,
        "retries": 2,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    tier, llm_settings = settings_for(provider, model="fake-8b")
    app = worker_app(path, tier, llm_settings=llm_settings, nats_url=fresh_servers.nats_url,
                     valkey_url=fresh_servers.valkey_url)
    client = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=fresh_servers.nats_url,
                           valkey_url=fresh_servers.valkey_url)
    outcomes: dict[str, dict[str, Any]] = {}
    mismatches: list[str] = []
    failed_ids: dict[str, str] = {}
    try:
        async with aworker(app, tier="local", concurrency=1):
            for label, script, state, calls, error, least_s in SCENARIOS:
                before = len(provider.requests)
                provider.script.clear()
                provider.add(*script)
                t0 = time.monotonic()
                r = client.send_task(name, {"text": label})
                got = await r.aget(timeout=60, propagate=False)
                took = time.monotonic() - t0
                final = await r.astate()
                made = len(provider.requests) - before
                message = got.remote_message if isinstance(got, heddle.TaskError) else ""
                outcomes[label] = {"state": final, "requests": made, "s": round(took, 2)}
                if final == "FAILURE":
                    failed_ids[r.id] = label
                ok = (
                    final == state
                    and made == calls
                    and error in message
                    and took >= least_s
                    and (state != "SUCCESS" or got == {"label": "positive"})
                )
                if not ok:
                    mismatches.append(f"{label}: {final} after {made} request(s) in {took:.2f}s: {message}")
    finally:
        await client.aclose()
        await app.aclose()
    # The policy's last word on a failure: the dead-letter stream, with the reason.
    # The worker publishes the result notice before the dead letter: wait for it.
    deadline = time.monotonic() + 15
    while True:
        entries = await dead_letters(fresh_servers.nats_url)
        dlq = {h.get(names.HDR_TASK_ID): h.get(names.HDR_REASON, "") for h, _ in entries}
        not_dead = [label for tid, label in failed_ids.items() if not dlq.get(tid)]
        if not not_dead or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    emit(
        "llm_provider_faults",
        dead_lettered=len(failed_ids) - len(not_dead),
        scenarios=outcomes,
        mismatches=len(mismatches),
        protocol_violations=len(provider.violations),
        runtime_s=round(time.monotonic() - began, 1),
    )
    assert not mismatches, mismatches
    assert provider.violations == []
    assert not not_dead, not_dead
