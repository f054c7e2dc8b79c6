"""The NATS and Valkey seams: streams and consumers, and error translation."""

from __future__ import annotations

import asyncio
import logging

import pytest

import heddle
from heddle import names
from heddle.broker import Broker
from heddle.connections import Connections
from heddle.settings import Settings
from heddle.store import ResultBackend
from heddle.testing import free_port


async def test_streams_and_consumers_are_created_idempotently_with_explicit_limits(heddle_servers):
    settings = Settings(
        nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url, max_deliver=7, ack_wait_s=4
    )
    broker = Broker(settings)
    await broker.connect()
    try:
        await broker.ensure_streams()
        await broker.ensure_streams()  # a second call (another replica) changes nothing
        durable = await broker.ensure_consumer("idem")
        assert durable == await broker.ensure_consumer("idem")
        info = await broker.js.consumer_info(names.TASKS_STREAM, durable)
        assert info.config.max_deliver == 7
        assert info.config.ack_wait == 4
        assert info.config.filter_subject == "heddle.tasks.idem.*"
        assert info.config.max_ack_pending == settings.max_ack_pending

        # A changed setting updates the existing durable consumer in place.
        broker.settings = settings.with_(max_deliver=9)
        await broker.ensure_consumer("idem")
        info = await broker.js.consumer_info(names.TASKS_STREAM, durable)
        assert info.config.max_deliver == 9

        tasks = await broker.js.stream_info(names.TASKS_STREAM)
        assert tasks.config.retention == "workqueue"
        assert set(tasks.config.subjects) == {"heddle.tasks.incoming", "heddle.tasks.*.*", "heddle.tasks.*.*.*"}
        dlq = await broker.js.stream_info(names.DLQ_STREAM)
        assert dlq.config.subjects == ["heddle.tasks.dead_letter"]
        assert dlq.config.max_msgs == settings.dlq_max_msgs
        assert dlq.config.max_age == settings.dlq_max_age_s
    finally:
        await broker.close()


async def test_an_unreachable_nats_server_is_a_broker_unavailable_error_naming_the_url():
    url = f"nats://127.0.0.1:{free_port()}"
    broker = Broker(Settings(nats_url=url, connect_timeout_s=0.5))
    with pytest.raises(heddle.BrokerUnavailable, match=rf"cannot reach nats-server at {url}.*NATS_URL"):
        await broker.connect()


async def test_an_unreachable_valkey_server_is_a_backend_unavailable_error_naming_the_url():
    url = f"valkey://127.0.0.1:{free_port()}/0"
    backend = ResultBackend(Settings(valkey_url=url, connect_timeout_s=0.5))
    with pytest.raises(heddle.BackendUnavailable, match=rf"cannot reach valkey-server at {url}.*VALKEY_URL"):
        await backend.connect()


def test_sending_without_a_server_fails_at_the_call_site_with_a_clear_error():
    app = heddle.Heddle("offline", nats_url=f"nats://127.0.0.1:{free_port()}", connect_timeout_s=0.5)

    @app.task
    def f() -> None: ...

    with pytest.raises(heddle.BrokerUnavailable, match="cannot reach nats-server"):
        f.delay()
    app.close()


async def test_a_result_store_never_overwrites_a_final_state(heddle_servers):
    from heddle.messages import FAILURE, SUCCESS, ResultRecord
    from heddle.store import StoreRequest, encode_record

    conns = Connections(Settings(nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url), "t")
    await conns.start()
    try:
        first = encode_record(ResultRecord(id="late-1", state=SUCCESS, result=1))
        late = encode_record(ResultRecord(id="late-1", state=FAILURE))
        assert await conns.backend.store(StoreRequest("late-1", SUCCESS, first)) is True
        assert await conns.backend.store(StoreRequest("late-1", FAILURE, late)) is False
        state, record = await conns.backend.read("late-1")
        assert state == SUCCESS and record.result == 1
        claims = await conns.backend.claim_many(["late-1", "fresh-1"], "w")
        assert claims[0].previous_state == SUCCESS and claims[0].final_record
        assert claims[1].previous_state == "" and claims[1].retries == 0
        assert (await conns.backend.read("fresh-1"))[0] == "STARTED"
    finally:
        await conns.close()


async def test_scripts_are_reloaded_after_valkey_forgets_them(heddle_servers):
    conns = Connections(Settings(nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url), "t")
    await conns.start()
    try:
        await conns.backend.client.script_flush()
        claims = await conns.backend.claim_many(["flushed-1"], "w")
        assert claims[0].previous_state == ""
    finally:
        await conns.close()


async def test_a_burst_of_concurrent_result_reads_shares_a_bounded_pool_of_connections(heddle_servers):
    import asyncio

    from heddle.store import _MAX_CONNECTIONS

    backend = ResultBackend(Settings(valkey_url=heddle_servers.valkey_url))
    await backend.connect()
    try:
        assert backend.client is not None
        before = (await backend.client.info("clients"))["connected_clients"]
        reads = await asyncio.gather(*(backend.read(f"no-such-task-{i}") for i in range(400)))
        assert all(state == heddle.PENDING and record is None for state, record in reads)
        after = (await backend.client.info("clients"))["connected_clients"]
        assert after - before <= _MAX_CONNECTIONS
    finally:
        await backend.close()


async def test_publishes_beyond_the_pending_bound_wait_their_turn_and_every_answer_is_read(heddle_servers):
    import asyncio

    from heddle.errors import BrokerError
    from heddle.natsclient import Connection
    from heddle.pubacks import PubAcks

    nc = Connection()
    await nc.connect(heddle_servers.nats_url)
    stream = f"PUBACKS_{free_port()}"
    subject = f"pubacks.{stream.lower()}"
    try:
        await nc.jetstream().add_stream(name=stream, subjects=[subject])
        acks = PubAcks(max_pending=8)
        await acks.start(nc)
        peak = 0

        async def one(i: int) -> object:
            nonlocal peak
            fut = await acks.publish(nc, subject, b"x", {"Nats-Msg-Id": f"m{i}"}, 5.0)
            peak = max(peak, len(acks))
            return await fut

        stored = await asyncio.gather(*(one(i) for i in range(300)))
        assert sorted(a.seq for a in stored) == list(range(1, 301))
        assert {a.stream for a in stored} == {stream} and not any(a.duplicate for a in stored)
        assert peak <= 8
        again = await (await acks.publish(nc, subject, b"x", {"Nats-Msg-Id": "m0"}, 5.0))
        assert again.duplicate and again.seq == 1
        with pytest.raises(BrokerError, match="no stream takes the subject"):
            await (await acks.publish(nc, "pubacks.nobody.stores.this", b"x", None, 5.0))
        acks.close()
    finally:
        await nc.jetstream().delete_stream(stream)
        await nc.close()


async def test_every_consumer_is_listed_past_jetstreams_page_of_256(fresh_servers):
    # `heddle status` and the Workshop's Queues table list them all (a worker type has three,
    # one per priority band: a few dozen worker types pass a page).
    broker = Broker(Settings(nats_url=fresh_servers.nats_url))
    await broker.connect()
    try:
        await broker.ensure_streams()
        made = [f"c{i:03d}" for i in range(300)]
        for name in made:
            await broker.ensure_named_consumer(name, f"heddle.tasks.{name}.standard", max_deliver=5)
        listed = {ci.name for ci in await broker.consumers_info(names.TASKS_STREAM)}
        assert set(made) <= listed
    finally:
        await broker.close()


async def _publish(broker: Broker, how: str, subject: str, payload: bytes, headers: dict, timeout_s: float):
    """Publish the usual way, or queued in the caller's step (``publish_now``): both end alike."""
    if how == "publish":
        return await broker.publish(subject, payload, headers, timeout_s=timeout_s)
    sent = broker.publish_now(subject, payload, headers, timeout_s=timeout_s)
    assert sent is not None
    return await sent


both_ways = pytest.mark.parametrize("how", ["publish", "publish_now"])


@both_ways
async def test_a_publish_no_stream_answers_yet_is_sent_again_and_stored_once_when_one_does(heddle_servers, how):
    # What a client sees while a cluster elects a stream's leader after losing a node:
    # nats-server answers "no responders" for a few seconds, then the stream takes it.
    import asyncio

    import nats

    broker = Broker(Settings(nats_url=heddle_servers.nats_url))
    await broker.connect()
    nc = await nats.connect(heddle_servers.nats_url)
    stream = f"LATE_{free_port()}"
    subject = f"late.{stream.lower()}"
    try:
        sending = asyncio.ensure_future(_publish(broker, how, subject, b"task", {"Nats-Msg-Id": "once"}, 20))
        # The "election": half a second without a stream; a publish that was not sent
        # again would have failed within milliseconds.
        await asyncio.sleep(0.5)
        assert not sending.done(), sending
        await nc.jetstream().add_stream(name=stream, subjects=[subject])
        ack = await asyncio.wait_for(sending, 20)
        assert (ack.stream, ack.seq) == (stream, 1)
        assert (await nc.jetstream().stream_info(stream)).state.messages == 1
    finally:
        await nc.jetstream().delete_stream(stream)
        await nc.close()
        await broker.close()


@both_ways
async def test_a_publish_no_stream_ever_answers_fails_after_its_timeout_saying_why(heddle_servers, how):
    from heddle.errors import BrokerError

    broker = Broker(Settings(nats_url=heddle_servers.nats_url))
    await broker.connect()
    try:
        with pytest.raises(BrokerError, match=r"no stream takes the subject.*no leader.*tried for 0\.5s"):
            await _publish(broker, how, "nobody.stores.this", b"x", {"Nats-Msg-Id": "x"}, 0.5)
    finally:
        await broker.close()


def test_a_request_nats_server_leaves_unanswered_is_not_called_unreachable():
    import nats.errors

    from heddle.natsclient import translate

    said = str(translate(nats.errors.TimeoutError(), "nats://127.0.0.1:4222", "updating stream HEDDLE_TASKS"))
    assert "did not answer in time while updating stream HEDDLE_TASKS" in said
    assert "elected new stream leaders" in said
    assert "cannot reach" not in said


@both_ways
async def test_a_publish_a_core_subscriber_takes_instead_of_a_stream_times_out_saying_so(heddle_servers, how):
    import nats

    from heddle.errors import BrokerError

    broker = Broker(Settings(nats_url=heddle_servers.nats_url))
    await broker.connect()
    nc = await nats.connect(heddle_servers.nats_url)
    try:
        await nc.subscribe("taken.by.core")
        await nc.flush()
        with pytest.raises(BrokerError, match=r"did not acknowledge a message on taken\.by\.core within 0\.5s") as err:
            await _publish(broker, how, "taken.by.core", b"x", {"Nats-Msg-Id": "y"}, 0.5)
        assert "cannot reach" not in str(err.value)
    finally:
        await nc.close()
        await broker.close()


async def _answered_after_asking_again(servers, caplog, request):
    """Run ``request()`` with nats-server frozen until the first try went unanswered; its answer."""
    servers.nats.pause()
    try:
        asking = asyncio.ensure_future(request())

        async def asked_again() -> None:
            while "asking once more" not in caplog.text:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(asked_again(), 10)  # the first request went unanswered
    finally:
        servers.nats.resume()
    return await asyncio.wait_for(asking, 10)


async def test_a_jetstream_read_left_unanswered_is_asked_once_more(fresh_servers, caplog):
    # A cluster that lost a node answers again once it has elected new leaders; a reader
    # (a router loading the live workers as it starts) asks again instead of failing.
    caplog.set_level(logging.WARNING, logger="heddle.broker")
    broker = Broker(Settings(nats_url=fresh_servers.nats_url, connect_timeout_s=1.0), "t")
    await broker.connect()
    try:
        await broker.ensure_streams()
        info = await _answered_after_asking_again(
            fresh_servers, caplog, lambda: broker.stream_info(names.TASKS_STREAM)
        )
        assert info.config.name == names.TASKS_STREAM
    finally:
        await broker.close()


@pytest.mark.parametrize("request_made", ["streams", "consumer", "named consumer"])
async def test_a_stream_or_consumer_creation_left_unanswered_is_asked_once_more(fresh_servers, caplog, request_made):
    # A worker, router or orchestrator starting while a cluster elects new leaders
    # (a node was killed) made these requests and exited when they went unanswered.
    # Creating a stream or consumer with the same config again changes nothing.
    caplog.set_level(logging.WARNING, logger="heddle.broker")
    broker = Broker(Settings(nats_url=fresh_servers.nats_url, connect_timeout_s=1.0), "t")
    await broker.connect()
    try:
        await broker.ensure_streams()
        made = {
            "streams": broker.ensure_streams,
            "consumer": lambda: broker.ensure_consumer("summarizer"),
            "named consumer": lambda: broker.ensure_named_consumer(
                "heddle-test", names.INCOMING_SUBJECT, max_deliver=3
            ),
        }[request_made]
        await _answered_after_asking_again(fresh_servers, caplog, made)
        info = await broker.stream_info(names.TASKS_STREAM)
        assert info.config.name == names.TASKS_STREAM
        if request_made != "streams":
            durables = {c.name for c in await broker.consumers_info(names.TASKS_STREAM)}
            made_durable = names.consumer_name("summarizer", None) if request_made == "consumer" else "heddle-test"
            assert durables == {made_durable}
    finally:
        await broker.close()
