"""Result notices on Valkey: the store script that writes a final result announces it
on the sender's channel in the same step (heddle.notices), so the record is stored
before anyone hears of it, and a sender the bus gives no notices (the ``client``
role, tests/test_roles.py) still hears at once. Each test waits for results with the
periodic re-read of the store pushed out to an hour: a result that arrives came by
its notice (or by a read the feed itself asked for)."""

from __future__ import annotations

import asyncio
import threading
import uuid

import msgspec
import nats
import pytest
import valkey.asyncio as valkey_async

import heddle
import heddle.notices
import heddle.results
from heddle import names
from heddle.messages import SUCCESS, ResultRecord
from heddle.settings import Settings
from heddle.store import ResultBackend, StoreRequest, encode_record
from heddle.storescripts import NOTICE_MAX_BYTES
from heddle.testing import EmbeddedValkey
from heddle.valkeylane import ChannelFeed
from tests.test_result_notices import _app, _store  # a store with no notice anywhere

T = 15.0


@pytest.fixture
def no_rereads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting handles read the store only when told to (no periodic re-read within a test)."""
    monkeypatch.setattr(heddle.notices, "RECHECK_S", 3600.0)
    monkeypatch.setattr(heddle.results, "RECHECK_S", 3600.0)


async def _valkey_publish(servers, channel: str, *payloads: bytes) -> None:
    await _valkey_publish_url(servers.valkey_url, channel, *payloads)


async def _valkey_publish_url(url: str, channel: str, *payloads: bytes) -> None:
    client = valkey_async.Valkey.from_url(url)
    try:
        for p in payloads:
            await client.publish(channel, p)
    finally:
        await client.aclose()


async def _heard(pubsub, n: int) -> list[dict]:
    """The next ``n`` messages of a valkey-py ``PubSub`` (its subscribe confirmations skipped)."""
    deadline = asyncio.get_running_loop().time() + T
    heard: list[dict] = []
    while len(heard) < n:
        assert asyncio.get_running_loop().time() < deadline, f"heard only {heard!r}"
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if msg is not None:
            heard.append(msg)
    return heard


async def _wait_until(predicate, what: str, timeout_s: float = T) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_result_told_on_valkey_reaches_its_sender_and_a_handle_elsewhere_with_no_nats_notice(
    heddle_app, heddle_worker, heddle_servers, no_rereads
):
    gate = threading.Event()

    @heddle_app.task
    def add(x: int, y: int) -> int:
        gate.wait(T)  # held until the handle elsewhere waits
        return x + y

    conns = await heddle_app.connections()
    listener = valkey_async.Valkey.from_url(heddle_servers.valkey_url)
    pubsub = listener.pubsub()
    nc = await nats.connect(heddle_servers.nats_url)
    notices: list[str] = []
    succeeded: list[str] = []

    async def notice(msg) -> None:
        notices.append(msg.subject)

    async def event(msg) -> None:
        succeeded.append(msg.data)

    await nc.subscribe(f"{names.RESULT_SUBJECT_PREFIX}>", cb=notice)
    await nc.subscribe(f"{names.TASK_EVENTS_PREFIX}succeeded", cb=event)
    await nc.flush()
    other = _app(heddle_servers)
    try:
        r = add.apply_async((2, 3))
        await pubsub.subscribe(names.notice_channel(conns.notice_token), names.task_notice_channel(r.id))
        elsewhere = asyncio.ensure_future(other.AsyncResult(r.id).aget(timeout=T))
        theirs = await other.connections()
        await _wait_until(lambda: (w := theirs.watches.get(r.id)) is not None and w.waiting, "the wait elsewhere")
        gate.set()
        assert await r.aget(timeout=T) == 5
        assert await elsewhere == 5
        # Once on the sender's channel, once on the task's, in the store's own step.
        heard = await _heard(pubsub, 2)
        assert sorted(m["channel"] for m in heard) == sorted(
            [names.notice_channel(conns.notice_token).encode(), names.task_notice_channel(r.id).encode()])
        for m in heard:
            record = msgspec.msgpack.decode(m["data"], type=ResultRecord)
            assert (record.id, record.state, record.result) == (r.id, SUCCESS, 5)
        assert theirs.watches.feed_messages == 1  # the handle elsewhere heard it on the task's channel
        # The worker publishes a task's notice before its succeeded event, on one connection:
        # once the event is here, a NATS notice would be too. None was sent.
        await _wait_until(lambda: any(r.id.encode() in e for e in succeeded), "the succeeded event")
        assert [s for s in notices if s.endswith(f".{r.id}")] == []
        # A handle elsewhere, made after the result, still finds it.
        later = _app(heddle_servers)
        try:
            assert await later.AsyncResult(r.id).aget(timeout=T) == 5
        finally:
            await later.aclose()
    finally:
        gate.set()
        await other.aclose()
        await nc.close()
        await pubsub.aclose()
        await listener.aclose()


def test_a_sync_caller_gets_its_result_by_the_valkey_notice(heddle_app, heddle_worker, no_rereads):
    @heddle_app.task
    def mul(x: int, y: int) -> int:
        return x * y

    assert mul.delay(6, 7).get(timeout=T) == 42
    r = mul.delay(3, 3)
    assert r.get(timeout=T) == 9


async def test_junk_and_other_records_on_the_channel_are_ignored_and_a_key_sends_the_handle_to_the_store(
    fresh_servers, no_rereads
):
    app = _app(fresh_servers)
    try:
        r = app.send_task("nobody.runs_this", (1,), worker_type="nobody")
        await r.sent()
        conns = await app.connections()
        assert conns.watches.on_valkey
        channel = names.notice_channel(conns.notice_token)
        waiting = asyncio.ensure_future(r.aget(timeout=T))
        forged = encode_record(ResultRecord(id="someone-else", state=SUCCESS, task="t", result=666))
        not_final = encode_record(ResultRecord(id=r.id, state="STARTED", task="t"))
        await _valkey_publish(fresh_servers, channel, b"\xc1junk", b"", forged, not_final,
                              names.result_key("not-watched").encode())
        await _store(fresh_servers, r.id, 43)
        assert not waiting.done()
        # A record too large to announce is announced by its key: the handle reads it.
        await _valkey_publish(fresh_servers, channel, names.result_key(r.id).encode())
        assert await waiting == 43
    finally:
        await app.aclose()


async def test_a_store_announces_a_record_too_large_to_carry_by_its_key_and_nothing_but_final_states(
    heddle_servers,
):
    backend = ResultBackend(Settings.load(nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url))
    await backend.connect()
    listener = valkey_async.Valkey.from_url(heddle_servers.valkey_url)
    pubsub = listener.pubsub()
    channel = names.notice_channel(uuid.uuid4().hex[:16])
    await pubsub.subscribe(channel)
    await pubsub.psubscribe(f"{names.TASK_NOTICE_CHANNEL_PREFIX}*")
    try:
        big, small, retry = (f"big-{uuid.uuid4().hex}", f"small-{uuid.uuid4().hex}", f"retry-{uuid.uuid4().hex}")
        big_record = encode_record(ResultRecord(id=big, state=SUCCESS, task="t", result="x" * NOTICE_MAX_BYTES))
        small_record = encode_record(ResultRecord(id=small, state=SUCCESS, task="t", result=1))
        assert await backend.store_many([
            StoreRequest(retry, "RETRY", encode_record(ResultRecord(id=retry, state="RETRY", task="t")), 1,
                         channel=channel),
            StoreRequest(big, SUCCESS, big_record, channel=channel),
            StoreRequest(small, SUCCESS, small_record, channel=channel),
        ]) == [True, True, True]
        # Written again over a final state: refused, and not announced again.
        assert await backend.store_many([StoreRequest(small, SUCCESS, small_record, channel=channel)]) == [False]
        after = f"after-{uuid.uuid4().hex}"
        after_record = encode_record(ResultRecord(id=after, state=SUCCESS, task="t", result=2))
        assert await backend.store(StoreRequest(after, SUCCESS, after_record, channel=channel))
        heard = [(m["channel"].decode(), m["data"]) for m in await _heard(pubsub, 6)]
        # Each on the sender's channel, then on the task's own.
        assert heard == [
            (channel, names.result_key(big).encode()), (names.task_notice_channel(big), names.result_key(big).encode()),
            (channel, small_record), (names.task_notice_channel(small), small_record),
            (channel, after_record), (names.task_notice_channel(after), after_record),
        ]
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await backend.close()


def test_stores_announce_nothing_where_a_notice_could_come_before_its_wait_or_outside_its_slot():
    assert ResultBackend(Settings.load()).announces
    assert not ResultBackend(Settings.load(valkey_wait_replicas=1)).announces
    assert not ResultBackend(Settings.load(valkey_cluster=True)).announces


async def test_after_its_connection_is_killed_the_feed_subscribes_again_and_reads_what_it_may_have_missed(
    fresh_servers, no_rereads
):
    app = _app(fresh_servers)
    admin = valkey_async.Valkey.from_url(fresh_servers.valkey_url)
    try:
        r = app.send_task("nobody.runs_this", (1,), worker_type="nobody")
        await r.sent()
        conns = await app.connections()
        waiting = asyncio.ensure_future(r.aget(timeout=T))
        # Stored with no notice, as if announced while the feed was down.
        await _store(fresh_servers, r.id, 44)
        assert await admin.client_kill_filter(_type="pubsub") == 1
        assert await waiting == 44
        await _wait_until(lambda: conns.watches.on_valkey, "the feed to be back")
    finally:
        await admin.aclose()
        await app.aclose()


def test_after_a_valkey_restart_results_come_by_the_valkey_notice_again(fresh_servers, tmp_path, monkeypatch):
    app = _app(fresh_servers)

    @app.task(name="vn.double")
    async def double(x: int) -> int:
        return 2 * x

    from heddle.testing import running_worker

    try:
        with running_worker(app):
            assert double.delay(1).get(timeout=T) == 2
            fresh_servers.valkey.restart(kill=True)
            assert double.delay(2).get(timeout=30) == 4  # through the pool and the re-read, at worst

            async def back() -> bool:
                conns = await app.connections()
                return conns.watches.on_valkey

            deadline = T
            while not app.run_sync(back()):
                deadline -= 0.05
                assert deadline > 0, "the notice feed never came back"
                app.run_sync(asyncio.sleep(0.05))
            monkeypatch.setattr(heddle.notices, "RECHECK_S", 3600.0)
            monkeypatch.setattr(heddle.results, "RECHECK_S", 3600.0)
            assert double.delay(3).get(timeout=T) == 6
    finally:
        app.close()


async def test_a_feed_whose_server_stops_answering_is_dropped_and_subscribes_again_once_it_answers():
    with EmbeddedValkey("127.0.0.1", None, None) as valkey:
        backend = ResultBackend(Settings.load(valkey_url=valkey.url))
        await backend.connect()
        got: list[bytes] = []
        lost: list[str] = []
        back: list[bool] = []
        # The PING interval (5 s) and the pause before subscribing again (1 s) made short for this test.
        feed = ChannelFeed(backend.client.connection_pool.make_connection, "heddle:notices:frozen", got.append,
                           lambda: back.append(True), lost.append, timeout_s=2.0, retry_s=0.1, ping_s=0.2)
        try:
            assert await feed.start() and feed.ready
            valkey.pause()
            try:
                await _wait_until(lambda: not feed.ready, "the feed to give up on a server that does not answer")
                assert "no answer to a PING" in lost[0]
            finally:
                valkey.resume()
            await _wait_until(lambda: back and feed.ready, "the feed to subscribe again")
            await _valkey_publish_url(valkey.url, "heddle:notices:frozen", b"after")
            await _wait_until(lambda: got == [b"after"], "the message published after it came back")
        finally:
            feed.close()
            await backend.close()
        assert not feed.ready


async def test_a_burst_of_first_sends_on_a_new_connection_all_ask_for_their_notices_on_valkey(
    heddle_app, heddle_worker, no_rereads
):
    @heddle_app.task
    async def echo(x: int) -> int:
        return x

    handles = [echo.apply_async((i,)) for i in range(200)]  # all before the connection's feed is confirmed
    assert [await r.aget(timeout=T) for r in handles] == list(range(200))
    conns = await heddle_app.connections()
    assert conns.watches.feed_messages == 200


async def test_a_record_stored_before_is_announced_on_the_channels_its_copy_asked_for_and_not_on_nats(
    heddle_app, heddle_servers
):
    # A duplicate whose result is already stored is announced by the worker itself (Connections.notify).
    conns = await heddle_app.connections()
    channel = names.notice_channel(uuid.uuid4().hex[:16])
    small_id, big_id, nats_id = (f"dup-{uuid.uuid4().hex[:8]}" for _ in range(3))
    listener = valkey_async.Valkey.from_url(heddle_servers.valkey_url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(channel, names.task_notice_channel(small_id), names.task_notice_channel(big_id))
    nc = await nats.connect(heddle_servers.nats_url)
    notices: list[str] = []

    async def notice(msg) -> None:
        if msg.subject.rsplit(".", 1)[-1] in (small_id, big_id, nats_id):
            notices.append(msg.subject)

    await nc.subscribe(f"{names.RESULT_SUBJECT_PREFIX}>", cb=notice)
    await nc.flush()
    try:
        small = encode_record(ResultRecord(id=small_id, state=SUCCESS, task="t", result=1))
        big = encode_record(ResultRecord(id=big_id, state=SUCCESS, task="t", result="x" * NOTICE_MAX_BYTES))
        await conns.notify(small_id, small, "sender", channel)
        await conns.notify(big_id, big, "sender", channel)
        heard = [(m["channel"].decode(), m["data"]) for m in await _heard(pubsub, 4)]
        big_key = names.result_key(big_id).encode()
        assert heard == [(channel, small), (names.task_notice_channel(small_id), small),
                         (channel, big_key), (names.task_notice_channel(big_id), big_key)]
        # A copy that asked for no Valkey notice is told on NATS; on one connection, after the others.
        await conns.notify(nats_id, small, "sender")
        await _wait_until(lambda: notices, "the NATS notice")
        assert notices == [names.notice_subject("sender", nats_id)]
    finally:
        await nc.close()
        await pubsub.aclose()
        await listener.aclose()


async def test_a_channel_added_to_a_feed_is_subscribed_again_with_it_and_not_after_it_is_removed(heddle_servers):
    backend = ResultBackend(Settings.load(valkey_url=heddle_servers.valkey_url))
    await backend.connect()
    admin = valkey_async.Valkey.from_url(heddle_servers.valkey_url)
    got: list[bytes] = []
    main, extra, gone = (f"heddle:test-feed:{uuid.uuid4().hex[:12]}" for _ in range(3))
    feed = ChannelFeed(backend.client.connection_pool.make_connection, main, got.append, lambda: None,
                       lambda why: None, timeout_s=5.0, retry_s=0.05)
    try:
        assert await feed.start()
        assert await feed.add(extra) and await feed.add(gone)
        feed.remove(gone)
        await _valkey_publish(heddle_servers, gone, b"not followed")
        await _valkey_publish(heddle_servers, extra, b"extra")
        await _wait_until(lambda: got == [b"extra"], "the added channel's message")
        killed = await admin.client_kill_filter(_type="pubsub")
        assert killed >= 1
        await _wait_until(lambda: feed.ready, "the feed to subscribe again")
        assert await feed.add(extra)  # already followed: confirmed by the new subscription
        await _valkey_publish(heddle_servers, gone, b"still not followed")
        await _valkey_publish(heddle_servers, extra, b"extra again")
        await _valkey_publish(heddle_servers, main, b"main")
        await _wait_until(lambda: got[-1:] == [b"main"], "the main channel's message")
        assert got == [b"extra", b"extra again", b"main"]
    finally:
        feed.close()
        await admin.aclose()
        await backend.close()


async def test_a_message_its_handler_fails_on_is_logged_and_the_feed_goes_on(heddle_servers, caplog):
    backend = ResultBackend(Settings.load(valkey_url=heddle_servers.valkey_url))
    await backend.connect()
    got: list[bytes] = []

    def handle(data: bytes) -> None:
        if data == b"boom":
            raise ValueError("a handler that fails")
        got.append(data)

    channel = f"heddle:notices:{uuid.uuid4().hex[:16]}"
    feed = ChannelFeed(backend.client.connection_pool.make_connection, channel, handle, lambda: None,
                       lambda why: None, timeout_s=5.0, retry_s=1.0)
    try:
        assert await feed.start()
        await _valkey_publish_url(heddle_servers.valkey_url, channel, b"one", b"boom", b"two")
        await _wait_until(lambda: got == [b"one", b"two"], "the message after the failing one")
        assert feed.ready
        assert any("could not be handled" in r.getMessage() for r in caplog.records)
    finally:
        feed.close()
        await backend.close()
