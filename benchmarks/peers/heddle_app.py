"""Heddle's side of the peers benchmark: ``heddle-worker -A peers.heddle_app``.

A separate app (``peers``) from ``bench_app`` so that the peers run never shares
a worker type, a consumer or a worker process with the other benchmarks. The
servers come from ``NATS_URL`` and ``VALKEY_URL`` as for any worker.
"""

from __future__ import annotations

import heddle

app = heddle.Heddle("peers")


@app.task(name="peers.noop")
async def noop() -> None:
    """Do nothing, on the worker's event loop."""


@app.task(name="peers.noop_sync")
def noop_sync() -> None:
    """Do nothing, in the worker's thread pool."""
