"""Replayable token streaming: providers' streaming wire formats, chunks on JetStream, handle.stream().

Real nats-server and valkey-server; each provider is a fake speaking its real
streaming protocol on loopback (tests/fake_providers.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import pytest

import heddle
from heddle import names
from heddle.llm import handle
from heddle.llm.backends import backend_for_tier
from heddle.llm.backends.base import ChatRequest
from heddle.results import AsyncResult
from heddle.testing import aworker
from tests.fake_providers import FakeProvider, Reply, settings_for
from tests.test_llm_local_model import local_model
from tests.test_llm_worker import make_app, write_config

ANSWER = '{"label": "negative"}'
__all__ = ["local_model"]  # a fixture, imported for pytest


class Collect:
    """A sink that keeps what a backend streams, with a mark where each attempt began."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.begins = 0

    def begin(self) -> None:
        self.begins += 1

    async def write(self, text: str) -> None:
        self.parts.append(text)


@pytest.fixture(params=["anthropic", "openai", "ollama"])
def provider(request):
    with FakeProvider(request.param) as p:
        yield p


def client_app(servers):
    return heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url)


async def test_each_provider_streams_in_its_own_wire_format_and_the_reply_is_the_whole_text(provider):
    tier, settings = settings_for(provider, model="fake-model")
    backend = backend_for_tier(tier, settings)
    text = "The quick brown fox\njumps over the lazy dog. "
    provider.add(Reply(text=text, input_tokens=21, output_tokens=9))
    sink = Collect()
    reply = await backend.chat(ChatRequest(messages=[{"role": "user", "content": "go"}], stream=sink))
    await backend.aclose()
    assert provider.violations == []
    (seen,) = provider.requests
    assert seen.body["stream"] is True
    if provider.kind == "openai":
        assert seen.body["stream_options"] == {"include_usage": True}
    assert len(sink.parts) == len(Reply(text=text).split()) > 3
    assert "".join(sink.parts) == reply.text == text
    assert (reply.input_tokens, reply.output_tokens, reply.model) == (21, 9, "fake-model")
    assert reply.stop_reason in ("end_turn", "stop")
    assert sink.begins == 1


async def test_a_stream_cut_off_midway_is_retried_and_the_retry_begins_a_new_reply():
    with FakeProvider("ollama") as p:
        tier, settings = settings_for(p, model="fake-model")
        backend = backend_for_tier(tier, settings)
        p.add(Reply(text="one two three four", cut_after=2), Reply(text="five six"))
        sink = Collect()
        reply = await backend.chat(ChatRequest(messages=[{"role": "user", "content": "go"}], stream=sink,
                                               retries=1))
        await backend.aclose()
    assert reply.text == "five six" and reply.attempts == 2
    assert sink.begins == 2
    assert "".join(sink.parts) == "one two" + "five six"


async def test_a_streaming_yaml_worker_publishes_chunks_that_a_reader_gets_while_the_provider_still_streams(
    tmp_path, heddle_servers, provider
):
    path, name = write_config(tmp_path, stream=True)
    app = make_app(path, provider, heddle_servers)
    held = threading.Event()
    reply = Reply(text=ANSWER, hold=held, hold_after=1, input_tokens=30, output_tokens=8)
    pieces = reply.split()
    provider.add(reply)
    client = client_app(heddle_servers)
    try:
        async with aworker(app, tier=settings_for(provider)[0]):
            r = client.send_task(name, {"text": "The food was cold."})
            chunks = r.astream(timeout=30)
            first = await chunks.__anext__()
            # The provider has sent one piece and holds the rest until told.
            assert provider.pieces_sent == 1
            assert first == pieces[0] and not first.new_reply
            held.set()
            rest = [c async for c in chunks]
            assert await r.aget(timeout=20) == {"label": "negative"}
    finally:
        held.set()
        await client.aclose()
    assert provider.violations == []
    assert provider.requests[0].body["stream"] is True
    got = [first, *rest]
    assert got == pieces
    assert json.loads("".join(got)) == {"label": "negative"}
    assert r.record.meta["input_tokens"] == 30 and r.record.meta["output_tokens"] == 8


async def test_a_reader_that_joins_after_the_task_ended_replays_every_chunk_in_order(tmp_path, heddle_servers):
    with FakeProvider("openai") as p:
        path, name = write_config(tmp_path, stream=True)
        app = make_app(path, p, heddle_servers)
        reply = Reply(text='{"label":   "neutral"}', pieces=['{"la', 'bel":', "   ", '"neu', 'tral"', "}"])
        p.add(reply)
        client = client_app(heddle_servers)
        async with aworker(app, tier="local"):
            r = client.send_task(name, {"text": "It was fine."})
            assert await r.aget(timeout=20) == {"label": "neutral"}
        # A new handle, from sync code, after the worker stopped: every chunk, then the end.
        late = AsyncResult(r.id, client)
        chunks = await asyncio.to_thread(lambda: list(late.stream(timeout=20)))
        again = [c async for c in AsyncResult(r.id, client).astream(timeout=20)]
        await client.aclose()
    assert chunks == again == reply.pieces
    assert all(isinstance(c, str) and c.reply == 1 for c in chunks)


async def test_a_repaired_reply_streams_after_the_first_and_is_marked_as_a_new_reply(tmp_path, heddle_servers):
    with FakeProvider("anthropic") as p:
        path, name = write_config(tmp_path, stream=True, default_model_tier="standard")
        app = make_app(path, p, heddle_servers)
        p.add(Reply(text='{"label": "angry"}'), Reply(text=ANSWER))
        client = client_app(heddle_servers)
        async with aworker(app, tier="standard"):
            r = client.send_task(name, {"text": "The food was cold."})
            chunks = [c async for c in r.astream(timeout=30)]
            assert await r.aget(timeout=20) == {"label": "negative"}
        await client.aclose()
    starts = [i for i, c in enumerate(chunks) if c.new_reply]
    assert len(starts) == 1
    assert "".join(chunks[: starts[0]]) == '{"label": "angry"}'
    assert "".join(chunks[starts[0]:]) == ANSWER
    assert {c.reply for c in chunks} == {1, 2}
    assert len(p.requests) == 2 and all(s.body["stream"] is True for s in p.requests)


async def test_a_worker_that_does_not_stream_sends_a_whole_request_and_its_stream_ends_with_the_task(
    tmp_path, heddle_servers
):
    with FakeProvider("ollama") as p:
        path, name = write_config(tmp_path)
        app = make_app(path, p, heddle_servers)
        p.add(Reply(text=ANSWER))
        client = client_app(heddle_servers)
        async with aworker(app, tier="local"):
            r = client.send_task(name, {"text": "The food was cold."})
            assert [c async for c in r.astream(timeout=30)] == []
            assert await r.aget(timeout=5) == {"label": "negative"}
        await client.aclose()
    assert p.requests[0].body["stream"] is False


async def test_a_call_with_stream_true_streams_from_a_worker_whose_config_does_not(tmp_path, heddle_servers):
    with FakeProvider("openai") as p:
        path, name = write_config(tmp_path)
        app = make_app(path, p, heddle_servers)
        p.add(Reply(text=ANSWER))
        client = client_app(heddle_servers)
        async with aworker(app, tier="local"):
            r = handle(client, name).apply_async({"text": "The food was cold."}, stream=True)
            chunks = [c async for c in r.astream(timeout=30)]
            assert await r.aget(timeout=5) == {"label": "negative"}
        await client.aclose()
    assert p.requests[0].body["stream"] is True
    assert "".join(chunks) == ANSWER and len(chunks) > 1


async def test_a_python_task_streams_complete_and_the_chunks_make_its_result(heddle_app, heddle_servers):
    with FakeProvider("ollama") as p:
        tier, settings = settings_for(p, model="fake-model")
        text = "Seven is prime: it has no divisors but one and itself."
        p.add(Reply(text=text))

        @heddle_app.task
        async def ask() -> str:
            c = await heddle.llm.complete("Is 7 prime?", tier=tier, settings=settings, stream=True)
            return c.text

        async with aworker(heddle_app):
            r = ask.apply_async()
            chunks = [c async for c in r.astream(timeout=30)]
            assert await r.aget(timeout=5) == text
    assert "".join(chunks) == text and len(chunks) == len(Reply(text=text).split())
    await heddle_app.aclose()


async def test_the_token_stream_is_bounded_by_age_and_size_with_the_configured_replicas(heddle_servers):
    from heddle.broker import STREAMS_MAX_AGE_S, STREAMS_MAX_BYTES

    client = client_app(heddle_servers)
    conns = await client.connections()
    info = await conns.broker.stream_info(names.STREAMS_STREAM)
    await client.aclose()
    assert info.config.subjects == ["heddle.streams.*"]
    assert info.config.retention == "limits"
    assert info.config.max_age == STREAMS_MAX_AGE_S > 0
    assert info.config.max_bytes == STREAMS_MAX_BYTES > 0
    assert info.config.num_replicas == 1


def test_heddle_validate_accepts_stream_and_rejects_a_wrong_value_or_a_misspelling_with_a_hint(tmp_path):
    from heddle.llm.config import load_worker_config
    from heddle.validate import validate_file

    good, _ = write_config(tmp_path, name="streamer", stream=True)
    assert validate_file(good).issues == []
    assert load_worker_config(good).stream is True
    plain, _ = write_config(tmp_path, name="plain")
    assert load_worker_config(plain).stream is False
    bad, _ = write_config(tmp_path, name="bad", stream="yes")
    (issue,) = validate_file(bad).issues
    assert "stream" in str(issue) and "must be true or false, got string 'yes'" in str(issue)
    typo, _ = write_config(tmp_path, name="typo", streem=True)
    (issue,) = validate_file(typo).issues
    assert "did you mean 'stream'?" in str(issue)


# -- the embedded local model (llama.cpp's server streams both of its APIs) ------------------


async def test_a_streaming_yaml_worker_on_the_real_embedded_model_streams_the_json_it_returns(
    local_model, heddle_servers
):
    import dataclasses

    from heddle.llm import worker_app
    from heddle.llm.config import load_worker_config
    from heddle.settings import LLMSettings
    from tests.test_llm_local_model import EXAMPLES

    config = load_worker_config(EXAMPLES / "classifier.yaml")
    config = dataclasses.replace(config, name=f"cls{uuid.uuid4().hex[:8]}", stream=True)
    settings = LLMSettings(lm_studio_url=local_model.url, lm_studio_model=local_model.model)
    app = worker_app(config, "local", llm_settings=settings, nats_url=heddle_servers.nats_url,
                     valkey_url=heddle_servers.valkey_url)
    async with aworker(app, tier="local"):
        r = app.send_task(config.name, {"text": "I love this phone. It works great and the battery lasts."})
        chunks = [c async for c in r.astream(timeout=60)]
        result = await r.aget(timeout=5)
    await app.aclose()
    assert len(chunks) > 1
    tail = chunks[max((i for i, c in enumerate(chunks) if c.new_reply), default=0):]
    assert json.loads("".join(tail)) == result  # the reply that was used, as it was written
    assert r.record.meta["output_tokens"] > 0 and r.record.meta["input_tokens"] > 20


async def test_the_anthropic_sdk_backend_streams_from_the_embedded_models_messages_endpoint(local_model):
    from heddle.llm.local_model import MODEL_ALIAS
    from heddle.settings import LLMSettings

    settings = LLMSettings(anthropic_api_key="unused", anthropic_base_url=local_model.url, standard_model=MODEL_ALIAS)
    backend = backend_for_tier("standard", settings)
    sink = Collect()
    reply = await backend.chat(ChatRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
                                           stream=sink))
    await backend.aclose()
    assert reply.text.strip() and "".join(sink.parts) == reply.text and len(sink.parts) > 1
    assert 0 < reply.output_tokens <= 8
    # The prompt's tokens come in message_start, which llama.cpp sends with the first token
    # that completes a character: a reply that opens with an emoji (several byte tokens,
    # sampled at random: the SDK sends no temperature) gets no message_start at all.
    assert reply.input_tokens > 0 or not reply.text[0].isascii(), reply
