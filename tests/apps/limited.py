"""Tasks with concurrency limits, for tests/test_concurrency_limits.py.

The app name comes from HEDDLE_TEST_APP. Every run writes ``time pid start|end
key n`` lines to HEDDLE_TEST_LOG (inside its slot: after it is taken, before it
is given back), from which a test works out how many ran at once.
"""

import asyncio
import os
import time
from pathlib import Path

import heddle

app = heddle.Heddle(
    os.environ.get("HEDDLE_TEST_APP", "limited"),
    ack_wait_s=float(os.environ.get("HEDDLE_TEST_ACK_WAIT", "30")),
    max_deliver=int(os.environ.get("HEDDLE_TEST_MAX_DELIVER", "30")),
)


def _record(kind: str, key: str, n: int) -> None:
    # One short O_APPEND write per line: lines from several processes never interleave.
    fd = os.open(os.environ["HEDDLE_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{time.time():.6f} {os.getpid()} {kind} {key} {n}\n".encode())
    finally:
        os.close(fd)


async def _work(key: str, n: int, hold_s: float, gate: str) -> int:
    _record("start", key, n)
    if gate:
        while not Path(gate).exists():  # held until the test opens the gate
            await asyncio.sleep(0.05)
    await asyncio.sleep(hold_s)
    _record("end", key, n)
    return n


@app.task(concurrency_limit=2, concurrency_key="tenant")
async def per_tenant(tenant: str, n: int, hold_s: float = 0.3, gate: str = "") -> int:
    return await _work(tenant, n, hold_s, gate)


@app.task(concurrency_limit=1, concurrency_key="tenant")
async def one_per_tenant(tenant: str, n: int, hold_s: float = 0.3, gate: str = "") -> int:
    return await _work(tenant, n, hold_s, gate)


@app.task(concurrency_limit=1)
async def one_at_a_time(n: int, hold_s: float = 0.2) -> int:
    return await _work("*", n, hold_s, "")
