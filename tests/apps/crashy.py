"""Tasks for process-level tests. The app name comes from HEDDLE_TEST_APP so that
every test gets its own worker type, consumer and subjects.

Executions are recorded as lines in HEDDLE_TEST_LOG (pid, task, argument), so a
test can count how often each task ran across worker processes.

HEDDLE_TEST_SLEEP, set in one worker's environment, makes the sleeping tasks
sleep that long there whatever they were sent with: a slow first worker and a
fast second one run the same messages.
"""

import asyncio
import os
import signal
import time

import heddle

app = heddle.Heddle(
    os.environ.get("HEDDLE_TEST_APP", "crashy"),
    ack_wait_s=float(os.environ.get("HEDDLE_TEST_ACK_WAIT", "30")),
    max_deliver=int(os.environ.get("HEDDLE_TEST_MAX_DELIVER", "30")),
)


def _seconds(sent: float) -> float:
    return float(os.environ.get("HEDDLE_TEST_SLEEP", sent))


def _record(kind: str, value: object) -> None:
    path = os.environ.get("HEDDLE_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {kind} {value}\n")


@app.task
async def sleepy(n: int, seconds: float) -> int:
    _record("start", n)
    await asyncio.sleep(_seconds(seconds))
    _record("done", n)
    return n


@app.task
def sync_sleepy(n: int, seconds: float) -> int:
    _record("start", n)
    time.sleep(_seconds(seconds))
    _record("done", n)
    return n


@app.task
def echo(n: int) -> int:
    _record("done", n)
    return n


@app.task
def suicide(n: int) -> int:
    """Kills its own worker: the message can never be acked."""
    _record("start", n)
    os.kill(os.getpid(), signal.SIGKILL)
    return n
