"""Prometheus metrics without a dependency: counters, histograms, the text format.

Every actor process has one :data:`REGISTRY`; the health server
(:mod:`heddle.health`) renders it on ``/metrics`` together with gauges read at
scrape time (in-flight tasks, consumer pending and ack-pending). Metric
families are declared once here, at import; the per-message code only adds to
a value under a tuple of label values it already has.

Label sets come partly from the wire (task names), so each family keeps at
most ``max_series`` of them; later ones are counted under the label value
``_other`` rather than growing without bound.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from heddle.errors import ConfigError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OVERFLOW_LABEL = "_other"
DEFAULT_MAX_SERIES = 2000

# Seconds; LLM calls take seconds to minutes, plain Python tasks milliseconds.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class Sample:
    """One line of the text format: a name, label values and a value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class Family:
    """A metric family ready to render: its ``# HELP`` and ``# TYPE`` lines and samples."""

    name: str
    kind: str  # counter, gauge or histogram
    help: str
    samples: tuple[Sample, ...]


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str], max_series: int) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.max_series = max_series
        self._lock = threading.Lock()
        self._overflow = (OVERFLOW_LABEL,) * len(self.labelnames)

    def _key(self, labels: tuple[str, ...], known: Mapping[tuple[str, ...], object]) -> tuple[str, ...]:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labels!r}")
        if labels not in known and len(known) >= self.max_series:
            return self._overflow
        return labels

    def family(self) -> Family:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set.

    ``name`` ends in ``_total``, as the text format expects of counters.
    """

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str], max_series: int = DEFAULT_MAX_SERIES):
        if not name.endswith("_total"):
            raise ConfigError(f"counter {name!r} must end in _total")
        super().__init__(name, help, labelnames, max_series)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0) to the series of ``labels`` (values in ``labelnames`` order)."""
        if amount < 0:
            raise ValueError(f"{self.name} can only go up, got {amount}")
        with self._lock:
            key = self._key(labels, self._values)
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, labels: tuple[str, ...]) -> float:
        """The current value for ``labels`` (0 if never incremented)."""
        with self._lock:
            return self._values.get(labels, 0.0)

    def family(self) -> Family:
        with self._lock:
            items = list(self._values.items())
        samples = tuple(Sample(self.name, tuple(zip(self.labelnames, k, strict=True)), v) for k, v in items)
        return Family(self.name, self.kind, self.help, samples)


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = DURATION_BUCKETS_S,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ConfigError(f"histogram {name!r} needs increasing bucket bounds, got {tuple(buckets)}")
        super().__init__(name, help, labelnames, max_series)
        self.bounds = bounds
        # Per label set: per-bucket counts (the last one is +Inf), the sum.
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Record one observation (e.g. a task's run time in seconds)."""
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            key = self._key(labels, self._series)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = ([0] * (len(self.bounds) + 1), [0.0])
            series[0][i] += 1
            series[1][0] += value

    def count(self, labels: tuple[str, ...]) -> int:
        """How many observations ``labels`` has."""
        with self._lock:
            series = self._series.get(labels)
            return sum(series[0]) if series else 0

    def family(self) -> Family:
        with self._lock:
            items = [(k, list(counts), total[0]) for k, (counts, total) in self._series.items()]
        samples: list[Sample] = []
        # Bounds as floats ("1.0", not "1"), as the official clients write them.
        edges = [*(repr(b) for b in self.bounds), "+Inf"]
        for key, counts, total in items:
            base = tuple(zip(self.labelnames, key, strict=True))
            running = 0
            for edge, n in zip(edges, counts, strict=True):
                running += n
                samples.append(Sample(f"{self.name}_bucket", (*base, ("le", edge)), running))
            samples.append(Sample(f"{self.name}_sum", base, total))
            samples.append(Sample(f"{self.name}_count", base, running))
        return Family(self.name, self.kind, self.help, tuple(samples))


class Registry:
    """The metric families of one process, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ConfigError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help: str, labelnames: Sequence[str]) -> Counter:
        """Declare and register a counter."""
        c = Counter(name, help, labelnames)
        self._add(c)
        return c

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str], buckets: Sequence[float] = DURATION_BUCKETS_S
    ) -> Histogram:
        """Declare and register a histogram."""
        h = Histogram(name, help, labelnames, buckets)
        self._add(h)
        return h

    def families(self) -> list[Family]:
        """A consistent snapshot of every registered family."""
        return [m.family() for m in self._metrics.values()]


def gauge(name: str, help: str, samples: Iterable[tuple[dict[str, str], float]]) -> Family:
    """A gauge family read at scrape time, from ``(labels, value)`` pairs."""
    return Family(name, "gauge", help, tuple(Sample(name, tuple(lb.items()), v) for lb, v in samples))


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def render(families: Iterable[Family]) -> bytes:
    """The Prometheus text exposition format (version 0.0.4) of ``families``."""
    lines: list[str] = []
    for f in families:
        lines.append(f"# HELP {f.name} {_escape_help(f.help)}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for s in f.samples:
            if s.labels:
                body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels)
                lines.append(f"{s.name}{{{body}}} {_fmt(s.value)}")
            else:
                lines.append(f"{s.name} {_fmt(s.value)}")
    return ("\n".join(lines) + "\n").encode()


# -- Heddle's metric families -----------------------------------------------------------

REGISTRY = Registry()

_TASK_LABELS = ("worker_type", "task", "tier")
TASKS_RECEIVED = REGISTRY.counter(
    "heddle_tasks_received_total", "Task messages fetched by workers.", _TASK_LABELS
)
TASKS_SUCCEEDED = REGISTRY.counter(
    "heddle_tasks_succeeded_total", "Tasks that finished with SUCCESS.", _TASK_LABELS
)
TASKS_FAILED = REGISTRY.counter(
    "heddle_tasks_failed_total", "Tasks that finished with FAILURE (after their last attempt).", _TASK_LABELS
)
TASKS_RETRIED = REGISTRY.counter(
    "heddle_tasks_retried_total", "Failed attempts that were scheduled for a retry.", _TASK_LABELS
)
TASK_DURATION = REGISTRY.histogram(
    "heddle_task_duration_seconds", "Run time of task attempts, from claim to outcome.", _TASK_LABELS
)
LLM_TOKENS = REGISTRY.counter(
    "heddle_llm_tokens_total", "LLM tokens used, by model and kind (input or output).", ("model", "kind")
)


def record_llm_tokens(model: str, input_tokens: int, output_tokens: int) -> None:
    """Count the tokens of one LLM call (called by the LLM clients)."""
    if input_tokens:
        LLM_TOKENS.inc((model, "input"), input_tokens)
    if output_tokens:
        LLM_TOKENS.inc((model, "output"), output_tokens)


class WorkerMetrics:
    """A worker's view of the task counters, with its worker type bound once.

    The tier label is the last token of the routed subject
    (``heddle.tasks.{worker_type}.{tier}``): the tier the task was actually
    routed to, known without decoding the message.

    Args:
        worker_type: The worker type of the worker counting.
    """

    __slots__ = ("worker_type",)

    def __init__(self, worker_type: str) -> None:
        self.worker_type = worker_type

    def received(self, subject: str, task: str) -> None:
        """Count a fetched message (``task`` may be empty if it cannot be decoded)."""
        TASKS_RECEIVED.inc((self.worker_type, task, subject.rpartition(".")[2]))

    def succeeded(self, subject: str, task: str, duration_s: float) -> None:
        """Count a stored SUCCESS and observe the attempt's run time."""
        labels = (self.worker_type, task, subject.rpartition(".")[2])
        TASKS_SUCCEEDED.inc(labels)
        TASK_DURATION.observe(labels, duration_s)

    def failed(self, subject: str, task: str, duration_s: float) -> None:
        """Count a stored final FAILURE and observe the attempt's run time."""
        labels = (self.worker_type, task, subject.rpartition(".")[2])
        TASKS_FAILED.inc(labels)
        TASK_DURATION.observe(labels, duration_s)

    def retried(self, subject: str, task: str, duration_s: float) -> None:
        """Count a failed attempt that will be retried and observe its run time."""
        labels = (self.worker_type, task, subject.rpartition(".")[2])
        TASKS_RETRIED.inc(labels)
        TASK_DURATION.observe(labels, duration_s)
