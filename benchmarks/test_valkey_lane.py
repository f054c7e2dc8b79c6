"""One task's Valkey round trips: the claim and store scripts on the lane, against valkey-py's pool.

Every task crosses Valkey twice (claim, then store), and a lone task waits for
both. This times ``claim_many`` and ``store_many`` for one task at a time on a
:class:`~heddle.store.ResultBackend` as the worker uses it (on uvloop, the
worker's loop): through the lane (``heddle.valkeylane``, the default), then
with the lane closed and not reopened, so the same calls go through valkey-py's
pool and pipeline, and a plain ``PING`` on a raw asyncio protocol as the floor,
all against the same valkey-server in the same run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from harness import median, percentile, run_async
from rich.table import Table

from heddle.messages import SUCCESS, ResultRecord
from heddle.settings import Settings
from heddle.store import ResultBackend, StoreRequest, encode_record

_CALLS = 3000
_WARMUP = 300


class _Ping(asyncio.Protocol):
    """The floor: PING written on a bare protocol, its reply awaited."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def ping(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(b"*1\r\n$4\r\nPING\r\n")
        await self.waiter


async def _one_round(valkey_url: str, host: str, port: int) -> dict[str, float]:
    backend = ResultBackend(Settings(valkey_url=valkey_url))
    await backend.connect()
    out: dict[str, float] = {}
    try:
        for path in ("lane", "pool"):
            if path == "pool":
                assert backend._lanes is not None
                backend._lanes.close()
                backend._lanes = None  # not reopened: every script goes through the pool
            else:
                assert backend.lane is not None
            claims, stores = [], []
            for i in range(_WARMUP + _CALLS):
                task_id = uuid.uuid4().hex
                t0 = time.perf_counter()
                await backend.claim_many([task_id], "bench")
                t1 = time.perf_counter()
                record = encode_record(ResultRecord(id=task_id, state=SUCCESS, task="bench.noop"))
                t2 = time.perf_counter()
                await backend.store_many([StoreRequest(task_id, SUCCESS, record)])
                t3 = time.perf_counter()
                if i >= _WARMUP:
                    claims.append(t1 - t0)
                    stores.append(t3 - t2)
            out[f"{path}_claim_p50_us"] = percentile(claims, 50) * 1e6
            out[f"{path}_store_p50_us"] = percentile(stores, 50) * 1e6
        _, ping = await asyncio.get_running_loop().create_connection(_Ping, host, port)
        pings = []
        for i in range(_WARMUP + _CALLS):
            t0 = time.perf_counter()
            await ping.ping()
            if i >= _WARMUP:
                pings.append(time.perf_counter() - t0)
        ping.transport.close()
        out["ping_p50_us"] = percentile(pings, 50) * 1e6
    finally:
        await backend.close()
    return out


def test_a_tasks_valkey_round_trips_on_the_lane_against_the_pool(servers: Any, bench_config: Any,
                                                                report: Any) -> None:
    host, port = servers.valkey.host, servers.valkey.port
    rounds = [run_async(lambda: _one_round(servers.valkey_url, host, port), uvloop=True)
              for _ in range(bench_config.rounds)]
    figures = {key: median([r[key] for r in rounds]) for key in rounds[0]}
    report.add("valkey_lane", {"calls": _CALLS, "rounds": bench_config.rounds, **figures})
    t = Table(title=f"One task's Valkey round trips, {_CALLS} calls each, p50 in us (median of "
                    f"{bench_config.rounds} rounds)")
    for col in ("path", "claim", "store"):
        t.add_column(col, justify="right" if col != "path" else "left")
    t.add_row("lane (default)", f"{figures['lane_claim_p50_us']:.0f}", f"{figures['lane_store_p50_us']:.0f}")
    t.add_row("valkey-py pool + pipeline", f"{figures['pool_claim_p50_us']:.0f}", f"{figures['pool_store_p50_us']:.0f}")
    t.add_row("floor: PING on a bare protocol", f"{figures['ping_p50_us']:.0f}", "")
    report.show(t)
