"""pytest plugin: real servers and workers for testing Heddle tasks.

Fixtures:
    heddle_servers: session-wide embedded nats-server + valkey-server.
    heddle_app: the app under test. Override it in your conftest.py to return
        your own app; the default is an empty app with a unique name.
    heddle_worker: a worker running ``heddle_app``'s tasks in a background
        thread, with the app pointed at the embedded servers.
    heddle_orchestrator: an orchestrator in a background thread, so task
        graphs (chain, group, chord, map) and pipelines run.

Example::

    # conftest.py
    import pytest
    from shop.tasks import app

    @pytest.fixture
    def heddle_app():
        return app

    # test_tasks.py
    def test_add(heddle_worker):
        from shop.tasks import add
        assert add.delay(2, 3).get(timeout=10) == 5
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from heddle.testing import EmbeddedServers, running_worker

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.orchestrator import Orchestrator
    from heddle.worker import Worker


@pytest.fixture(scope="session")
def heddle_servers() -> Iterator[EmbeddedServers]:
    """A real nats-server (JetStream) and valkey-server for the whole test session."""
    with EmbeddedServers() as servers:
        yield servers


@pytest.fixture
def heddle_app(heddle_servers: EmbeddedServers) -> Iterator[Heddle]:
    """The app under test; override to return yours. Default: a fresh, uniquely named app."""
    from heddle.app import Heddle

    app = Heddle(
        f"t{uuid.uuid4().hex[:12]}",
        nats_url=heddle_servers.nats_url,
        valkey_url=heddle_servers.valkey_url,
    )
    yield app
    app.close()


@pytest.fixture
def heddle_worker(heddle_app: Heddle, heddle_servers: EmbeddedServers) -> Iterator[Worker]:
    """A worker for ``heddle_app`` against the embedded servers, stopped after the test."""
    heddle_app.configure(nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url)
    with running_worker(heddle_app) as worker:
        yield worker
    heddle_app.close()


@pytest.fixture
def heddle_orchestrator(heddle_app: Heddle, heddle_servers: EmbeddedServers) -> Iterator[Orchestrator]:
    """An orchestrator against the embedded servers (use with ``heddle_worker`` to run graphs)."""
    from heddle.testing.orchestrators import running_orchestrator

    heddle_app.configure(nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url)
    with running_orchestrator(heddle_app) as orch:
        yield orch
