"""Helpers for the fault-injection suite: sizes from the environment, the one JSON
line of figures per test, submitting many tasks, and reading results straight
from Valkey (so a count of finished tasks needs no result subscriptions).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import valkey

import heddle
from heddle import names
from heddle.messages import READY_STATES, SUCCESS, ResultRecord
from heddle.store import decode_record
from tests.conftest import executions

CHAOS = "tests.apps.chaos"
RESULTS_FILE = Path(__file__).resolve().parent / "results.jsonl"
SOAK = os.environ.get("HEDDLE_CHAOS_SOAK", "") not in ("", "0")
# Per-test time limit (pytest-timeout): above the suite's 120 s default, far above a CI run.
TIMEOUT_S = 3600 if SOAK else 300


def size(name: str, ci: float, soak: float) -> float:
    """A size: ``$HEDDLE_CHAOS_{name}`` if set, else the soak or the CI default."""
    raw = os.environ.get(f"HEDDLE_CHAOS_{name}")
    return float(raw) if raw else (soak if SOAK else ci)


def emit(test: str, **figures: Any) -> dict[str, Any]:
    """Print one JSON line of figures and append it to tests/chaos/results.jsonl."""
    line = {"test": test, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "soak": SOAK, **figures}
    text = json.dumps(line, sort_keys=False)
    print(text, flush=True)
    with open(RESULTS_FILE, "a") as f:
        f.write(text + "\n")
    return line


def client_app(env: dict[str, str]) -> heddle.Heddle:
    """The sending side: an app named like the workers'."""
    return heddle.Heddle(
        env["HEDDLE_TEST_APP"],
        nats_url=env["NATS_URL"],
        valkey_url=env["VALKEY_URL"],
        ack_wait_s=float(env.get("HEDDLE_TEST_ACK_WAIT", "30")),
    )


async def asubmit(app: heddle.Heddle, task: str, arglist: Sequence[tuple[Any, ...]]) -> list[tuple[str, float]]:
    """Send tasks through Heddle's client; (task id, send time) once JetStream stored each."""
    out: list[tuple[str, float]] = []
    chunk = 500
    for i in range(0, len(arglist), chunk):
        sent = []
        for args in arglist[i : i + chunk]:
            sent.append((app.send_task(task, args), time.time()))
        await asyncio.gather(*(r.sent() for r, _ in sent))
        out.extend((r.id, t) for r, t in sent)
    return out


def submit(env: dict[str, str], task: str, arglist: Sequence[tuple[Any, ...]]) -> list[tuple[str, float]]:
    """``asubmit`` on a client of its own, closed afterwards."""

    async def main() -> list[tuple[str, float]]:
        app = client_app(env)
        try:
            return await asubmit(app, task, arglist)
        finally:
            await app.aclose()

    return asyncio.run(main())


class Results:
    """Reads task states and records straight from Valkey, pipelined."""

    def __init__(self, url: str) -> None:
        self.client = valkey.Valkey.from_url(url, socket_timeout=5, socket_connect_timeout=2)

    def close(self) -> None:
        self.client.close()

    def states(self, ids: Sequence[str]) -> list[str | None]:
        pipe = self.client.pipeline(transaction=False)
        for tid in ids:
            pipe.hget(names.result_key(tid), "state")
        return [s.decode() if s else None for s in pipe.execute()]

    def finished(self, ids: Sequence[str]) -> int | None:
        """How many of ``ids`` have a final state; None while Valkey cannot be reached."""
        try:
            return sum(1 for s in self.states(ids) if s in READY_STATES)
        except valkey.exceptions.ConnectionError:
            return None

    def records(self, ids: Sequence[str]) -> dict[str, tuple[str | None, ResultRecord | None]]:
        pipe = self.client.pipeline(transaction=False)
        for tid in ids:
            pipe.hmget(names.result_key(tid), ["state", "record"])
        out: dict[str, tuple[str | None, ResultRecord | None]] = {}
        for tid, (state, rec) in zip(ids, pipe.execute(), strict=True):
            out[tid] = (state.decode() if state else None, decode_record(rec) if rec else None)
        return out


def wait_progress(
    results: Results, ids: Sequence[str], at_least: int, timeout_s: float, what: str, check: Any = None
) -> int:
    """Wait until ``at_least`` of ``ids`` are final (calling ``check()`` each round); return the count."""
    deadline = time.monotonic() + timeout_s
    done = 0
    while time.monotonic() < deadline:
        if check is not None:
            check()
        n = results.finished(ids)
        if n is not None:
            done = n
            if n >= at_least:
                return n
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}: {done}/{at_least} finished")


def starts_per_task(env: dict[str, str]) -> Counter[int]:
    return Counter(int(v) for _, kind, v in executions(env) if kind == "start")


def percentile(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def successes(recs: dict[str, tuple[str | None, ResultRecord | None]]) -> int:
    return sum(1 for st, _ in recs.values() if st == SUCCESS)
