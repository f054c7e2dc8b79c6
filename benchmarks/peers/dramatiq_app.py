"""Dramatiq's side of the peers benchmark: ``dramatiq peers.dramatiq_app``.

The Redis broker on the embedded valkey-server (database 2), from
``HEDDLE_PEERS_REDIS_URL``, with the two optional middlewares the workloads
need: ``Results`` with the Redis result backend (round trips wait on a blocking
``BRPOPLPUSH``) and ``GroupCallbacks`` with the Redis rate-limiter backend (the
fan-in: a group's completion callback, Dramatiq's counterpart of a chord body).
Everything else is Dramatiq's default middleware and JSON encoding.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import GroupCallbacks
from dramatiq.rate_limits.backends import RedisBackend as RateLimiterBackend
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend as ResultBackend

_URL = os.environ.get("HEDDLE_PEERS_REDIS_URL", "redis://127.0.0.1:6379") + "/2"

broker = RedisBroker(url=_URL)
broker.add_middleware(Results(backend=ResultBackend(url=_URL)))
broker.add_middleware(GroupCallbacks(RateLimiterBackend(url=_URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="peers_noop", store_results=True)
def noop() -> None:
    """Do nothing."""
