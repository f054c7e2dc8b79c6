"""A real nats-server JetStream cluster on loopback: three (or more) nodes with routes between them.

Each node is an :class:`~heddle.testing.servers.EmbeddedNats` with its own store
directory, client port and cluster port, named ``heddle-{client port}`` (the name
JetStream reports as a stream's leader). :meth:`EmbeddedNatsCluster.start`
returns once JetStream answers through the cluster, so a test can create R3
streams at once. Nodes can be killed and restarted by name, by PID.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from heddle.errors import ServerStartError
from heddle.testing.servers import EmbeddedNats, free_port

__all__ = ["EmbeddedNatsCluster"]

_READY_TIMEOUT_S = 30.0


class EmbeddedNatsCluster:
    """``size`` nats-servers clustered with JetStream, on free loopback ports.

    Args:
        size: Number of nodes (3 makes R3 streams possible).
        host: Address every node listens on.
        name: The cluster's name.
    """

    def __init__(self, size: int = 3, host: str = "127.0.0.1", name: str = "heddle") -> None:
        cluster_ports = [free_port(host) for _ in range(size)]
        routes = ",".join(f"nats-route://{host}:{p}" for p in cluster_ports)
        self.nodes: list[EmbeddedNats] = [
            EmbeddedNats(host, None, None, args=[
                "--cluster_name", name,
                "--cluster", f"nats://{host}:{port}",
                "--routes", routes,
            ])
            for port in cluster_ports
        ]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, as ``NATS_URL`` takes a server list."""
        return ",".join(n.url for n in self.nodes)

    def node(self, server_name: str) -> EmbeddedNats:
        """The node JetStream calls ``server_name`` (``heddle-{port}``)."""
        for n in self.nodes:
            if f"heddle-{n.port}" == server_name:
                return n
        raise KeyError(f"no node named {server_name!r} in {[f'heddle-{n.port}' for n in self.nodes]}")

    def start(self) -> EmbeddedNatsCluster:
        """Start every node, then wait until JetStream answers through the cluster (a meta leader)."""
        # JetStream waits for its peers: start them all before waiting on any.
        for n in self.nodes:
            n.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Wait until every running node's JetStream answers (the cluster has a meta leader)."""
        from heddle.preflight import run_checks
        from heddle.settings import Settings

        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            settings = Settings(nats_url=",".join(n.url for n in running))
            checks = asyncio.run(run_checks(settings, valkey=False, timeout_s=2.0))
            if all(c.ok for c in checks):
                return
            last = "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.ok)
            time.sleep(0.2)
        raise ServerStartError(f"the nats-server cluster's JetStream did not become ready in {timeout_s:.0f}s: {last}")

    def close(self) -> None:
        """Stop every node and remove its store."""
        for n in self.nodes:
            n.close()

    def __enter__(self) -> EmbeddedNatsCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
