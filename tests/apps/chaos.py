"""Tasks for the fault-injection suite (tests/chaos/).

The app name comes from HEDDLE_TEST_APP so every test has its own worker type.
Every execution is recorded by the task itself as a line ``pid kind n`` in
HEDDLE_TEST_LOG ("start" before the work, "done" after it), which is how the
suite counts duplicate executions across worker processes that get killed.

HEDDLE_TEST_SLEEP, set in one worker's environment, makes every task sleep that
long there, whatever it was sent with.
"""

import asyncio
import os

import heddle

app = heddle.Heddle(
    os.environ.get("HEDDLE_TEST_APP", "chaos"),
    ack_wait_s=float(os.environ.get("HEDDLE_TEST_ACK_WAIT", "30")),
    max_deliver=int(os.environ.get("HEDDLE_TEST_MAX_DELIVER", "100")),
)


def _record(kind: str, n: int) -> None:
    path = os.environ.get("HEDDLE_TEST_LOG")
    if path:
        # One short O_APPEND write per line: lines from several processes never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {kind} {n}\n".encode())
        finally:
            os.close(fd)


def _seconds(sent: float) -> float:
    return float(os.environ.get("HEDDLE_TEST_SLEEP", sent))


def expected(n: int) -> int:
    """What ``work(n, ...)`` returns: lets a test check every result is the right one."""
    return n * n + 7


@app.task
async def work(n: int, seconds: float) -> int:
    _record("start", n)
    await asyncio.sleep(_seconds(seconds))
    _record("done", n)
    return expected(n)


@app.task
async def stamp(n: int, seconds: float) -> str:
    """Returns which process ran it, so a stale result from another worker is visible."""
    _record("start", n)
    await asyncio.sleep(_seconds(seconds))
    _record("done", n)
    return f"{os.getpid()}:{n}"


@app.task
def sync_stamp(n: int, seconds: float) -> str:
    import time

    _record("start", n)
    time.sleep(_seconds(seconds))
    _record("done", n)
    return f"{os.getpid()}:{n}"


@app.task
def echo(n: int) -> int:
    return n


@app.task
def poison(n: int) -> int:
    """Always raises: with no retries it must end in the dead-letter stream."""
    raise ValueError(f"poison task {n} always fails")


@app.task
def sync_work(n: int, seconds: float) -> int:
    """The sync twin of ``work``: runs in the worker's thread pool."""
    import time

    _record("start", n)
    time.sleep(_seconds(seconds))
    _record("done", n)
    return expected(n)
