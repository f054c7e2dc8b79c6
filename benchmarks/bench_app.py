"""The app the benchmark worker process runs: ``heddle worker -A bench_app``.

Its tasks do no work, so what is measured is Heddle's own cost per task:
JetStream delivery, the Valkey claim and store, the result notice and the ack.
The app name comes from ``HEDDLE_BENCH_APP`` so that the benchmark process and
the worker process it starts agree on it; the servers come from ``NATS_URL`` and
``VALKEY_URL`` as for any worker.
"""

from __future__ import annotations

import os

import heddle

app = heddle.Heddle(os.environ.get("HEDDLE_BENCH_APP", "bench"))


@app.task(name="bench.noop")
async def noop() -> None:
    """Do nothing, on the worker's event loop."""


@app.task(name="bench.noop_sync")
def noop_sync() -> None:
    """Do nothing, in the worker's thread pool."""
