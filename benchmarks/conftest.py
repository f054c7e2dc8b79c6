"""Benchmark fixtures: real servers, a real worker process, figures as tables and JSON.

Benchmarks are not tests. They report throughput, latency and memory figures
and assert only that every task came back with its result, never anything
about wall-clock time. Run them with::

    .venv/bin/pytest benchmarks/ -s

(``pyproject.toml`` sets ``testpaths = ["tests"]``, so a plain ``pytest`` never
runs them.) Sizes come from the environment:

=========================  =======  ================================================
variable                   default  meaning
=========================  =======  ================================================
HEDDLE_BENCH_N             20000    tasks (and baseline messages) per throughput round
HEDDLE_BENCH_LATENCY_N     500      sequential round trips per latency round
HEDDLE_BENCH_MEMORY_N      100000   tasks run through the worker in the memory benchmark
HEDDLE_BENCH_ROUNDS        3        rounds per benchmark; the tables show medians
HEDDLE_BENCH_TUNED_CONCURRENCY 256  ``--concurrency`` of the tuned worker beside the default one
=========================  =======  ================================================

The headline figures come from a worker started as a user starts it (``heddle
worker -A bench_app``, no flags) and a client on plain ``asyncio``; the tuned
configuration (``--concurrency``, a uvloop client) is shown beside them.

Every table is printed as soon as its benchmark ends (visible with ``-s``;
without it they are repeated in the terminal summary), and all figures are
written to ``benchmarks/results/latest.json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import (
    RESULTS_PATH,
    ROOT,
    BenchConfig,
    Report,
    WorkerProcess,
    machine_info,
)

from heddle.testing import EmbeddedServers

_REPORT_KEY = pytest.StashKey[Report]()
# Whole benchmarks run longer than the project's per-test timeout (120 s).
_BENCH_TIMEOUT_S = 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.timeout(_BENCH_TIMEOUT_S))


_MACHINE_KEY = pytest.StashKey[dict[str, Any]]()


@pytest.fixture(scope="session")
def bench_config() -> BenchConfig:
    """Sizes of this run (from ``HEDDLE_BENCH_*``)."""
    return BenchConfig.from_env()


@pytest.fixture(scope="session")
def report(request: pytest.FixtureRequest, bench_config: BenchConfig) -> Report:
    """Where benchmarks put their tables and figures."""
    config = request.config
    rep = Report(bench_config, capture_on=config.getoption("capture") != "no")
    config.stash[_REPORT_KEY] = rep
    config.stash[_MACHINE_KEY] = machine_info()
    return rep


def pytest_sessionfinish(session: pytest.Session) -> None:
    rep = session.config.stash.get(_REPORT_KEY, None)
    if rep is not None and rep.figures:
        rep.write_json(session.config.stash[_MACHINE_KEY])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rep = config.stash.get(_REPORT_KEY, None)
    if rep is None or not rep.figures:
        return
    terminalreporter.section("heddle benchmarks")
    if rep.capture_on:
        for text in rep.rendered:
            terminalreporter.write(text + "\n")
    machine = config.stash[_MACHINE_KEY]
    terminalreporter.write_line(
        f"{machine['nproc']} x {machine['cpu_model']}, Python {machine['python']}, "
        f"{machine['nats_server']}, valkey {machine['valkey_server']}"
    )
    terminalreporter.write_line(f"figures written to {RESULTS_PATH.relative_to(ROOT)}")


# -- servers and the worker process -------------------------------------------------


@pytest.fixture(scope="session")
def servers() -> Iterator[EmbeddedServers]:
    """A real nats-server (JetStream, file storage) and valkey-server for the session."""
    with EmbeddedServers() as s:
        yield s


@pytest.fixture(scope="session")
def spawn_worker(
    servers: EmbeddedServers, bench_config: BenchConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start benchmark worker processes (default flags, or ``concurrency=``); all are stopped at the end."""
    started: list[WorkerProcess] = []
    log_dir = tmp_path_factory.mktemp("bench-workers")

    def spawn(concurrency: int | None = None) -> WorkerProcess:
        w = WorkerProcess(servers, bench_config, log_dir, concurrency)
        started.append(w)
        return w

    yield spawn
    for w in started:
        w.stop()


@pytest.fixture
def worker(spawn_worker: Callable[..., WorkerProcess]) -> Iterator[WorkerProcess]:
    """A worker process with default flags for one benchmark (stopped after it, so none shares the work)."""
    w = spawn_worker()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def bench_app(servers: EmbeddedServers, bench_config: BenchConfig) -> Iterator[Any]:
    """The benchmark app (``bench_app``) in this process, pointed at the servers."""
    os.environ["HEDDLE_BENCH_APP"] = bench_config.app_name
    import bench_app as module

    module.app.configure(nats_url=servers.nats_url, valkey_url=servers.valkey_url)
    yield module
    module.app.close()
