"""The Valkey lane (heddle.valkeylane): the claim and store scripts of every task on one pipelined
connection taken over from valkey-py, and back to the pool whenever it cannot answer.

Against real valkey-server processes: one with a password (the lane must inherit the
login), one restarted under it, one frozen with SIGSTOP (a server that hangs), and a
script cache flushed under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import valkey.asyncio as valkey_async

from heddle import names
from heddle.errors import BackendError
from heddle.messages import SUCCESS, ResultRecord
from heddle.settings import Settings
from heddle.store import ResultBackend, StoreRequest, encode_record
from heddle.testing import EmbeddedValkey
from heddle.valkeylane import Lane, LaneDown

T = 15.0


@pytest.fixture
def valkey() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey("127.0.0.1", None, None) as v:
        yield v  # type: ignore[misc]


@contextlib.asynccontextmanager
async def _backend(**settings: object) -> AsyncIterator[ResultBackend]:
    """A connected result store (with its lane), closed afterwards."""
    backend = ResultBackend(Settings(**settings))  # type: ignore[arg-type]
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


def _ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


async def _lane_back(backend: ResultBackend, old: Lane | None) -> Lane:
    """Run scripts until a lane other than ``old`` answers them (it reopens in the background)."""
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        await backend.final_records(_ids(1))
        lane = backend.lane
        if lane is not None and lane is not old and lane.answered:
            return lane
        await asyncio.sleep(0.05)  # pacing between tries of a condition waited on with a deadline
    raise AssertionError(f"no new lane within {T}s")


async def test_claims_and_stores_go_through_the_lane_and_answer_as_the_pool_does(valkey):
    async with _backend(valkey_url=valkey.url) as backend:
        lane = backend.lane
        assert lane is not None and not lane.closed
        before = lane.answered
        ids = _ids(3)
        claims = await backend.claim_many(ids, "w1")
        assert [c.previous_state for c in claims] == ["", "", ""] and all(c.token for c in claims)
        record = encode_record(ResultRecord(id=ids[0], state=SUCCESS, task="t", result=7))
        assert await backend.store_many([StoreRequest(ids[0], SUCCESS, record)]) == [True]
        again = await backend.claim_many(ids[:1], "w2")
        assert again[0].previous_state == SUCCESS and again[0].final_record == record
        assert await backend.final_records(ids) == {ids[0]: record}
        assert backend.lane is lane and lane.answered == before + 4
        # The same calls through the pool (the lane closed under it) give the same answers.
        lane.close()
        assert await backend.final_records(ids) == {ids[0]: record}
        assert (await backend.claim_many(ids[1:2], "w3"))[0].previous_state == "STARTED"


async def test_the_lane_inherits_the_pools_login_on_a_server_with_a_password():
    with EmbeddedValkey("127.0.0.1", None, None, password="s3cret-lane") as v:
        async with _backend(valkey_url=f"valkey://:s3cret-lane@127.0.0.1:{v.port}/3") as backend:
            ids = _ids(2)
            await backend.claim_many(ids, "w")
            lane = backend.lane
            assert lane is not None and lane.answered == 1
            # Database 3, as the URL says: the lane selected it as the pool does.
            plain = valkey_async.Valkey.from_url(f"valkey://:s3cret-lane@127.0.0.1:{v.port}/3")
            try:
                assert await plain.hget(names.result_key(ids[0]), "state") == b"STARTED"
            finally:
                await plain.aclose()


async def test_after_a_valkey_restart_scripts_fall_back_to_the_pool_and_a_new_lane_opens(valkey):
    async with _backend(valkey_url=valkey.url) as backend:
        old = backend.lane
        assert old is not None
        valkey.restart(kill=True)
        # The first calls may meet the pool's dead connections too, as before the lane.
        deadline = time.monotonic() + T
        while True:
            try:
                await backend.claim_many(_ids(1), "w")
                break
            except BackendError:
                if time.monotonic() > deadline:
                    raise
        assert old.closed
        new = await _lane_back(backend, old)
        ids = _ids(2)
        claims = await backend.claim_many(ids, "w")
        assert all(c.token for c in claims) and backend.lane is new


async def test_a_frozen_server_fails_the_lane_within_its_timeout_and_nothing_waits_forever(valkey):
    async with _backend(valkey_url=valkey.url) as backend:
        lane = backend.lane
        assert lane is not None
        lane._timeout_s = 0.3  # the socket timeout (10 s) made short for this test
        valkey.pause()
        try:
            with pytest.raises(LaneDown, match="no reply within"):
                await lane.execute([("PING",)])
        finally:
            valkey.resume()
        assert lane.closed
        await _lane_back(backend, lane)


async def test_a_flushed_script_cache_is_reloaded_on_the_lane(valkey):
    async with _backend(valkey_url=valkey.url) as backend:
        lane = backend.lane
        assert lane is not None
        plain = valkey_async.Valkey.from_url(valkey.url)
        try:
            await plain.script_flush()
        finally:
            await plain.aclose()
        claims = await backend.claim_many(_ids(2), "w")
        assert all(c.token for c in claims)
        assert backend.lane is lane and not lane.closed  # NOSCRIPT is not a reason to leave the lane


async def test_an_error_reply_on_the_lane_is_the_same_clear_error_as_through_the_pool(valkey):
    async with _backend(valkey_url=valkey.url) as backend:
        task_id = uuid.uuid4().hex
        plain = valkey_async.Valkey.from_url(valkey.url)
        try:
            await plain.set(names.result_key(task_id), "not a hash")
        finally:
            await plain.aclose()
        lane = backend.lane
        assert lane is not None
        with pytest.raises(BackendError) as on_lane:
            await backend.claim_many([task_id], "w")
        assert backend.lane is lane and lane.answered == 1  # an error reply leaves the connection usable
        lane.close()
        with pytest.raises(BackendError) as on_pool:
            await backend.claim_many([task_id], "w")
        assert lane.answered == 1
        assert "WRONGTYPE" in str(on_lane.value)
        assert str(on_lane.value) == str(on_pool.value)


async def test_the_audits_record_of_sends_goes_through_the_lane_and_the_pool_alike(valkey):
    async with _backend(valkey_url=valkey.url) as backend:
        lane = backend.lane
        assert lane is not None
        before = lane.answered
        first, second = _ids(2), _ids(2)
        await backend.record_submitted(first, 1000.5)
        assert lane.answered == before + 1
        lane.close()
        await backend.record_submitted(second, 2000.25)  # through the pool
        await backend.record_submitted(first, 3000.0)  # already there: each keeps the time it was first sent
        assert lane.answered == before + 1
        total, rows = await backend.submitted_before(5000.0, 10)
        assert total == 4
        assert sorted(rows) == sorted([(i, 1000.5) for i in first] + [(i, 2000.25) for i in second])


async def test_an_error_reply_to_a_plain_command_is_the_same_clear_error_on_the_lane_and_the_pool(valkey):
    async with _backend(valkey_url=valkey.url) as backend:
        plain = valkey_async.Valkey.from_url(valkey.url)
        try:
            await plain.set(names.SUBMITTED_KEY, "not a sorted set")
        finally:
            await plain.aclose()
        lane = backend.lane
        assert lane is not None
        with pytest.raises(BackendError) as on_lane:
            await backend.record_submitted(_ids(1), time.time())
        assert backend.lane is lane and lane.answered == 1  # an error reply leaves the connection usable
        lane.close()
        with pytest.raises(BackendError) as on_pool:
            await backend.record_submitted(_ids(1), time.time())
        assert "WRONGTYPE" in str(on_lane.value) and "recording sent tasks" in str(on_lane.value)
        assert str(on_lane.value) == str(on_pool.value)


async def test_a_lane_takes_over_valkey_pys_connection_which_then_owns_no_socket(valkey):
    """Pins valkey-py's internals the lane relies on (Connection._reader/_writer streams)."""
    pool = valkey_async.ConnectionPool.from_url(valkey.url)
    connection = pool.make_connection()
    lane = await Lane.take_over(connection, 5.0)
    try:
        assert connection._reader is None and connection._writer is None
        assert await lane.execute([("PING",), ("ECHO", b"lane")]) == [b"PONG", b"lane"]
    finally:
        lane.close()
        await pool.aclose()
    with pytest.raises(LaneDown, match="closed"):
        await lane.execute([("PING",)])


async def test_under_sentinel_the_lane_follows_a_failover_to_the_new_primary():
    from heddle.testing.valkey_ha import EmbeddedValkeySentinel

    with EmbeddedValkeySentinel(replicas=1, sentinels=3) as s:
        # Results wait for a replica under Sentinel by default (then there is no lane): not here.
        async with _backend(valkey_url=s.url, valkey_sentinels=s.sentinel_addresses,
                            valkey_sentinel_master=s.master_name, valkey_wait_replicas=0) as backend:
            old = backend.lane
            assert old is not None
            await backend.claim_many(_ids(1), "w")
            assert old.answered == 1
            primary = s.primary()
            primary.stop(kill=True)
            await asyncio.to_thread(s.wait_failover, primary.port)
            # The pool rides out the failover; the lane reopens on the promoted replica.
            ids = _ids(3)
            claims = await backend.claim_many(ids, "w")
            assert all(c.token for c in claims) and old.closed
            new = await _lane_back(backend, old)
            assert new.answered >= 1
            await backend.claim_many(_ids(1), "w")
            plain = valkey_async.Valkey(host="127.0.0.1", port=s.primary_port())
            try:
                assert await plain.hget(names.result_key(ids[0]), "state") == b"STARTED"
            finally:
                await plain.aclose()
