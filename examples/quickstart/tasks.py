"""The quickstart's tasks: what a user module for ``heddle-worker -A tasks`` looks like."""

from __future__ import annotations

import asyncio
import random

import heddle

app = heddle.Heddle("quickstart")  # NATS_URL / VALKEY_URL from the environment


@app.task
def add(x: int, y: int) -> int:
    """Sync tasks run in the worker's thread pool."""
    return x + y


@app.task(timeout=5)
async def slow_echo(text: str, delay_s: float = 0.0) -> str:
    """Async tasks run on the worker's event loop."""
    await asyncio.sleep(delay_s)
    return text


@app.task(retries=3, retry_backoff=0.2, autoretry_for=(ConnectionError,))
def flaky_fetch(url: str, fail_ratio: float = 0.6) -> dict[str, str]:
    """Fails now and then; retried with exponential backoff."""
    if random.random() < fail_ratio:
        raise ConnectionError(f"could not reach {url}")
    return {"url": url, "status": "ok"}


@app.task
def divide(x: float, y: float) -> float:
    """Raises for y == 0; the caller gets a TaskError with the remote traceback."""
    return x / y
