"""Deciding a task's route: one function for the router and for clients that route directly.

A route is a pure function of three things: the router rules, the workers alive
(:class:`~heddle.registry.Registry`) and the message's worker type and requested
tier. The router (:mod:`heddle.router`) decides every message of
``heddle.tasks.incoming`` with :func:`decide`. Routers also publish the part of
their rules a client needs (:class:`~heddle.registry.RoutingRules`) into the workers bucket, and a
client that follows the bucket (:class:`Routes`) decides with the same function
and publishes a task straight to ``heddle.tasks.{worker_type}.{tier}``, saving the
task one JetStream hop, whenever nothing needs the router:

* a router's rules are known (no router alive, or rules not seen yet: the router);
* no rate limit applies to the worker type or to the tier (limits are shared
  token buckets the router keeps: the router);
* a live worker serves the tier decided, directly or through a ``fallback``
  (none alive: the router, which waits its grace period, then dead-letters).

A task sent directly carries the headers a routed copy would (``Heddle-Tier``,
``Heddle-Route-Reason``, ``Heddle-Task-Id``, and the routed copy's
``Nats-Msg-Id``, so a later copy of the same task through the router is
dropped by the stream's deduplication), but no ``Heddle-Routed-By``: its worker
announces the ``received`` event a router would have.
"""

from __future__ import annotations

from typing import Any

from heddle import names
from heddle.errors import ConfigError
from heddle.registry import Registry
from heddle.settings import check_name

# Decisions are cached per (worker type, requested tier); a client names few, but the
# cache starts over past this many.
_MAX_CACHED = 4096


class Route:
    """A routing decision: the tier, or None and why not (``malformed``: never routable, no grace)."""

    __slots__ = ("malformed", "reason", "subject", "tier")

    def __init__(self, tier: str | None, reason: str, subject: str = "", malformed: bool = False) -> None:
        self.tier = tier
        self.reason = reason
        self.subject = subject
        self.malformed = malformed


def decide(
    worker_type: str,
    requested: str | None,
    overrides: dict[str, str],
    fallback: dict[str, Any],
    registry: Registry,
    default_tier: str,
) -> Route:
    """Decide the tier for a task; deterministic for given rules and live workers.

    Tier precedence: a ``tier_overrides`` rule, then the tier the task asked for,
    then the worker type's default (its live workers', else ``default_tier``). If no
    live worker serves that tier, ``fallback`` tiers are tried in order.
    """
    # Both become subject tokens.
    try:
        check_name(names.HDR_WORKER_TYPE, worker_type)
    except ConfigError as exc:
        return Route(None, f"malformed envelope: {exc}", malformed=True)
    if requested is not None and requested not in names.TIERS:
        return Route(
            None,
            f"malformed envelope: {names.HDR_TIER_REQUESTED} {requested[:60]!r} is not a tier; "
            f"use one of {', '.join(names.TIERS)}",
            malformed=True,
        )
    override = overrides.get(worker_type)
    if override:
        tier, reason = override, "rule override"
    elif requested:
        tier, reason = requested, "requested by task"
    else:
        tier = registry.default_tier.get(worker_type) or default_tier
        reason = "worker default"
    if worker_type not in registry.tiers:
        return Route(None, f"unknown worker type {worker_type!r}: no worker of that type is alive")
    if registry.serves(worker_type, tier):
        return Route(tier, reason, names.task_subject(worker_type, tier))
    tried = [tier]
    for fb in fallback.get(tier, ()):
        tried.append(fb)
        if registry.serves(worker_type, fb):
            return Route(fb, f"{reason}: {tier}, fallback to {fb} (no {tier} worker alive)",
                         names.task_subject(worker_type, fb))
    return Route(None, f"no worker alive for {worker_type!r} at tier {' or '.join(tried)}")


class Routes:
    """A client's direct routes, from the workers and the rules routers publish in the workers bucket.

    Args:
        registry: Followed live (started by the caller).
        default_tier: The tier when neither a rule, the task nor a live worker names one.
    """

    def __init__(self, registry: Registry, default_tier: str) -> None:
        self.registry = registry
        self.default_tier = default_tier
        self._cache: dict[tuple[str, str | None], Route | None] = {}
        self._seen: tuple[Any, Any] = (None, None)

    def direct(self, worker_type: str, requested: str | None) -> Route | None:
        """The route to publish a task on directly, or None if it must go through the router."""
        reg = self.registry
        rules = reg.rules
        if self._seen[0] is not reg.tiers or self._seen[1] is not rules:
            self._seen = (reg.tiers, rules)
            self._cache.clear()
        key = (worker_type, requested)
        try:
            return self._cache[key]
        except KeyError:
            pass
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        route: Route | None = None
        if rules is not None and worker_type not in rules.limited_workers:
            decided = decide(worker_type, requested, rules.tier_overrides, rules.fallback, reg, self.default_tier)
            if decided.tier is not None and decided.tier not in rules.limited_tiers:
                route = decided
        self._cache[key] = route
        return route

    def route(self, subject: str, headers: dict[str, str]) -> str:
        """The subject to publish an incoming task on; sets the routed headers when it is direct.

        ``headers`` are the task's envelope (``Heddle-Worker-Type``, maybe
        ``Heddle-Tier-Requested``, ``Nats-Msg-Id`` = task id).
        """
        route = self.direct(headers[names.HDR_WORKER_TYPE], headers.get(names.HDR_TIER_REQUESTED))
        if route is None:
            return subject
        task_id = headers[names.HDR_MSG_ID]
        headers[names.HDR_TIER] = route.tier  # type: ignore[assignment]
        headers[names.HDR_ROUTE_REASON] = route.reason
        headers[names.HDR_TASK_ID] = task_id
        headers[names.HDR_MSG_ID] = names.routed_msg_id(task_id)
        return names.banded_subject(route.subject, headers.get(names.HDR_PRIORITY))
