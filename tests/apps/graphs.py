"""Tasks for task-graph and pipeline tests.

``define(app)`` declares them on any app (in-process tests make their own);
the module-level ``app`` is for worker and orchestrator processes, named by
HEDDLE_TEST_APP so that every test gets its own worker type.

Every run is recorded as a line in HEDDLE_TEST_LOG (pid, kind, task id), so a
test can count how often each node ran, across processes. HEDDLE_TEST_STEP_S
sets how long ``step`` sleeps.
"""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace
from typing import Any

import heddle


def record(kind: str, value: object) -> None:
    """Append ``pid kind value`` to the executions log, if there is one."""
    path = os.environ.get("HEDDLE_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {kind} {value}\n")


def _me() -> str:
    return heddle.current_task().id


def define(app: heddle.Heddle) -> SimpleNamespace:
    """Declare the graph test tasks on ``app``."""

    @app.task(name="graphs.add")
    def add(x: int, y: int) -> int:
        record("done", _me())
        return x + y

    @app.task(name="graphs.mul")
    def mul(x: int, y: int) -> int:
        record("done", _me())
        return x * y

    @app.task(name="graphs.tsum")
    def tsum(values: list[int]) -> int:
        record("done", _me())
        return sum(values)

    @app.task(name="graphs.double")
    def double(x: int) -> int:
        record("done", _me())
        return 2 * x

    @app.task(name="graphs.pair")
    def pair(x: Any, y: Any) -> list[Any]:
        return [x, y]

    @app.task(name="graphs.slow")
    async def slow(x: int, seconds: float) -> int:
        """Sleeps, then returns ``x``; finishes in a different order than it starts."""
        await asyncio.sleep(seconds)
        return x

    @app.task(name="graphs.step")
    async def step(x: int) -> int:
        """One step of a long chain: sleeps HEDDLE_TEST_STEP_S, records start and end."""
        me = _me()
        record("start", me)
        await asyncio.sleep(float(os.environ.get("HEDDLE_TEST_STEP_S", "0.05")))
        record("done", me)
        return x + 1

    @app.task(name="graphs.fail")
    def fail(*args: Any) -> None:
        record("done", _me())
        raise ValueError(f"fail was given {list(args)}")

    @app.task(name="graphs.fallback")
    def fallback(failure: dict[str, Any], value: Any = "recovered") -> dict[str, Any]:
        record("done", _me())
        return {"value": value, "failed": failure["name"], "type": failure["type"], "message": failure["message"]}

    @app.task(name="graphs.split")
    def split(n: int) -> list[int]:
        return list(range(n))

    @app.task(name="graphs.noop")
    async def noop() -> None:
        return None

    @app.task(name="graphs.extract")
    def extract(text: str) -> dict[str, Any]:
        """A pipeline stage: claims are the sentences, the language a fixed guess."""
        record("done", _me())
        claims = [s.strip() for s in text.split(".") if s.strip()]
        return {"claims": claims, "lang": "en", "words": len(text.split())}

    @app.task(name="graphs.pause")
    async def pause(label: str, seconds: float) -> dict[str, Any]:
        """A pipeline stage that takes a while and reports when it ran."""
        start = time.time()
        await asyncio.sleep(seconds)
        record("done", _me())
        return {"label": label, "start": start, "end": time.time()}

    @app.task(name="graphs.count")
    def count(claims: list[str], note: str = "") -> dict[str, Any]:
        record("done", _me())
        return {"n": len(claims), "note": note}

    @app.task(name="graphs.flaky")
    def flaky(key: str) -> str:
        """Fails on its first attempt for ``key`` (per executions log), then succeeds."""
        marker = f"{os.environ.get('HEDDLE_TEST_LOG', '')}.{key}.tried"
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError(f"first attempt for {key} fails")
        return f"ok {key}"

    return SimpleNamespace(**{t.__name__: t for t in (
        add, mul, tsum, double, pair, slow, step, fail, fallback, split, noop, extract, pause, count, flaky,
    )})


app = heddle.Heddle(
    os.environ.get("HEDDLE_TEST_APP", "graphs"),
    ack_wait_s=float(os.environ.get("HEDDLE_TEST_ACK_WAIT", "30")),
)
tasks = define(app)

