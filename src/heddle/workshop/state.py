"""What the Workshop remembers from the event stream: recent tasks and throughput.

Bounded and in memory: the newest ``max_tasks`` tasks (an ordered dict, the
oldest dropped first) and per-second success and failure counts for the last
``window_s`` seconds. A restarted Workshop starts empty; a task page still
reads the stored result from Valkey and the arguments from the dead-letter
copy when the task is not in memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from heddle import events

# Task event state -> the Celery-style state a task list shows.
_STATE = {
    events.RECEIVED: "PENDING",
    events.STARTED: "STARTED",
    events.RETRIED: "RETRY",
    events.SUCCEEDED: "SUCCESS",
    events.FAILED: "FAILURE",
    events.DEAD_LETTERED: "FAILURE",
    events.EXPIRED: "REVOKED",
}
_FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


@dataclass
class TaskEntry:
    """One task as seen through its events."""

    id: str
    task: str = ""
    worker_type: str = ""
    tier: str = ""
    worker: str = ""
    state: str = "PENDING"
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    first_at: float = 0.0
    last_at: float = 0.0
    duration_s: float = 0.0
    retries: int = 0
    error: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    expires: float | None = None  # not started by then (epoch s), it never runs
    priority: int | None = None  # 0-9 as sent; None: the default
    timeline: list[dict[str, Any]] = field(default_factory=list)


class RecentTasks:
    """The newest tasks, updated from task events."""

    def __init__(self, max_tasks: int = 2000) -> None:
        self.max_tasks = max_tasks
        self._tasks: OrderedDict[str, TaskEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, task_id: str) -> TaskEntry | None:
        """The entry of ``task_id`` if remembered."""
        return self._tasks.get(task_id)

    def add(self, ev: dict[str, Any]) -> TaskEntry:
        """Fold one described task event in; returns the task's entry."""
        tid = ev.get("id", "")
        e = self._tasks.get(tid)
        if e is None:
            e = self._tasks[tid] = TaskEntry(id=tid, first_at=ev.get("at", 0.0))
            while len(self._tasks) > self.max_tasks:
                self._tasks.popitem(last=False)
        for key in ("task", "worker_type", "tier"):
            if ev.get(key):
                setattr(e, key, ev[key])
        state = ev.get("state", "")
        if ev.get("worker") and ev["worker"] != "router":
            e.worker = ev["worker"]
        if "args" in ev:
            e.args, e.kwargs = ev["args"], ev.get("kwargs") or {}
        if ev.get("expires"):
            e.expires = ev["expires"]
        if ev.get("priority") is not None:
            e.priority = ev["priority"]
        new = _STATE.get(state, e.state)
        # Events can arrive out of order (router and worker publish on their own
        # connections): a final state is never replaced by an earlier one.
        if not (e.state in _FINAL and new not in _FINAL):
            e.state = new
        e.last_at = max(e.last_at, ev.get("at", 0.0))
        if ev.get("duration_s"):
            e.duration_s = ev["duration_s"]
        e.retries = max(e.retries, ev.get("retries", 0))
        if ev.get("error"):
            e.error = ev["error"]
        e.input_tokens = max(e.input_tokens, ev.get("input_tokens", 0))
        e.output_tokens = max(e.output_tokens, ev.get("output_tokens", 0))
        e.timeline.append({
            "at": ev.get("at", 0.0), "state": state, "by": ev.get("worker", ""),
            "tier": ev.get("tier", ""), "duration_s": ev.get("duration_s", 0.0), "error": ev.get("error", ""),
        })
        e.timeline.sort(key=lambda t: t["at"])
        self._tasks.move_to_end(tid)
        return e

    def list(self, state: str | None = None, query: str | None = None, limit: int = 200) -> list[TaskEntry]:
        """Newest first, optionally only one state and names or ids containing ``query``."""
        out = []
        q = (query or "").lower()
        for e in reversed(self._tasks.values()):
            if state and e.state != state:
                continue
            if q and q not in e.task.lower() and q not in e.id.lower() and q not in e.worker_type.lower():
                continue
            out.append(e)
            if len(out) >= limit:
                break
        return out


class Throughput:
    """Per-second counts of finished tasks over a sliding window."""

    def __init__(self, window_s: int = 600) -> None:
        self.window_s = window_s
        self._buckets: deque[list[int]] = deque()  # [second, succeeded, failed]

    def add(self, state: str, at: float | None = None) -> None:
        """Count a succeeded or failed event."""
        if state not in (events.SUCCEEDED, events.FAILED):
            return
        sec = int(at or time.time())
        if not self._buckets or self._buckets[-1][0] < sec:
            self._buckets.append([sec, 0, 0])
        bucket = self._buckets[-1] if self._buckets[-1][0] == sec else next(
            (b for b in reversed(self._buckets) if b[0] == sec), None)
        if bucket is None:
            return  # older than what we keep in order; dropped
        bucket[1 if state == events.SUCCEEDED else 2] += 1
        cutoff = sec - self.window_s
        while self._buckets and self._buckets[0][0] < cutoff:
            self._buckets.popleft()

    def series(self, span_s: int = 300, bin_s: int = 10, now: float | None = None) -> list[tuple[int, int, int]]:
        """``(bin start, succeeded, failed)`` per ``bin_s`` over the last ``span_s`` seconds, oldest first."""
        end = int(now or time.time())
        start = end - span_s
        bins = {b: [0, 0] for b in range(start - start % bin_s, end + 1, bin_s)}
        for sec, ok, bad in self._buckets:
            if sec < start:
                continue
            b = sec - sec % bin_s
            if b in bins:
                bins[b][0] += ok
                bins[b][1] += bad
        return [(b, v[0], v[1]) for b, v in sorted(bins.items())]

    def totals(self, span_s: int = 60, now: float | None = None) -> tuple[int, int]:
        """Succeeded and failed in the last ``span_s`` seconds."""
        cutoff = int(now or time.time()) - span_s
        ok = bad = 0
        for sec, o, b in self._buckets:
            if sec >= cutoff:
                ok += o
                bad += b
        return ok, bad


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value`` (at least 1)."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= value:
                return m * step
        step *= 10


def chart_points(
    series: list[tuple[int, int, int]], width: int = 600, height: int = 170, bin_s: int = 10
) -> dict[str, Any]:
    """The throughput chart's SVG geometry: both lines, and axes with ticks and units.

    The x axis is time in minutes before the newest bin (a tick a minute, "now" at
    the right), the y axis tasks finished per ``bin_s`` seconds (ticks at 0, half
    and the top, a round number at least the peak).
    """
    left, right, top, bottom = 52, 20, 10, 40  # room for the tick labels and the axis titles
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([0, *(max(ok, bad) for _, ok, bad in series)])
    y_max = _nice_ceiling(peak)
    n = max(1, len(series) - 1)
    span_s = (series[-1][0] - series[0][0]) if len(series) > 1 else bin_s

    def x_at(i: float) -> float:
        return left + i * plot_w / n

    def y_at(v: float) -> float:
        return top + plot_h - v / y_max * plot_h

    def line(idx: int) -> str:
        return " ".join(f"{x_at(i):.1f},{y_at(row[idx]):.1f}" for i, row in enumerate(series))

    y_ticks = [(f"{y_at(v):.1f}", str(v)) for v in sorted({0, y_max // 2 if y_max % 2 == 0 else 0, y_max})]
    x_ticks = []
    for ago_s in range(0, span_s + 1, 60):
        label = "now" if ago_s == 0 else f"-{ago_s // 60} min"
        x_ticks.append((f"{x_at(n - ago_s / span_s * n):.1f}", label))
    return {
        "ok": line(1), "failed": line(2), "peak": peak, "y_max": y_max, "width": width, "height": height,
        "left": left, "top": top, "right": width - right, "bottom": top + plot_h,
        "x_ticks": x_ticks, "y_ticks": y_ticks,
        "x_title": "time (minutes ago)", "y_title": f"tasks / {bin_s} s",
    }
