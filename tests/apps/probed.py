"""Tasks for the health and metrics tests (tests/test_health.py).

The app name comes from HEDDLE_TEST_APP, so every test gets its own worker type
and consumer; HEDDLE_TEST_LIVENESS sets ``liveness_timeout_s``. Tasks that hold
on wait for a flag file the test creates when it has seen what it wanted.
"""

import os
import time

import heddle
from heddle.metrics import record_llm_tokens

app = heddle.Heddle(
    os.environ.get("HEDDLE_TEST_APP", "probed"),
    liveness_timeout_s=float(os.environ.get("HEDDLE_TEST_LIVENESS", "60")),
)


def _wait_for_file(path: str) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


@app.task
async def hog_the_loop(flag: str) -> str:
    """Deliberately wrong: a blocking wait inside an async task freezes the worker's event loop."""
    _wait_for_file(flag)
    return "released"


@app.task
def hold_a_slot(flag: str) -> str:
    """A sync task: it waits in its thread and keeps one slot busy; the loop runs on."""
    _wait_for_file(flag)
    return "released"


@app.task
def echo(n: int) -> int:
    return n


@app.task(retries=1, retry_backoff=False, retry_delay=0.05)
def always_fails(n: int) -> int:
    raise ValueError(f"no good: {n}")


@app.task
def use_tokens(model: str) -> None:
    """Counts tokens the way the LLM clients do."""
    record_llm_tokens(model, 10, 5)
