"""Fixtures of the peers benchmark: its own servers, the peers' worker processes, its own JSON.

Run it with::

    .venv/bin/pip install -e '.[dev,peers]'
    .venv/bin/pytest benchmarks/peers -s

Sizes come from the same ``HEDDLE_BENCH_*`` variables as the other benchmarks
(``N``, ``LATENCY_N``, ``ROUNDS``, ``CONCURRENCY``; see ``benchmarks/conftest.py``),
plus ``HEDDLE_PEERS_FANOUT_REPEATS`` (fan-outs per round, default 5),
``HEDDLE_PEERS_CELERY_POOL`` (default ``solo``) and
``HEDDLE_PEERS_CELERY_CONCURRENCY`` (for the other pools, default 8). The
figures are written to ``benchmarks/results/peers.json``, so a peers run never
replaces the ``latest.json`` of the other benchmarks.

The run has a nats-server and a valkey-server of its own, not the session's
``servers``: a full ``pytest benchmarks/`` run keeps its benchmark worker
process alive until the end, and that process would otherwise share the
servers (and, for Heddle, the router's consumer) with the peers' workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
from harness import BENCH_DIR, ROOT, BenchConfig, Report, machine_info

import heddle
from heddle.testing import EmbeddedServers

from .workers import PeerWorker

PEERS_RESULTS_PATH = BENCH_DIR / "results" / "peers.json"
PEER_PACKAGES = ("celery", "kombu", "redis", "taskiq", "taskiq-nats", "taskiq-redis", "dramatiq")

_REPORT_KEY = pytest.StashKey["PeersReport"]()


class PeersReport(Report):
    """The tables of the peers run, and its own JSON file."""

    def __init__(self, config: BenchConfig, capture_on: bool) -> None:
        super().__init__(config, capture_on)
        self.machine = machine_info()
        self.extra_config: dict[str, Any] = {}

    def write_json(self, machine: dict[str, Any] | None = None) -> Path:
        PEERS_RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        versions = {}
        for name in PEER_PACKAGES:
            try:
                versions[name] = version(name)
            except PackageNotFoundError:
                versions[name] = None
        doc = {
            "started": self.started,
            "command": ".venv/bin/pytest benchmarks/peers -s",
            "machine": {
                **(machine or self.machine),
                # heddle_commit describes the checkout; this says which heddle was imported
                # (another tree when PYTHONPATH points elsewhere).
                "heddle_imported_from": str(Path(heddle.__file__).parent),
                "peer_packages": versions,
            },
            "config": {**asdict(self.config), **self.extra_config},
            **self.figures,
        }
        PEERS_RESULTS_PATH.write_text(json.dumps(doc, indent=2) + "\n")
        return PEERS_RESULTS_PATH


@pytest.fixture(scope="session")
def peers_report(request: pytest.FixtureRequest, bench_config: BenchConfig) -> PeersReport:
    """Where the peers benchmark puts its tables and figures."""
    rep = PeersReport(bench_config, capture_on=request.config.getoption("capture") != "no")
    request.config.stash[_REPORT_KEY] = rep
    return rep


def pytest_sessionfinish(session: pytest.Session) -> None:
    rep = session.config.stash.get(_REPORT_KEY, None)
    if rep is not None and rep.figures:
        rep.write_json()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rep = config.stash.get(_REPORT_KEY, None)
    if rep is None or not rep.figures:
        return
    terminalreporter.section("heddle against its peers")
    if rep.capture_on:
        for text in rep.rendered:
            terminalreporter.write(text + "\n")
    m = rep.machine
    terminalreporter.write_line(
        f"{m['nproc']} x {m['cpu_model']}, Python {m['python']}, load average at start {m['load_avg_at_start']}"
    )
    terminalreporter.write_line(f"figures written to {PEERS_RESULTS_PATH.relative_to(ROOT)}")


@pytest.fixture(scope="session")
def peer_servers() -> Iterator[EmbeddedServers]:
    """A nats-server and a valkey-server for the peers run only."""
    with EmbeddedServers() as s:
        yield s


@pytest.fixture(scope="session")
def fanout_repeats() -> int:
    raw = os.environ.get("HEDDLE_PEERS_FANOUT_REPEATS", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"HEDDLE_PEERS_FANOUT_REPEATS must be an integer >= 1, got {raw!r}")
    return int(raw)


@pytest.fixture(scope="session")
def celery_pool() -> tuple[str, int]:
    """Celery's ``--pool`` and, for the pools that have one, ``--concurrency`` (its defaults: prefork, one per CPU)."""
    raw = os.environ.get("HEDDLE_PEERS_CELERY_CONCURRENCY", str(os.cpu_count() or 1))
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"HEDDLE_PEERS_CELERY_CONCURRENCY must be an integer >= 1, got {raw!r}")
    return os.environ.get("HEDDLE_PEERS_CELERY_POOL", "prefork"), int(raw)


@pytest.fixture(scope="session")
def start_peer_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Any], PeerWorker]]:
    """Start a driver's worker process and wait until it answers; all are stopped at the end."""
    started: list[PeerWorker] = []
    log_dir = tmp_path_factory.mktemp("peer-workers")

    def start(driver: Any) -> PeerWorker:
        w = PeerWorker(driver.name.replace(" ", "_"), driver.worker_command(), driver.worker_env(), log_dir)
        started.append(w)
        w.wait_ready(driver.ping)
        return w

    yield start
    for w in started:
        w.stop()
