"""One driver per framework: how its worker is started and how the pytest process runs each workload.

Every driver does the same three things with the framework's own public API,
in the way its documentation shows:

``throughput(n, meter)``
    Submit ``n`` no-op tasks, then wait for every result; timed from the first
    submission to the last result, after ``WARMUP`` tasks the same way; the
    CPU ``meter`` runs around the timed part.
``round_trips(n)``
    ``n`` sequential calls, each submitting one no-op task and waiting for its
    result; returns the seconds of each call, after ``LATENCY_WARMUP`` calls.
``fan_out(width)``
    ``width`` no-op tasks in parallel, then one more that runs only once all of
    them are done; timed until the last one's result is back.

A driver's ``variants`` are the rows it adds to the tables; the first one is
the framework's row, the others (Heddle's sync task, Heddle's async caller) are
shown for reference. A task that failed raises in every framework's result
call (taskiq's through ``raise_for_error()``), so every figure counts only
tasks that came back with their result.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from collections.abc import Coroutine
from importlib.metadata import version
from typing import Any, Protocol, TypeVar

import uvloop

from heddle.errors import HeddleError
from heddle.testing import EmbeddedServers

from .workers import script

T = TypeVar("T")

WARMUP = 500
LATENCY_WARMUP = 50
RESULT_TIMEOUT_S = 120.0
# taskiq's AsyncTaskiqTask.wait_result polls the result backend; its default
# interval (0.2 s) would put up to 200 ms of sleep into every round trip, so the
# benchmark polls every millisecond. Between polls the caller sleeps, so the
# worker gets the CPU.
TASKIQ_POLL_S = 0.001


def _redis_url(servers: EmbeddedServers) -> str:
    return f"redis://{servers.valkey.host}:{servers.valkey.port}"


def _peer_env(servers: EmbeddedServers) -> dict[str, str]:
    return {"HEDDLE_PEERS_NATS_URL": servers.nats_url, "HEDDLE_PEERS_REDIS_URL": _redis_url(servers)}


def _import_app(module: str, servers: EmbeddedServers) -> Any:
    """Import a peer's app module in this process, pointed at the servers (its URLs come from env)."""
    os.environ.update(_peer_env(servers))
    return importlib.import_module(module)


class _Loop:
    """One uvloop event loop kept for a driver's life: async clients keep their connections on it."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        self._runner.close()


class Meter(Protocol):
    """CPU accounting around a timed part (``workers.TreeCpuMeter``)."""

    def start(self) -> None: ...
    def stop(self) -> dict[str, float]: ...


class Driver:
    """What every framework's driver provides (see the module docstring)."""

    name: str
    # How the caller waits in the round trips: "sync" (blocking get) or "async" (await).
    caller: str
    workloads: tuple[str, ...] = ("throughput", "round_trips", "fan_out")
    package: str
    broker: str
    concurrency: str
    fan_in: str
    variants: tuple[str, ...]

    def version(self) -> str:
        return version(self.package)

    def worker_command(self) -> list[str]:
        raise NotImplementedError

    def worker_env(self) -> dict[str, str]:
        raise NotImplementedError

    def ping(self, timeout_s: float) -> bool:
        """One round trip through the worker; False if no result came within ``timeout_s``."""
        raise NotImplementedError

    def throughput(self, n: int, meter: Meter) -> dict[str, float]:
        """Tasks per second of each variant; ``meter`` runs around the first variant's timed part."""
        raise NotImplementedError

    def round_trips(self, n: int) -> dict[str, list[float]]:
        """Seconds of each sequential round trip, per variant."""
        raise NotImplementedError

    def fan_out(self, width: int) -> float:
        """Seconds of one fan-out/fan-in."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _BlockingDriver(Driver):
    """A framework whose client sends a no-op and blocks for its result (Celery, Dramatiq)."""

    def _send(self) -> Any:
        """Send one no-op; a handle for :meth:`_wait`."""
        raise NotImplementedError

    def _wait(self, handle: Any, timeout_s: float) -> None:
        """Block until the handle's result is in."""
        raise NotImplementedError

    def _batch(self, n: int) -> float:
        t0 = time.perf_counter()
        handles = [self._send() for _ in range(n)]
        for h in handles:
            self._wait(h, RESULT_TIMEOUT_S)
        return n / (time.perf_counter() - t0)

    def throughput(self, n: int, meter: Meter) -> dict[str, float]:
        self._batch(WARMUP)
        meter.start()
        rate = self._batch(n)
        meter.stop()
        return {self.name: rate}

    def round_trips(self, n: int) -> dict[str, list[float]]:
        samples = []
        for i in range(LATENCY_WARMUP + n):
            t0 = time.perf_counter()
            self._wait(self._send(), 30.0)
            if i >= LATENCY_WARMUP:
                samples.append(time.perf_counter() - t0)
        return {self.name: samples}


# -- Heddle -------------------------------------------------------------------------


class HeddleDriver(Driver):
    name = "heddle"
    package = "heddle"
    broker = "NATS JetStream (tasks) + Valkey (results)"
    fan_in = "`chord(group(noop.si() x 100), noop.si())`; the orchestrator hosted by the worker process joins"
    caller = "sync"
    variants = ("heddle", "heddle, sync task", "heddle, async caller")

    def __init__(self, servers: EmbeddedServers, concurrency: int | None = None) -> None:
        self.servers = servers
        self.worker_concurrency = concurrency
        if concurrency is None:
            from heddle.worker import DEFAULT_CONCURRENCY

            self.concurrency = f"default flags: {DEFAULT_CONCURRENCY} (asyncio; sync tasks in its thread pool)"
        else:
            self.concurrency = f"`--concurrency {concurrency}` (asyncio; sync tasks in its thread pool)"
        self.module = importlib.import_module("peers.heddle_app")
        self.app = self.module.app
        self.app.configure(nats_url=servers.nats_url, valkey_url=servers.valkey_url)
        self.loop = _Loop()
        self.loop.run(self.app.connect())

    def worker_command(self) -> list[str]:
        return [
            script("heddle-worker"),
            "-A",
            "peers.heddle_app",
            "--quiet",
            *(("--concurrency", str(self.worker_concurrency)) if self.worker_concurrency is not None else ()),
            "--loglevel",
            "WARNING",
        ]

    def worker_env(self) -> dict[str, str]:
        return {"NATS_URL": self.servers.nats_url, "VALKEY_URL": self.servers.valkey_url}

    def ping(self, timeout_s: float) -> bool:
        async def once() -> bool:
            try:
                await self.module.noop.apply_async().aget(timeout=timeout_s)
            except HeddleError:  # TaskTimeout while the worker starts
                return False
            return True

        return self.loop.run(once())

    async def _throughput(self, task: Any, n: int, meter: Meter | None) -> float:
        for r in [task.apply_async() for _ in range(WARMUP)]:
            await r.aget(timeout=RESULT_TIMEOUT_S)
        if meter:
            meter.start()
        t0 = time.perf_counter()
        results = [task.apply_async() for _ in range(n)]
        for r in results:
            await r.aget(timeout=RESULT_TIMEOUT_S)
        rate = n / (time.perf_counter() - t0)
        if meter:
            meter.stop()
        return rate

    def throughput(self, n: int, meter: Meter) -> dict[str, float]:
        return {
            "heddle": self.loop.run(self._throughput(self.module.noop, n, meter)),
            "heddle, sync task": self.loop.run(self._throughput(self.module.noop_sync, n, None)),
        }

    async def _async_round_trips(self, n: int) -> list[float]:
        samples = []
        for i in range(LATENCY_WARMUP + n):
            t0 = time.perf_counter()
            await self.module.noop.apply_async().aget(timeout=30)
            if i >= LATENCY_WARMUP:
                samples.append(time.perf_counter() - t0)
        return samples

    def sync_round_trips(self, n: int) -> list[float]:
        """``noop.delay().get()``: the Celery-style call, through the client's portal thread."""
        noop = self.module.noop
        samples = []
        for i in range(LATENCY_WARMUP + n):
            t0 = time.perf_counter()
            noop.delay().get(timeout=30)
            if i >= LATENCY_WARMUP:
                samples.append(time.perf_counter() - t0)
        return samples

    def round_trips(self, n: int) -> dict[str, list[float]]:
        return {"heddle": self.sync_round_trips(n), "heddle, async caller": self.loop.run(self._async_round_trips(n))}

    def fan_out(self, width: int) -> float:
        from heddle.graphs.canvas import chord, group

        noop = self.module.noop

        async def once() -> float:
            t0 = time.perf_counter()
            await chord(group(noop.si() for _ in range(width)), noop.si()).apply_async().aget(timeout=60)
            return time.perf_counter() - t0

        return self.loop.run(once())

    def close(self) -> None:
        self.loop.run(self.app.aclose())
        self.loop.close()
        self.app.close()


class HeddleTunedDriver(Driver):
    """Heddle's throughput once more with a tuned ``--concurrency`` (256), beside its defaults."""

    name = "heddle -c 256"
    package = "heddle"
    caller = "sync"
    workloads = ("throughput",)

    def __init__(self, heddle: HeddleDriver, concurrency: int = 256) -> None:
        self.heddle = heddle
        self.broker = heddle.broker
        self.fan_in = "(throughput only)"
        self.worker_concurrency = concurrency
        self.concurrency = f"`--concurrency {concurrency}` (tuned)"
        self.variants = (f"heddle, --concurrency {concurrency}",)

    def worker_command(self) -> list[str]:
        cmd = self.heddle.worker_command()
        i = cmd.index("--quiet") + 1
        return [*cmd[:i], "--concurrency", str(self.worker_concurrency), *cmd[i:]]

    def worker_env(self) -> dict[str, str]:
        return self.heddle.worker_env()

    def ping(self, timeout_s: float) -> bool:
        return self.heddle.ping(timeout_s)

    def throughput(self, n: int, meter: Meter) -> dict[str, float]:
        h = self.heddle
        return {self.variants[0]: h.loop.run(h._throughput(h.module.noop, n, meter))}


# -- Celery -------------------------------------------------------------------------


class CeleryDriver(_BlockingDriver):
    name = "celery"
    package = "celery"
    broker = "Redis protocol on valkey (broker and result backend)"
    fan_in = "`chord(noop.si() x 100)(noop.si())`; the Redis result backend's chord counter joins in the worker"
    caller = "sync"
    variants = ("celery",)

    def __init__(self, servers: EmbeddedServers, pool: str, concurrency: int) -> None:
        self.servers = servers
        self.pool = pool
        self.pool_concurrency = concurrency
        self.concurrency = (
            "`--pool solo` (one task at a time in the worker process)"
            if pool == "solo"
            else f"`--pool {pool} --concurrency {concurrency}`"
        )
        self.module = _import_app("peers.celery_app", servers)

    def worker_command(self) -> list[str]:
        cmd = [script("celery"), "-A", "peers.celery_app", "worker", "--pool", self.pool, "--loglevel", "WARNING"]
        if self.pool != "solo":
            cmd += ["--concurrency", str(self.pool_concurrency)]
        return cmd

    def worker_env(self) -> dict[str, str]:
        return _peer_env(self.servers)

    def ping(self, timeout_s: float) -> bool:
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            self.module.noop.delay().get(timeout=timeout_s)
        except CeleryTimeout:
            return False
        return True

    def _send(self) -> Any:
        return self.module.noop.delay()

    def _wait(self, handle: Any, timeout_s: float) -> None:
        handle.get(timeout=timeout_s)

    def fan_out(self, width: int) -> float:
        from celery import chord

        noop = self.module.noop
        t0 = time.perf_counter()
        chord(noop.si() for _ in range(width))(noop.si()).get(timeout=60)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.module.app.close()


# -- taskiq ---------------------------------------------------------------------------


class TaskiqDriver(Driver):
    name = "taskiq"
    package = "taskiq"
    broker = "taskiq-nats PullBasedJetStreamBroker; results: taskiq-redis on valkey"
    concurrency = "defaults: `--workers 2` processes, `--max-async-tasks 100` each"
    fan_in = (
        "no canvas in taskiq: 100 `kiq()` gathered, each result awaited with `wait_result`, "
        "then one more task sent and awaited (the join is in the caller)"
    )
    caller = "async"
    variants = ("taskiq",)

    def __init__(self, servers: EmbeddedServers) -> None:
        self.servers = servers
        self.module = _import_app("peers.taskiq_app", servers)
        self.loop = _Loop()
        self.loop.run(self.module.broker.startup())

    def worker_command(self) -> list[str]:
        return [script("taskiq"), "worker", "peers.taskiq_app:broker", "--log-level", "WARNING"]  # its defaults

    def worker_env(self) -> dict[str, str]:
        return _peer_env(self.servers)

    def ping(self, timeout_s: float) -> bool:
        from taskiq.exceptions import TaskiqResultTimeoutError

        async def once() -> bool:
            task = await self.module.noop.kiq()
            try:
                await task.wait_result(check_interval=TASKIQ_POLL_S, timeout=timeout_s)
            except TaskiqResultTimeoutError:
                return False
            return True

        return self.loop.run(once())

    async def _batch(self, n: int) -> float:
        noop = self.module.noop
        t0 = time.perf_counter()
        # kiq() awaits the stream's publish ack; gathering them lets the publishes
        # overlap, as Heddle's apply_async from async code does.
        tasks = await asyncio.gather(*(noop.kiq() for _ in range(n)))
        for t in tasks:
            (await t.wait_result(check_interval=TASKIQ_POLL_S, timeout=RESULT_TIMEOUT_S)).raise_for_error()
        return n / (time.perf_counter() - t0)

    def throughput(self, n: int, meter: Meter) -> dict[str, float]:
        self.loop.run(self._batch(WARMUP))
        meter.start()
        rate = self.loop.run(self._batch(n))
        meter.stop()
        return {"taskiq": rate}

    async def _round_trips(self, n: int) -> list[float]:
        noop = self.module.noop
        samples = []
        for i in range(LATENCY_WARMUP + n):
            t0 = time.perf_counter()
            task = await noop.kiq()
            (await task.wait_result(check_interval=TASKIQ_POLL_S, timeout=30)).raise_for_error()
            if i >= LATENCY_WARMUP:
                samples.append(time.perf_counter() - t0)
        return samples

    def round_trips(self, n: int) -> dict[str, list[float]]:
        return {"taskiq": self.loop.run(self._round_trips(n))}

    def fan_out(self, width: int) -> float:
        noop = self.module.noop

        async def once() -> float:
            t0 = time.perf_counter()
            tasks = await asyncio.gather(*(noop.kiq() for _ in range(width)))
            for t in tasks:
                (await t.wait_result(check_interval=TASKIQ_POLL_S, timeout=60)).raise_for_error()
            final = await noop.kiq()
            (await final.wait_result(check_interval=TASKIQ_POLL_S, timeout=60)).raise_for_error()
            return time.perf_counter() - t0

        return self.loop.run(once())

    def close(self) -> None:
        self.loop.run(self.module.broker.shutdown())
        self.loop.close()


# -- Dramatiq -------------------------------------------------------------------------


class DramatiqDriver(_BlockingDriver):
    name = "dramatiq"
    package = "dramatiq"
    broker = "Redis broker on valkey; Results middleware, Redis result backend"
    concurrency = "defaults: one process per CPU, 8 threads each"
    fan_in = (
        "`group(noop.message() x 100)` with `add_completion_callback(noop.message())` "
        "(GroupCallbacks middleware, a Redis barrier in the worker); the callback's result awaited"
    )
    caller = "sync"
    variants = ("dramatiq",)

    def __init__(self, servers: EmbeddedServers) -> None:
        self.servers = servers
        self.module = _import_app("peers.dramatiq_app", servers)

    def worker_command(self) -> list[str]:
        return [script("dramatiq"), "peers.dramatiq_app"]  # its defaults

    def worker_env(self) -> dict[str, str]:
        return _peer_env(self.servers)

    def ping(self, timeout_s: float) -> bool:
        from dramatiq.results import ResultTimeout

        try:
            # The Redis result backend blocks in whole seconds.
            self.module.noop.send().get_result(block=True, timeout=max(1000, int(timeout_s * 1000)))
        except ResultTimeout:
            return False
        return True

    def _send(self) -> Any:
        return self.module.noop.send()

    def _wait(self, handle: Any, timeout_s: float) -> None:
        handle.get_result(block=True, timeout=int(timeout_s * 1000))

    def fan_out(self, width: int) -> float:
        from dramatiq import group

        noop = self.module.noop
        t0 = time.perf_counter()
        g = group(noop.message() for _ in range(width))
        callback = noop.message()
        g.add_completion_callback(callback)
        g.run()
        callback.get_result(block=True, timeout=60_000)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.module.broker.close()
