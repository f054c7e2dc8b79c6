"""Which workers are alive: heartbeats in a JetStream KV bucket with a TTL.

Every worker puts a :class:`WorkerInfo` under ``{worker_type}.{worker_id}`` in
the ``heddle_workers`` bucket every ``HEARTBEAT_S`` and deletes it when it stops.
Routers load the bucket once, then follow it live with a core-NATS
subscription to the bucket's subjects (``$KV.heddle_workers.>``), so a route
decision is a dictionary lookup, never a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
from nats.js.errors import NotFoundError

from heddle import names
from heddle.background import cancel_and_wait
from heddle.errors import DecodeError, HeddleError
from heddle.messages import decode as bounded_decode
from heddle.rules import RouterRules

if TYPE_CHECKING:
    from nats.js import api

    from heddle.broker import Broker
    from heddle.broker import Message as Msg

log = logging.getLogger("heddle.registry")

HEARTBEAT_S = 2.0
# A worker not heard from for this long is taken for dead.
ALIVE_TTL_S = 3 * HEARTBEAT_S


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A worker's announcement of itself."""

    v: int = 1
    id: str
    worker_type: str
    tiers: list[str]  # ["*"] for a worker that takes every tier
    default_tier: str
    concurrency: int
    host: str
    pid: int
    version: str
    started_at: float
    tasks: list[str] = []
    # The most model tokens one of its tasks may write (YAML LLM workers); 0: not an LLM worker.
    max_output_tokens: int = 0


class RoutingRules(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a client needs of a router's rules to route like it (published in the workers bucket).

    Attributes:
        tier_overrides: worker type -> tier, as in the rules.
        fallback: tier -> tiers tried in order when no worker of it is alive.
        limited_tiers: Tiers with a rate limit (their tasks go through the router).
        limited_workers: Worker types with a rate limit (likewise).
    """

    v: int = 1
    tier_overrides: dict[str, str] = {}
    fallback: dict[str, list[str]] = {}
    limited_tiers: list[str] = []
    limited_workers: list[str] = []

    @classmethod
    def of(cls, rules: RouterRules) -> RoutingRules:
        """The client's part of a router's rules."""
        return cls(
            tier_overrides=dict(rules.tier_overrides),
            fallback={k: list(v) for k, v in rules.fallback.items()},
            limited_tiers=sorted(rules.limited_tiers),
            limited_workers=sorted(rules.limited_workers),
        )


_info_decoder = msgspec.msgpack.Decoder(WorkerInfo)
_rules_decoder = msgspec.msgpack.Decoder(RoutingRules)
_encoder = msgspec.msgpack.Encoder()


def worker_info(value: bytes) -> WorkerInfo:
    """A worker's entry in the workers bucket, decoded within the usual bounds.

    Raises:
        DecodeError: The value is not a :class:`WorkerInfo`.
    """
    return bounded_decode(_info_decoder, value)


_worker_numbers = itertools.count(1)


def worker_id() -> str:
    """A new worker id, ``host-pid-n``: unique per Worker, a valid KV key token."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host}-{os.getpid()}-{next(_worker_numbers)}"


async def _bucket(broker: Broker) -> Any:
    return await broker.key_value(names.WORKERS_BUCKET, ttl_s=ALIVE_TTL_S * 2, description="heddle workers")


_STREAM = f"KV_{names.WORKERS_BUCKET}"
_SUBJECT_PREFIX = f"$KV.{names.WORKERS_BUCKET}."


class Entry(NamedTuple):
    """An entry in the workers bucket: a worker's :class:`WorkerInfo` or a router's :class:`RoutingRules`."""

    key: str
    value: bytes
    stored: api.RawStreamMsg  # its time is the last heartbeat's


async def entries(broker: Broker) -> list[Entry]:
    """Every entry in the workers bucket now; deleted ones left out.

    The keys come from the stream's subjects (one request), then each key's newest
    message is read. nats-py's ``kv.keys()`` lists through an ordered consumer instead,
    and while other entries are put meanwhile (heartbeats) it sometimes ends the listing
    before the first key and answers "no keys" (tests/test_registry.py).
    """
    found = []
    for subject in await broker.stream_subjects(_STREAM, _SUBJECT_PREFIX + ">"):
        try:
            msg = await broker.last_stream_msg(_STREAM, subject)
        except HeddleError as exc:
            if not isinstance(exc.__cause__, NotFoundError):  # not expired since the listing: worth a word
                log.warning("left %s out of the live workers until its next heartbeat: %s", subject, exc)
            continue
        if msg.data and (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
            found.append(Entry(subject[len(_SUBJECT_PREFIX):], msg.data, msg))
    return found


# How long a first announcement keeps trying: a replicated bucket just created on a
# cluster answers only once its replicas have elected a leader.
_FIRST_PUT_S = 30.0


async def _first_put(kv: Any, key: str, value: bytes) -> None:
    """Put ``key`` in the workers bucket, trying again while the bucket does not answer yet."""
    deadline = time.monotonic() + _FIRST_PUT_S
    wait = 0.1
    while True:
        try:
            await kv.put(key, value)
            return
        except Exception as exc:  # nats-py's timeout or "no responders" while the bucket forms
            if time.monotonic() + wait > deadline:
                raise
            log.warning("the workers bucket did not take %s yet (%r); trying again in %.1fs", key, exc, wait)
            await asyncio.sleep(wait)
            wait = min(2.0, wait * 2)


class Heartbeat:
    """Announces one worker until stopped."""

    def __init__(
        self, broker: Broker, info: WorkerInfo, announce: Callable[[str, WorkerInfo], Awaitable[None]] | None = None
    ) -> None:
        self.broker = broker
        self.info = info
        # Told each state (online, heartbeat, offline): the worker publishes its events.
        self._announce_cb = announce
        self.key = f"{info.worker_type}.{info.id}"
        self._task: asyncio.Task[None] | None = None
        self._kv: Any = None

    async def start(self) -> None:
        """Announce now (before the worker reports ready) and keep announcing."""
        self._kv = await _bucket(self.broker)
        await _first_put(self._kv, self.key, _encoder.encode(self.info))
        await self._announce("online")
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _announce(self, state: str) -> None:
        if self._announce_cb is not None:
            await self._announce_cb(state, self.info)

    async def _beat(self) -> None:
        payload = _encoder.encode(self.info)
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._kv.put(self.key, payload)
                await self._announce("heartbeat")
            except Exception as exc:  # disconnected: the next beat tries again
                log.debug("heartbeat failed: %r", exc)

    async def stop(self) -> None:
        """Stop announcing and withdraw the entry."""
        await cancel_and_wait(self._task)
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._kv.delete(self.key), 2)
            await self._announce("offline")


class RulesAnnouncer:
    """A router's :class:`RoutingRules` in the workers bucket, renewed with each heartbeat until stopped.

    Clients that route directly (:mod:`heddle.routes`) follow them; an entry not
    renewed expires like a worker's, and a client then sends through the router.
    """

    def __init__(self, broker: Broker, rules: RouterRules) -> None:
        self.broker = broker
        self.key = names.ROUTING_RULES_PREFIX + worker_id()
        self._payload = _encoder.encode(RoutingRules.of(rules))
        self._kv: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Announce now (or, if that fails, at the next renewal) and keep announcing."""
        self._kv = await _bucket(self.broker)
        try:
            await self._kv.put(self.key, self._payload)
        except Exception as exc:  # clients send through the router meanwhile
            log.warning("cannot announce the routing rules yet (%r); retrying every %.0fs", exc, HEARTBEAT_S)
        self._task = asyncio.get_running_loop().create_task(self._renew())

    def update(self, rules: RouterRules) -> None:
        """Announce new rules (after a reload) at once."""
        self._payload = _encoder.encode(RoutingRules.of(rules))
        if self._task is not None:
            old = self._task
            old.cancel()
            self._task = asyncio.get_running_loop().create_task(self._renew(at_once=True, after=old))

    async def _renew(self, at_once: bool = False, after: asyncio.Task[None] | None = None) -> None:
        await cancel_and_wait(after)  # the loop this one replaces
        if not at_once:
            await asyncio.sleep(HEARTBEAT_S)
        while True:
            try:
                await self._kv.put(self.key, self._payload)
            except Exception as exc:  # disconnected: the next renewal tries again
                log.debug("announcing the routing rules failed: %r", exc)
            await asyncio.sleep(HEARTBEAT_S)

    async def stop(self) -> None:
        """Stop announcing and withdraw the entry (clients send through the routers left)."""
        await cancel_and_wait(self._task)
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._kv.delete(self.key), 2)


class Registry:
    """A live view of the workers that are alive, and of the routing rules routers announce."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._seen: dict[str, tuple[float, WorkerInfo]] = {}
        self._rules: dict[str, tuple[float, RoutingRules]] = {}
        #: The routing rules every live router announces, if they all announce the same
        #: (None: no router announces any, or they disagree).
        self.rules: RoutingRules | None = None
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        # worker_type -> set of tiers served ("*" = all); rebuilt on every change.
        self.tiers: dict[str, frozenset[str]] = {}
        self.default_tier: dict[str, str] = {}
        self.max_output_tokens: dict[str, int] = {}  # worker type -> the most its live workers announce

    async def start(self) -> None:
        """Subscribe first, then load the bucket, so no announcement falls in between."""
        self._sub = await self.broker.subscribe(_SUBJECT_PREFIX + ">", cb=self._on_update)
        await _bucket(self.broker)  # created if missing
        now = time.monotonic()
        for entry in await entries(self.broker):
            with contextlib.suppress(DecodeError):
                self._take(entry.key, entry.value, now)
        self._rebuild()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        """Stop following the bucket."""
        await cancel_and_wait(self._sweeper)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def _take(self, key: str, value: bytes, now: float) -> None:
        """Keep one entry of the bucket: a worker, or the routing rules (DecodeError if it is neither)."""
        if key.startswith(names.ROUTING_RULES_PREFIX):
            self._rules[key] = (now, bounded_decode(_rules_decoder, value))
        else:
            self._seen[key] = (now, worker_info(value))

    async def _on_update(self, msg: Msg) -> None:
        key = msg.subject[len(_SUBJECT_PREFIX) :]
        op = (msg.headers or {}).get("KV-Operation")
        if op in ("DEL", "PURGE") or not msg.data:
            self._rules.pop(key, None)
            self._seen.pop(key, None)
        else:
            try:
                self._take(key, msg.data, time.monotonic())
            except DecodeError:
                return
        self._rebuild()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S / 2)
            cutoff = time.monotonic() - ALIVE_TTL_S
            stale = [k for k, (seen, _) in self._seen.items() if seen < cutoff]
            stale += [k for k, (seen, _) in self._rules.items() if seen < cutoff]
            for k in stale:
                self._seen.pop(k, None)
                self._rules.pop(k, None)
            if stale:
                self._rebuild()

    def _rebuild(self) -> None:
        tiers: dict[str, set[str]] = {}
        defaults: dict[str, str] = {}
        outputs: dict[str, int] = {}
        for _, info in sorted(self._seen.values(), key=lambda x: x[1].id):
            tiers.setdefault(info.worker_type, set()).update(info.tiers)
            defaults.setdefault(info.worker_type, info.default_tier)
            outputs[info.worker_type] = max(outputs.get(info.worker_type, 0), info.max_output_tokens)
        self.tiers = {k: frozenset(v) for k, v in tiers.items()}
        self.default_tier = defaults
        self.max_output_tokens = outputs
        announced = [r for _, r in self._rules.values()]
        rules = announced[0] if announced and all(r == announced[0] for r in announced) else None
        if rules != self.rules:
            self.rules = rules

    def workers(self) -> list[WorkerInfo]:
        """Every worker alive now."""
        return [info for _, info in self._seen.values()]

    def serves(self, worker_type: str, tier: str) -> bool:
        """True if a live worker takes ``worker_type`` tasks at ``tier``."""
        t = self.tiers.get(worker_type)
        return t is not None and (tier in t or "*" in t)
