"""Tasks for tests/test_priorities.py: each run logs ``time pid start n`` to HEDDLE_TEST_LOG.

HEDDLE_TEST_LOW_AGING (seconds) shortens how long a held low-priority task waits
behind default ones (heddle.bands.LOW_AGING_S), so a test can watch it progress.
"""

import os
import time

import heddle
import heddle.bands

app = heddle.Heddle(os.environ.get("HEDDLE_TEST_APP", "prioritized"))
if os.environ.get("HEDDLE_TEST_LOW_AGING"):
    heddle.bands.LOW_AGING_S = float(os.environ["HEDDLE_TEST_LOW_AGING"])  # type: ignore[misc]


def _record(n: int) -> None:
    fd = os.open(os.environ["HEDDLE_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{time.time():.6f} {os.getpid()} start {n}\n".encode())
    finally:
        os.close(fd)


@app.task
def step(n: int, hold_s: float = 0.005) -> int:
    _record(n)
    time.sleep(hold_s)
    return n


@app.task(priority=8)
def urgent(n: int) -> int:
    _record(n)
    return n
