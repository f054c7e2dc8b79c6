"""Each model backend against a local server speaking its provider's real wire protocol."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from heddle.errors import LLMBackendError, LLMTimeout
from heddle.llm import complete
from heddle.llm.backends import backend_for_tier
from heddle.testing import free_port
from tests.fake_providers import KINDS, FakeProvider, Reply, settings_for

BACKEND_NAMES = {"anthropic": "anthropic", "openai": "lmstudio", "ollama": "ollama"}


@pytest.fixture(params=KINDS)
def provider(request):
    with FakeProvider(request.param) as p:
        yield p


async def test_a_call_speaks_the_providers_protocol_and_reads_text_and_usage(provider):
    tier, settings = settings_for(provider, model="m-1")
    provider.add(Reply(text="hello there", input_tokens=21, output_tokens=4))
    c = await complete("Say hello", tier=tier, system="Be brief.", max_tokens=50, settings=settings)
    assert (c.text, c.input_tokens, c.output_tokens, c.model) == ("hello there", 21, 4, "m-1")
    assert c.backend == BACKEND_NAMES[provider.kind]
    assert c.data is None and c.calls == 1 and c.attempts == 1
    assert provider.violations == []
    (seen,) = provider.requests
    body = seen.body
    assert body["model"] == "m-1"
    if provider.kind == "anthropic":
        assert seen.headers["anthropic-version"]
        assert seen.headers.get("x-api-key") == "test-key" or seen.headers["authorization"] == "Bearer test-key"
        assert body["max_tokens"] == 50
        assert body["system"] == "Be brief."
        assert body["messages"] == [{"role": "user", "content": "Say hello"}]
    elif provider.kind == "openai":
        assert body["max_tokens"] == 50 and body["stream"] is False
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
        ]
    else:
        assert body["stream"] is False and body["options"]["num_predict"] == 50
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_a_429_is_retried_after_the_wait_its_retry_after_header_asks_for(provider):
    tier, settings = settings_for(provider)
    provider.add(Reply(status=429, error="slow down", headers={"retry-after": "1"}), Reply(text="ok"))
    c = await complete("hi", tier=tier, settings=settings, retries=2)
    assert c.text == "ok" and c.attempts == 2
    first, second = provider.requests
    # Without the header the first backoff would be at most 0.5 s.
    assert second.at - first.at >= 0.9
    assert provider.violations == []


async def test_a_provider_asking_for_a_very_long_wait_fails_at_once(provider):
    tier, settings = settings_for(provider)
    provider.add(Reply(status=429, error="quota exhausted", headers={"retry-after": "3600"}))
    with pytest.raises(LLMBackendError, match="retry after 3600s") as info:
        await complete("hi", tier=tier, settings=settings, retries=3)
    assert info.value.status == 429
    assert len(provider.requests) == 1


async def test_a_500_is_retried_and_persistent_500s_fail_naming_backend_url_and_model(provider):
    tier, settings = settings_for(provider, model="m-500")
    provider.add(Reply(status=500, error="boom"), Reply(text="recovered"))
    assert (await complete("hi", tier=tier, settings=settings, retries=1)).text == "recovered"
    provider.add(Reply(status=500, error="boom again"), Reply(status=503, error="still down"))
    with pytest.raises(LLMBackendError) as info:
        await complete("hi", tier=tier, settings=settings, retries=1)
    message = str(info.value)
    backend = backend_for_tier(tier, settings)
    assert backend.name in message and backend.endpoint in message and "m-500" in message
    assert "HTTP 503" in message and "still down" in message and "gave up after 2 attempt(s)" in message
    assert (info.value.backend, info.value.url, info.value.model) == (backend.name, backend.endpoint, "m-500")
    assert len(provider.requests) == 4


async def test_a_request_past_its_timeout_is_abandoned_retried_and_fails_with_llm_timeout(provider):
    tier, settings = settings_for(provider)
    provider.add(Reply(text="late", delay_s=30), Reply(text="late", delay_s=30))
    with pytest.raises(LLMTimeout, match=r"no reply within timeout_seconds=0\.3") as info:
        await complete("hi", tier=tier, settings=settings, timeout_s=0.3, retries=1)
    assert isinstance(info.value, LLMBackendError)
    # Both attempts were abandoned by closing their connections, not left running.
    provider.wait_for(lambda p: p.hangups == 2, what="both timed-out requests to be closed")
    assert len(provider.requests) == 2


async def test_an_unreachable_server_fails_after_retries_with_its_url(provider):
    tier, settings = settings_for(provider)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    field = {"anthropic": "anthropic_base_url", "openai": "lm_studio_url", "ollama": "ollama_url"}[provider.kind]
    settings = dataclasses.replace(settings, **{field: url})
    with pytest.raises(LLMBackendError, match="cannot connect") as info:
        await complete("hi", tier=tier, settings=settings, retries=1)
    assert url in str(info.value) and "gave up after 2 attempt(s)" in str(info.value)


async def test_a_malformed_response_body_is_a_backend_error_and_is_not_retried(provider):
    tier, settings = settings_for(provider)
    provider.add(Reply(raw=b'{"choices": [ this is not json'))
    with pytest.raises(LLMBackendError) as info:
        await complete("hi", tier=tier, settings=settings, retries=2)
    assert BACKEND_NAMES[provider.kind] in str(info.value)
    assert len(provider.requests) == 1


async def test_cancelling_the_call_closes_its_http_request(provider):
    tier, settings = settings_for(provider)
    provider.add(Reply(hang=True))
    call = asyncio.ensure_future(complete("hi", tier=tier, settings=settings, timeout_s=60))
    await asyncio.to_thread(provider.wait_for, lambda p: len(p.requests) == 1, 20, "the request")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.to_thread(provider.wait_for, lambda p: p.hangups == 1, 20, "the client to hang up")


async def test_anthropic_rejects_a_wrong_key_without_retrying_and_the_error_names_the_variable():
    with FakeProvider("anthropic", api_key="right") as p:
        tier, settings = settings_for(p)
        settings = dataclasses.replace(settings, anthropic_api_key="wrong")
        p.add(Reply(text="never"))
        with pytest.raises(LLMBackendError, match="HTTP 401") as info:
            await complete("hi", tier=tier, settings=settings, retries=3)
        assert "ANTHROPIC_API_KEY" in str(info.value)
        assert len(p.requests) == 1


@pytest.mark.parametrize("streamed", [False, True])
async def test_anthropic_prompt_tokens_read_from_or_written_to_its_prompt_cache_count_as_input(streamed):
    # The Messages API reports cached prompt tokens apart from input_tokens; llama.cpp's
    # endpoint reports a fully cached prompt as input_tokens 0 and the rest as cache reads.
    from heddle.llm.backends.base import ChatRequest
    from tests.test_llm_streaming import Collect

    with FakeProvider("anthropic") as p:
        tier, settings = settings_for(p)
        p.add(Reply(text="hi there", input_tokens=0, cache_read_tokens=12, cache_write_tokens=3,
                    pieces=["hi", " there"]))
        backend = backend_for_tier(tier, settings)
        try:
            reply = await backend.chat(ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                                   stream=Collect() if streamed else None))
        finally:
            await backend.aclose()
        assert reply.text == "hi there" and reply.input_tokens == 15


async def test_an_unknown_ollama_model_says_how_to_pull_it():
    with FakeProvider("ollama") as p:
        tier, settings = settings_for(p, model="llama9")
        p.add(Reply(status=404, error="model 'llama9' not found"))
        with pytest.raises(LLMBackendError, match=r"ollama pull llama9"):
            await complete("hi", tier=tier, settings=settings)
