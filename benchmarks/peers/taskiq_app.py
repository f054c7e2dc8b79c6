"""taskiq's side of the peers benchmark: ``taskiq worker peers.taskiq_app:broker``.

The JetStream broker of taskiq-nats (``PullBasedJetStreamBroker``: a stream and
a durable pull consumer on the embedded nats-server, from
``HEDDLE_PEERS_NATS_URL``), and taskiq-redis's ``RedisAsyncResultBackend`` on
the embedded valkey-server (database 3). taskiq-nats's own result backend
(``NATSObjectStoreResultBackend``) stores each result as a NATS object (three
JetStream requests per result: a metadata lookup, the chunk, the metadata) and
reads one through an ordered consumer, so the Redis one, the usual pairing, is
used. Results are JSON (taskiq-redis defaults to pickle); every other setting
is taskiq's default, among them acks after the result is saved.
"""

from __future__ import annotations

import os

from taskiq.serializers import JSONSerializer
from taskiq_nats import PullBasedJetStreamBroker
from taskiq_redis import RedisAsyncResultBackend

_NATS_URL = os.environ.get("HEDDLE_PEERS_NATS_URL", "nats://127.0.0.1:4222")
_REDIS_URL = os.environ.get("HEDDLE_PEERS_REDIS_URL", "redis://127.0.0.1:6379") + "/3"

broker = PullBasedJetStreamBroker(
    servers=_NATS_URL,
    subject="peers.taskiq.tasks",
    stream_name="PEERS_TASKIQ",
    durable="peers_taskiq",
).with_result_backend(RedisAsyncResultBackend(redis_url=_REDIS_URL, serializer=JSONSerializer()))


@broker.task(task_name="peers.noop")
async def noop() -> None:
    """Do nothing."""
