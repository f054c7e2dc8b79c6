"""Celery's side of the peers benchmark: ``celery -A peers.celery_app worker``.

Broker and result backend are both the Redis protocol on the embedded
valkey-server (database 1), from ``HEDDLE_PEERS_REDIS_URL``. Everything else is
Celery's default: JSON serializer, early acks (``acks_late=False``), a prefetch
multiplier of 4, results kept for a day.
"""

from __future__ import annotations

import os

from celery import Celery

_URL = os.environ.get("HEDDLE_PEERS_REDIS_URL", "redis://127.0.0.1:6379") + "/1"

app = Celery("peers", broker=_URL, backend=_URL)
# Quieter start-up: no "broker_connection_retry" deprecation warning on every worker start.
app.conf.broker_connection_retry_on_startup = True


@app.task(name="peers.noop")
def noop() -> None:
    """Do nothing."""
