"""The router: the one place a task's destination is decided.

It consumes ``heddle.tasks.incoming`` through a durable pull consumer shared by
every replica and republishes each message, payload bytes untouched, to
``heddle.tasks.{worker_type}.{tier}``. Tier precedence: a ``tier_overrides``
rule, then the tier the task asked for, then the worker type's default. If no
live worker serves that tier, the rule's ``fallback`` tiers are tried in order.
Rate limits are token buckets in Valkey shared by all replicas; an over-limit
message is delayed (nak with delay), never dropped, unless its rule says
``on_limit: dead_letter``. No LLM, no randomness: the same rules, registry and
message give the same route.

Per batch the hot path is: read three headers per message, check the task id
and the headers' size, a dictionary lookup for the route, one pipelined Valkey
round trip for the rate limits that apply (none if no limit applies), pipelined
publishes, then the acks.

Anything on the bus can publish to ``heddle.tasks.incoming``, so each message
is judged alone: one without a usable task id, with a worker type or tier that
is not one, or with headers too big to copy is dead-lettered with the reason,
and the rest of its batch flows. A message on its last delivery is
dead-lettered rather than handed back again, and one whose last delivery was
never acknowledged (a replica died holding it) is dead-lettered from
JetStream's max-deliveries advisory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heddle import events, names
from heddle.actor import Actor, acknowledge, seq_of
from heddle.errors import HeddleError, MessageTooLarge, TaskIdError
from heddle.messages import MAX_HEADER_CHARS, headers_size
from heddle.ratelimit import Ask, RateLimiter, bucket_key
from heddle.registry import Registry, RulesAnnouncer
from heddle.routes import Route, decide
from heddle.rules import RouterRules, RulesError, load_rules

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.broker import Message as Msg
    from heddle.connections import Connections

log = logging.getLogger("heddle.router")

_BACKOFF_S = 0.5
_PUBLISH_TIMEOUT_S = 10.0
# How often a message for an unknown worker type is looked at again during the grace period.
_UNKNOWN_RETRY_S = 0.5
# Router deliveries include rate-limit delays; bounded, never unlimited.
DEFAULT_MAX_DELIVER = 200
# Routing decisions are cached per (worker type, requested tier); headers from the bus
# can name endless made-up ones, so the cache starts over past this many.
_MAX_CACHED_ROUTES = 4096
# JetStream refuses a message with more header bytes than this ("header size exceeds
# maximum allowed of 64k"), so only a payload within this (and the headers the router
# adds) of max_payload can have headers that take its routed copy past max_payload.
_JS_MAX_HEADER_BYTES = 64 * 1024
_ROUTER_HEADER_BYTES = 16 * 1024


# One message to forward: (message, route, headers, task id, its routed copy's Nats-Msg-Id).
_Go = tuple["Msg", Route, dict[str, str], str, str]


class Router(Actor):
    """Routes incoming tasks to worker subjects (an :class:`~heddle.actor.Actor` on ``heddle-router``).

    Args:
        app: Any app; gives settings and connections.
        rules: Rules to use; or
        rules_path: a rules file, reloaded on SIGHUP and, with ``watch_rules``, on change.
        watch_rules: Watch the rules file for changes.
        max_deliver: Deliveries of one incoming message (rate-limit and grace-period
            delays count) before it is dead-lettered.
    """

    def __init__(
        self,
        app: Heddle,
        *,
        rules: RouterRules | None = None,
        rules_path: str | Path | None = None,
        watch_rules: bool = True,
        max_deliver: int = DEFAULT_MAX_DELIVER,
    ) -> None:
        if not isinstance(max_deliver, int) or max_deliver < 1:
            raise HeddleError(f"max_deliver must be an int >= 1, got {max_deliver!r}")
        super().__init__(app)
        self.name = "router"  # recorded as the "worker" of the results it fails
        self.max_deliver = max_deliver
        self.rules_path = Path(rules_path) if rules_path else None
        # Reload on file changes too (watchfiles); SIGHUP always reloads.
        self.watch_rules = watch_rules
        if rules is None:
            rules = load_rules(self.rules_path) if self.rules_path else RouterRules()
        self.rules = rules
        self.stats = {"routed": 0, "delayed": 0, "dead_lettered": 0, "waiting": 0}
        self.registry: Registry | None = None
        self._announcer: RulesAnnouncer | None = None
        self._limiter: RateLimiter | None = None
        self._cache: dict[tuple[str, str | None], Route] = {}
        self._registry_version: Any = None
        # Payloads above this have their headers measured (set from max_payload at start).
        self._measure_headers_above = 0

    # -- lifecycle -----------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the rules file; keep the old rules if the new ones are invalid."""
        if self.rules_path is None:
            return False
        try:
            rules = load_rules(self.rules_path)
        except RulesError as exc:
            log.error("keeping the current router rules: %s", exc)
            return False
        self.rules = rules
        self._cache.clear()
        if self._announcer is not None:
            self._announcer.update(rules)
        log.warning("router rules reloaded from %s", self.rules_path)
        return True

    what = "incoming tasks"
    exhausted_why = "the router replicas that took it crashed or stalled before routing it"

    async def ensure_consumer(self, conns: Connections) -> tuple[str, str]:
        durable = await conns.broker.ensure_named_consumer(
            names.ROUTER_CONSUMER, names.INCOMING_SUBJECT, max_deliver=self.max_deliver
        )
        return durable, names.TASKS_STREAM

    @property
    def filter_subject(self) -> str:
        return names.INCOMING_SUBJECT

    def on_exhausted(self) -> None:
        self.stats["dead_lettered"] += 1

    async def on_start(self, conns: Connections) -> None:
        self.registry = Registry(conns.broker)
        await self.registry.start()
        # What clients need to send tasks straight to workers when no rule needs this router.
        self._announcer = RulesAnnouncer(conns.broker, self.rules)
        await self._announcer.start()
        self._limiter = RateLimiter(conns.backend)
        self._measure_headers_above = conns.broker.max_payload - _JS_MAX_HEADER_BYTES - _ROUTER_HEADER_BYTES
        loop = asyncio.get_running_loop()
        if self.rules_path is not None:
            if self.watch_rules:
                self._bg.append(loop.create_task(self._watch_rules()))
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("router consuming %s", names.INCOMING_SUBJECT)

    async def on_stop(self) -> None:
        if self.rules_path is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._announcer is not None:
            await self._announcer.stop()
        if self.registry is not None:
            await self.registry.stop()

    async def handle(self, msgs: list[Msg]) -> None:
        await self.route_batch(msgs)

    async def _watch_rules(self) -> None:
        import watchfiles

        assert self.rules_path is not None
        async for _changes in watchfiles.awatch(self.rules_path.parent, stop_event=self._stop):
            if any(Path(p).resolve() == self.rules_path.resolve() for _, p in _changes):
                self.reload()

    # -- deciding ------------------------------------------------------------------

    def resolve(self, worker_type: str, requested: str | None) -> Route:
        """Decide the tier for a task; deterministic for given rules and live workers."""
        assert self.registry is not None
        if self._registry_version is not self.registry.tiers:
            self._registry_version = self.registry.tiers
            self._cache.clear()
        key = (worker_type, requested)
        route = self._cache.get(key)
        if route is None:
            if len(self._cache) >= _MAX_CACHED_ROUTES:
                self._cache.clear()
            route = self._cache[key] = self._decide(worker_type, requested)
        return route

    def _decide(self, worker_type: str, requested: str | None) -> Route:
        assert self.registry is not None
        rules = self.rules
        return decide(worker_type, requested, rules.tier_overrides, rules.fallback, self.registry,
                      self.settings.default_tier)

    # -- routing -------------------------------------------------------------------

    async def route_batch(self, msgs: list[Msg]) -> None:
        """Route one fetched batch."""
        assert self.conns is not None and self._limiter is not None
        rules = self.rules
        tier_limits, worker_limits = rules.tier_limits, rules.worker_limits
        tier_tokens, worker_tokens = rules.tier_token_limits, rules.worker_token_limits
        go: list[_Go] = []
        asks: list[Ask] = []
        asked: list[int] = []  # index into go for each ask
        for msg in msgs:
            # Each message alone: whatever one carries, the rest of the batch flows.
            try:
                item = await self._classify(msg)
            except Exception as exc:
                log.exception("could not route message #%d", seq_of(msg))
                await self._give_back(msg, {}, "", _BACKOFF_S, f"the router failed on it: {exc!r}")
                continue
            if item is None:
                continue
            _, route, headers, _, msg_id = item
            tier, worker_type = route.tier, headers[names.HDR_WORKER_TYPE]
            assert tier is not None  # only routes with a tier are forwarded
            buckets: list[tuple[str, Any, float]] = []
            lim = tier_limits.get(tier)
            if lim is not None:
                buckets.append((bucket_key("tier", tier), lim, 1.0))
            lim = worker_limits.get(worker_type)
            if lim is not None:
                buckets.append((bucket_key("worker", worker_type), lim, 1.0))
            token_buckets = [(bucket_key(kind, name), tok) for kind, name, tok in (
                ("tokens-tier", tier, tier_tokens.get(tier)),
                ("tokens-worker", worker_type, worker_tokens.get(worker_type)),
            ) if tok is not None]
            if token_buckets:
                # Charged by an estimate now (the prompt's size, the most it may write);
                # the worker settles it with the usage the provider reports.
                estimate = self._token_estimate(item[0], worker_type)
                buckets += [(key, tok, float(estimate)) for key, tok in token_buckets]
                headers[names.HDR_TOKEN_CHARGE] = f"{estimate} {','.join(key for key, _ in token_buckets)}"
            if buckets:
                reserve = all(getattr(b[1], "on_limit", "delay") == "delay" for b in buckets)
                asks.append(Ask(msg_id, tuple(buckets), reserve))
                asked.append(len(go))
            go.append(item)
        if not go:
            return
        if asks:
            try:
                waits = await self._limiter.take(asks)
            except HeddleError as exc:
                log.warning("rate limits unavailable (%s); delaying %d messages", exc, len(go))
                for msg, _, headers, task_id, _ in go:
                    await self._give_back(msg, headers, task_id, _BACKOFF_S * 2, f"rate limits unavailable: {exc}")
                return
            held: set[int] = set()
            for i, wait in zip(asked, waits, strict=True):
                if wait == 0:
                    continue
                held.add(i)
                msg, route, headers, task_id, _ = go[i]
                if wait < 0:
                    await self._dead_letter(
                        msg, headers, task_id,
                        f"rate limit exceeded for {headers[names.HDR_WORKER_TYPE]} at {route.tier} "
                        f"(on_limit: dead_letter)",
                    )
                else:
                    self.stats["delayed"] += 1
                    await self._give_back(msg, headers, task_id, wait, f"rate limit for {route.tier}")
            if held:
                go = [g for i, g in enumerate(go) if i not in held]
        await self._forward(go)

    def _token_estimate(self, msg: Msg, worker_type: str) -> int:
        """Model tokens a task may use: its message at ~4 bytes a token, plus its workers' most output."""
        max_output = self.registry.max_output_tokens.get(worker_type, 0) if self.registry is not None else 0
        return len(msg.data) // 4 + max_output

    async def _classify(self, msg: Msg) -> _Go | None:
        """Read one message's envelope: return it to forward, or dead-letter or delay it here."""
        headers = msg.headers
        if not headers:
            await self._dead_letter(msg, {}, "", "malformed envelope: no headers (needs Heddle-Worker-Type)")
            return None
        if len(msg.data) > self._measure_headers_above and headers_size(headers) > MAX_HEADER_CHARS:
            # Copied onto the routed message, they could take it past the server's
            # max_payload (which closes this connection); they are not copied onward.
            task_id = _usable(names.task_id_of(headers))
            size = headers_size(headers)
            reason = f"malformed envelope: {size:,} characters of headers; the limit is {MAX_HEADER_CHARS:,}"
            await self._dead_letter(msg, {}, task_id, reason)
            return None
        worker_type = headers.get(names.HDR_WORKER_TYPE)
        # A replayed dead letter carries its task id apart from its message id.
        raw_id = names.task_id_of(headers)
        if not worker_type or not raw_id:
            missing = names.HDR_WORKER_TYPE if not worker_type else f"{names.HDR_MSG_ID} (or {names.HDR_TASK_ID})"
            await self._dead_letter(msg, headers, _usable(raw_id), f"malformed envelope: no {missing} header")
            return None
        try:
            # It becomes a subject token (the result notice) and a Valkey key.
            task_id = names.check_task_id(raw_id)
        except TaskIdError as exc:
            await self._dead_letter(msg, headers, "", f"malformed envelope: {exc}")
            return None
        route = self.resolve(worker_type, headers.get(names.HDR_TIER_REQUESTED) or None)
        if route.tier is None:
            if route.malformed:
                await self._dead_letter(msg, headers, task_id, route.reason)
            else:
                await self._unroutable(msg, headers, task_id, route.reason)
            return None
        # The routed copy's dedup id derives from the incoming one's; a message without a
        # usable one gets one from its stream sequence, the same on every redelivery.
        msg_id = headers.get(names.HDR_MSG_ID, "")
        if msg_id != task_id and not _usable(msg_id):
            msg_id = f"{task_id}:in{seq_of(msg)}"
        return msg, route, headers, task_id, msg_id

    async def _forward(self, go: list[_Go]) -> None:
        assert self.conns is not None
        broker = self.conns.broker
        sent: list[_Go] = []
        outgoing: list[tuple[str, bytes, dict[str, str]]] = []
        for item in go:
            msg, route, headers, task_id, msg_id = item
            out = dict(headers)
            out[names.HDR_TIER] = route.tier  # type: ignore[assignment]
            out[names.HDR_ROUTE_REASON] = route.reason
            out[names.HDR_ROUTED_BY] = "router"
            out[names.HDR_MSG_ID] = names.routed_msg_id(msg_id)
            # The routed copy's Nats-Msg-Id is its own dedup key; workers read the task id here.
            out[names.HDR_TASK_ID] = task_id
            subject = names.banded_subject(route.subject, headers.get(names.HDR_PRIORITY))
            try:
                # A message that fit the server may not with the router's headers added.
                broker.check_size(subject, msg.data, out)
            except MessageTooLarge as exc:
                await self._dead_letter(msg, headers, task_id, str(exc))
                continue
            sent.append(item)
            outgoing.append((subject, msg.data, out))
        results = await broker.publish_many(outgoing, _PUBLISH_TIMEOUT_S)
        for (msg, route, headers, task_id, _), res in zip(sent, results, strict=True):
            if isinstance(res, BaseException):
                # Not stored downstream: leave it for another try. The routed copy's
                # msg id makes a second publish harmless if the first did land.
                why = f"publishing to {route.subject} failed: {res!r}"
                await self._give_back(msg, headers, task_id, _BACKOFF_S, why)
                continue
            self.stats["routed"] += 1
            await acknowledge(msg, "ack", task_id, logger=log)
            await events.publish(broker, events.received(msg.data, headers, route.tier or ""))  # heddle.events hook

    async def _unroutable(self, msg: Msg, headers: dict[str, str], task_id: str, reason: str) -> None:
        """Wait out the grace period for a worker to appear, then dead-letter."""
        stored_at = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else time.time()
        age = time.time() - stored_at
        grace = self.rules.unknown_worker_grace_s
        if age < grace:
            self.stats["waiting"] += 1
            await self._give_back(msg, headers, task_id, min(_UNKNOWN_RETRY_S, max(0.05, grace - age)), reason)
            return
        await self._dead_letter(msg, headers, task_id, f"unroutable after {grace:g}s: {reason}")

    async def _give_back(self, msg: Msg, headers: dict[str, str], task_id: str, delay: float, why: str) -> None:
        """Nak for another try after ``delay``; on the message's last delivery, dead-letter it instead."""
        delivered = msg.metadata.num_delivered or 1
        if delivered >= self.max_deliver:
            await self._dead_letter(
                msg, headers, task_id,
                f"delivered {delivered} times without being routed (MaxDeliver {self.max_deliver}): {why}",
            )
            return
        await acknowledge(msg, "nak", task_id or f"#{seq_of(msg)}", delay=delay, logger=log)

    async def _dead_letter(self, msg: Msg, headers: dict[str, str], task_id: str, reason: str) -> None:
        await self.reject(msg, reason, task_id=task_id, task_name=headers.get(names.HDR_TASK, ""),
                          error_type="heddle.Unroutable", worker_type=headers.get(names.HDR_WORKER_TYPE, ""))


def _usable(task_id: str) -> str:
    """``task_id`` if it can be a subject token, else ``""``."""
    try:
        return names.check_task_id(task_id)
    except TaskIdError:
        return ""
