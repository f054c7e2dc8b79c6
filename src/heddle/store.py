"""Results in Valkey: the one seam around the valkey client (only this module imports it).

Each task has one hash, ``heddle:result:{id}``, with fields ``state``,
``record`` (a msgpack :class:`~heddle.messages.ResultRecord`, for final and
RETRY states), ``retries`` (retries already scheduled), ``started_at``,
``worker``, ``fence`` (the token of the latest claim) and ``wfence`` (the token
of the claim whose state and record are stored). Two Lua scripts keep the state
machine atomic:

* ``claim``: a worker about to run a task marks it STARTED and gets a *fencing
  token*, unless a final state is stored, in which case it gets that state back
  and acks without running the task again.
* ``store``: write a state and record unless a final one is already there, so a
  late finisher (a worker that was frozen past AckWait) never overwrites the
  result of the worker that finished first, and a revoked task stays revoked;
  and unless a newer claim's state is stored (``wfence`` above the writer's
  token), so a stale attempt cannot roll back a newer one's RETRY.

Fencing tokens are the primary's clock in microseconds, forced above the task's
last token: after a Sentinel or Cluster failover the new primary keeps issuing
larger tokens, even when the old primary's last claims were lost with it (as
long as the two clocks differ by less than the failover took). A token also
tells a writer's own earlier write from another's: a store retried after its
``WAIT`` fell short counts as written.

Valkey can be one server, a Sentinel-monitored primary (``VALKEY_SENTINELS``)
or a Cluster (``VALKEY_CLUSTER``). Scripts that take many result keys are split
by hash slot in a Cluster; scripts of other modules keep the keys of one call in
one slot with a hash tag. After a failover an operation that failed on a
connection or READONLY error is retried against the rediscovered primary for
up to :data:`FAILOVER_WAIT_S`. A final result is acknowledged only once
``valkey_replicas_to_wait`` replicas hold it (``WAIT``; docs/scaling.md).

valkey exceptions are translated to :mod:`heddle.errors` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import msgspec
import valkey.asyncio as valkey_async
import valkey.exceptions as vexc
from valkey._parsers.base import BaseParser  # valkey-py's own error-reply mapping, for the lane's replies
from valkey.asyncio.cluster import ValkeyCluster
from valkey.asyncio.connection import parse_url
from valkey.asyncio.sentinel import MasterNotFoundError, Sentinel
from valkey.crc import key_slot

from heddle import names
from heddle.errors import BackendError, BackendUnavailable, DecodeError, HeddleError
from heddle.messages import PENDING, READY_STATES, ResultRecord, encoder, record_decoder
from heddle.redact import redact
from heddle.settings import (
    Settings,
    dev_session_note,
    readable_file,
    sentinel_address,
    server_endpoint,
    tls_failure,
)
from heddle.storescripts import CLAIM_LUA, FINAL_RECORDS_LUA, NOTICE_MAX_BYTES, STORE_LUA
from heddle.valkeylane import ChannelFeed, CommandList, Lane, LaneDown, LaneKeeper, ReplyError

log = logging.getLogger("heddle.store")
T = TypeVar("T")

_MAX_CONNECTIONS = 64  # per process and event loop; Valkey allows 10,000 clients by default
# Under Sentinel or Cluster, how long an operation that lost its primary keeps being
# retried (against the one rediscovered) before its error is raised: a failover takes
# the sentinels' down-after-milliseconds plus an election, a few seconds in practice.
FAILOVER_WAIT_S: Final = 30.0
# Tokens this process's claims got, by task id, until their state is stored (bounded:
# a claim whose outcome is never stored, a shutdown's nak say, is forgotten eventually).
_MAX_REMEMBERED_TOKENS: Final = 100_000
# Errors after which a Sentinel or Cluster client asks again who the primary is.
_FAILOVER_ERRORS = (vexc.ConnectionError, vexc.TimeoutError, vexc.ReadOnlyError, vexc.ClusterDownError,
                    vexc.TryAgainError, OSError)
# After the lane (heddle.valkeylane) is lost, scripts go through the pool this long at least.
LANE_RETRY_S: Final = 1.0

class Claim(msgspec.Struct, frozen=True):
    """What ``claim`` found: the previous state, a final record if any, retries so far, the fencing token."""

    previous_state: str
    final_record: bytes
    retries: int
    token: int = 0  # 0 when a final state was found (nothing to fence)


class StoreRequest(msgspec.Struct, frozen=True):
    """One state write for :meth:`ResultBackend.store_many`.

    ``token`` is the fencing token of the claim the state comes from; 0 takes the
    token of this process's latest claim of the task, if any (else the write is
    not fenced: a revoke, a dead letter).
    """

    task_id: str
    state: str
    record: bytes
    retries: int | None = None
    token: int = 0
    channel: str = ""  # a final state written is announced there (:attr:`ResultBackend.announces`)


class NotReplicated(BackendError):
    """Raised when a stored result did not reach the replicas it must before its task is acked."""


def _translate(exc: BaseException, url: str, doing: str, where: str = "") -> BackendError:
    """Map a valkey exception to a Heddle error that names the server and the fix, and no secret."""
    shown = where or redact(url)
    if isinstance(exc, vexc.AuthenticationError | vexc.AuthorizationError | vexc.AuthenticationWrongNumberOfArgsError):
        said = redact(str(exc), url).rstrip(".")
        return BackendError(
            f"authentication failed at valkey-server {shown} while {doing}: {said}. Fix the user and "
            f"password (user:password@host, or :password@host for requirepass) in VALKEY_URL, or the "
            f"server's requirepass or ACL users."
        )
    if isinstance(exc, vexc.ConnectionError | vexc.TimeoutError | OSError):
        fix = ("Start it (`heddle dev` runs an embedded one) or set VALKEY_URL. "
               f"{dev_session_note(url, 'VALKEY_URL')}".rstrip()) if not where else (
               "Check that the servers are up and that the names match the deployment.")
        return BackendUnavailable(redact(f"cannot reach valkey-server at {shown} while {doing}: {exc}. {fix}", url))
    return BackendError(redact(f"valkey-server at {shown} failed while {doing}: {exc!r}", url))


def _raising_first_error(replies: Sequence[Any]) -> list[Any]:
    """A pipeline's replies; the first error among them raised as the server's own error.

    Not the pipeline's own error, which quotes every argument of the command.
    """
    for r in replies:
        if isinstance(r, Exception):
            raise r
    return list(replies)


class ResultBackend:
    """Async Valkey access for task states and results.

    Args:
        settings: Provides ``valkey_url``, ``result_ttl_s`` and the Sentinel, Cluster
            and ``WAIT`` settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: Any = None  # valkey.asyncio.Valkey, or ValkeyCluster with VALKEY_CLUSTER
        self._ttl = str(int(settings.result_ttl_s))
        self.mode = settings.valkey_mode
        self.replicas_to_wait = settings.valkey_replicas_to_wait
        self._wait_ms = max(1, int(settings.valkey_wait_timeout_s * 1000))
        self._tokens: dict[str, int] = {}
        # Lua scripts by name: source and SHA once loaded. Other modules add
        # theirs (rate limits) through register_script, so Valkey stays behind this seam.
        self._scripts: dict[str, tuple[str, str]] = {
            "claim": (CLAIM_LUA, ""),
            "store": (STORE_LUA, ""),
            "final_records": (FINAL_RECORDS_LUA, ""),
        }
        # Scripts go through the lane (heddle.valkeylane) when there is one: not in a
        # Cluster (keys route by slot), nor when stores are followed by WAIT (it would
        # hold every request queued behind it on the one connection).
        self._lanes: LaneKeeper | None = None

    @property
    def url(self) -> str:
        return self.settings.valkey_url

    @property
    def where(self) -> str:
        """The server (or sentinels, or cluster) as error messages name it, without credentials."""
        s = self.settings
        if self.mode == "sentinel":
            return (f"the primary {s.valkey_sentinel_master!r} of sentinels {','.join(s.valkey_sentinels)} "
                    f"(VALKEY_SENTINELS)")
        if self.mode == "cluster":
            return f"the Valkey Cluster of {server_endpoint(self.url)} (VALKEY_CLUSTER)"
        return redact(self.url)

    async def connect(self) -> None:
        """Connect and load the Lua scripts; raise BackendUnavailable if unreachable.

        Credentials come from ``VALKEY_URL`` or ``VALKEY_USERNAME``/``VALKEY_PASSWORD``;
        TLS from a ``valkeys://`` (``rediss://``) URL, with ``VALKEY_TLS_CA`` and, for
        mutual TLS, ``VALKEY_TLS_CERT``/``VALKEY_TLS_KEY``. A refused login or a failed
        TLS handshake says which of them to fix, and never what they hold. Under
        Sentinel the primary is the one the sentinels name (``VALKEY_URL`` gives the
        scheme, credentials and database); under Cluster ``VALKEY_URL`` is any node.

        Raises:
            ConfigError: A ``VALKEY_TLS_*`` file cannot be read.
            BackendError: The server refused the login or the TLS handshake.
            BackendUnavailable: The server cannot be reached.
        """
        a = self.settings.valkey_auth
        options: dict[str, Any] = {}
        if a.username:
            options["username"] = a.username
        if a.password:
            options["password"] = a.password
        tls = self.url.partition("://")[0].lower() in ("valkeys", "rediss")
        if tls:
            # valkey-py checks the chain but not the host name unless told; a URL's
            # ?ssl_check_hostname=false still wins (query options override these).
            options["ssl_check_hostname"] = True
        for key, var, path in (("ssl_ca_certs", "VALKEY_TLS_CA", a.tls_ca),
                               ("ssl_certfile", "VALKEY_TLS_CERT", a.tls_cert),
                               ("ssl_keyfile", "VALKEY_TLS_KEY", a.tls_key)):
            if path:
                options[key] = readable_file(var, path)
        timeouts: dict[str, Any] = {
            "socket_connect_timeout": self.settings.connect_timeout_s,
            "socket_timeout": max(10.0, self.settings.connect_timeout_s),
        }
        if self.mode == "sentinel":
            # The sentinels are asked for the primary at every new connection, so after a
            # failover fresh connections go to the promoted replica; old ones fail (or get
            # READONLY, which valkey-py turns into a connection error) and are retried (_call).
            kwargs = {**timeouts, "health_check_interval": 10, **options}
            from_url = parse_url(self.url)
            for gone in ("host", "port"):
                from_url.pop(gone, None)
            if from_url.pop("connection_class", None) is not None:
                kwargs["ssl"] = True
            kwargs.update(from_url)
            sentinels = Sentinel(  # type: ignore[no-untyped-call]
                [sentinel_address(e) for e in self.settings.valkey_sentinels],
                sentinel_kwargs=dict(timeouts), **kwargs)
            self.client = sentinels.master_for(self.settings.valkey_sentinel_master)
        elif self.mode == "cluster":
            self.client = ValkeyCluster.from_url(self.url, health_check_interval=10, **timeouts, **options)
        else:
            # A bounded pool: a burst of concurrent result reads waits for a free connection
            # (up to the socket timeout) instead of opening one connection per waiter.
            pool = valkey_async.BlockingConnectionPool.from_url(
                self.url,
                max_connections=_MAX_CONNECTIONS,
                timeout=max(10.0, self.settings.connect_timeout_s),
                health_check_interval=10,
                **timeouts,
                **options,
            )
            self.client = valkey_async.Valkey.from_pool(pool)
        try:
            if self.mode == "cluster":
                await self.client.initialize()
            await self.client.ping()
            await self._load_scripts()
            if self.mode != "cluster" and not self.replicas_to_wait:
                self._lanes = LaneKeeper(self.client.connection_pool.make_connection,
                                         max(10.0, self.settings.connect_timeout_s), LANE_RETRY_S, self._lane_lost)
                await self._lanes.open()
        except Exception as exc:
            where = server_endpoint(self.url) if self.mode == "single" else self.where
            told = redact(str(exc), *self.settings.secrets()).rstrip(".")
            if isinstance(exc, vexc.AuthenticationError | vexc.AuthorizationError
                          | vexc.AuthenticationWrongNumberOfArgsError):
                shown = redact(self.url)
                at = f" at valkey-server {shown}" if "@" in shown else ""  # which URL's user:*** was refused
                raise BackendError(
                    f"authentication failed{at}: authorization failed for {where} while connecting ({told}). "
                    f"{self.settings.login_fix('valkey')}."
                ) from exc
            low = told.lower()
            if tls and tls_failure(told):
                raise BackendError(
                    f"TLS failed for {where} while connecting ({told}). Fix: {self.settings.tls_fix('valkey', told)}."
                ) from exc
            if tls and "timeout" in low:
                raise BackendUnavailable(
                    f"cannot reach valkey-server at {redact(self.url)} over TLS while connecting ({told}): is it "
                    f"reachable, and does it speak TLS on this port (its tls-port)? For plain text use valkey://."
                ) from exc
            if isinstance(exc, MasterNotFoundError):
                raise BackendUnavailable(
                    f"no sentinel of VALKEY_SENTINELS={','.join(self.settings.valkey_sentinels)} names a primary "
                    f"{self.settings.valkey_sentinel_master!r} that is up ({told}): check VALKEY_SENTINEL_MASTER "
                    f"against `sentinel monitor` in the sentinels' config, and that the primary runs"
                ) from exc
            if self.mode == "cluster" and ("cluster mode is not enabled" in low or "cluster support disabled" in low):
                raise BackendError(
                    f"VALKEY_CLUSTER is set but valkey-server at {redact(self.url)} is not in cluster mode "
                    f"({told}): unset VALKEY_CLUSTER, or point VALKEY_URL at a node of the cluster"
                ) from exc
            raise _translate(exc, self.url, "connecting", "" if self.mode == "single" else self.where) from exc

    def register_script(self, name: str, lua: str) -> None:
        """Make a Lua script callable with :meth:`run_script_many` (loaded lazily)."""
        if name not in self._scripts:
            self._scripts[name] = (lua, "")

    async def _load_scripts(self) -> None:
        assert self.client is not None
        for name, (lua, _) in list(self._scripts.items()):
            # In a Cluster, SCRIPT LOAD goes to every primary.
            self._scripts[name] = (lua, str(_text(await self.client.script_load(lua))))

    @property
    def announces(self) -> bool:
        """Whether stores announce final states on Valkey (``StoreRequest.channel``).

        Not under a Cluster (a channel is not a key of the script's slot), nor when a
        result must reach replicas first: a notice published by the script would come
        before its ``WAIT`` (heddle.notices says what waiters do without it).
        """
        return self.mode != "cluster" and not self.replicas_to_wait

    def follow(self, channel: str, on_message: Callable[[bytes], None], on_ready: Callable[[], None]) -> ChannelFeed:
        """A feed of ``channel``'s messages on a connection of its own (:class:`heddle.valkeylane.ChannelFeed`)."""
        assert self.client is not None and self.mode != "cluster"

        def lost(why: str) -> None:
            log.debug("valkey: notice feed %s lost (%s)", channel, redact(why, *self.settings.secrets()))

        return ChannelFeed(self.client.connection_pool.make_connection, channel, on_message, on_ready, lost,
                           max(10.0, self.settings.connect_timeout_s), LANE_RETRY_S)

    def _lane_lost(self, why: str) -> None:
        log.debug("valkey: no lane (%s); scripts go through the pool", redact(why, *self.settings.secrets()))

    @property
    def lane(self) -> Lane | None:
        """The open lane scripts take, if any (:mod:`heddle.valkeylane`)."""
        return self._lanes.lane if self._lanes is not None else None

    async def close(self) -> None:
        """Close the lane and the connection pool."""
        if self._lanes is not None:
            self._lanes.close()
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    def _c(self) -> Any:
        if self.client is None:
            raise BackendError("result backend is not connected; call connect() first")
        return self.client

    async def _call(self, doing: str, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op(client)``, translating valkey errors; under Sentinel or Cluster, ride out a failover.

        An operation that fails on a connection, timeout or READONLY error (the primary
        died, or was demoted under us) is tried again, with growing pauses, until it
        succeeds or :data:`FAILOVER_WAIT_S` has passed: each new connection asks the
        sentinels (or the cluster's slot map) for the current primary. Every operation
        retried this way is idempotent or harmless twice: scripts that store results are
        fenced by their token (a retry of a write that did happen counts as written).
        """
        deadline = 0.0
        pause = 0.05
        while True:
            client = self._c()
            try:
                return await op(client)
            except HeddleError:
                raise
            except Exception as exc:
                if self.mode != "single" and isinstance(exc, _FAILOVER_ERRORS):
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + FAILOVER_WAIT_S
                        log.warning("valkey: %s failed (%s); waiting for a primary (up to %.0fs)",
                                    doing, redact(str(exc), self.url), FAILOVER_WAIT_S)
                    if now < deadline:
                        await asyncio.sleep(pause)  # backoff between tries, not a wait for a condition
                        pause = min(1.0, pause * 2)
                        continue
                raise _translate(exc, self.url, doing, "" if self.mode == "single" else self.where) from exc

    def _slot_groups(self, keys: Sequence[str]) -> list[list[int]]:
        """Indexes of ``keys`` by hash slot in a Cluster (one script call each); one group elsewhere."""
        if self.mode != "cluster":
            return [list(range(len(keys)))]
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(i)
        return list(groups.values())

    def _queue_waits(self, pipe: Any, keys: Sequence[str]) -> int:
        """Queue ``WAIT`` after the writes to ``keys`` on the same connection(s); how many were queued.

        WAIT counts the replicas that acknowledged this connection's writes, so it must
        follow them in the same pipeline: once per server that holds one of the keys.
        """
        if not self.replicas_to_wait or not keys:
            return 0
        if self.mode != "cluster":
            pipe.execute_command("WAIT", self.replicas_to_wait, self._wait_ms)
            return 1
        nodes = {}
        for key in keys:
            node = self.client.get_node_from_key(key)
            nodes[node.name] = node
        for node in nodes.values():
            pipe.execute_command("WAIT", self.replicas_to_wait, self._wait_ms, target_nodes=node)
        return len(nodes)

    def _check_waits(self, replies: Sequence[Any], what: str) -> None:
        short = [int(r) for r in replies if int(r) < self.replicas_to_wait]
        if short:
            raise NotReplicated(
                f"{what} stored on the primary, but only {min(short)} of {self.replicas_to_wait} replica(s) "
                f"confirmed it within {self._wait_ms / 1000:g}s (WAIT, valkey_wait_replicas); not acknowledged "
                f"yet: the store is retried, and the task acked once a replica holds it"
            )

    def _remember(self, task_id: str, token: int) -> None:
        tokens = self._tokens
        tokens.pop(task_id, None)
        tokens[task_id] = token
        while len(tokens) > _MAX_REMEMBERED_TOKENS:
            del tokens[next(iter(tokens))]

    async def run_script_many(
        self,
        name: str,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
        then: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        """Run one script for many (keys, args) in a single pipelined round trip.

        ``then(pipeline)`` may queue more commands into the same round trip; their
        replies follow the scripts' in the returned list. In a Cluster the keys of one
        call must share a hash slot (a ``{tag}``); calls on different slots are fine.
        """
        lane = self._open_lane()
        if lane is not None:
            try:
                return await self._run_on_lane(lane, name, calls, then)
            except LaneDown as exc:
                # Sent again through the pool: the same as the pool's own retry after a lost
                # connection (a claim gets a newer token; a store by the same token is written once).
                assert self._lanes is not None
                self._lanes.lost(str(exc))
        return await self._call(f"running {name}", lambda client: self._run_scripts(client, name, calls, then))

    def _open_lane(self) -> Lane | None:
        return self._lanes.current() if self._lanes is not None and self.client is not None else None

    async def _run_commands(self, doing: str, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Plain commands in one round trip: on the lane when it is open (packed in C), else through the pool.

        For commands that may run twice (the lane fails over to the pool as scripts do).
        """
        lane = self._open_lane()
        if lane is not None:
            try:
                out = await lane.execute(commands)
                self._raise_reply_errors(out, doing)
                return out
            except LaneDown as exc:
                assert self._lanes is not None
                self._lanes.lost(str(exc))

        async def op(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return _raising_first_error(await pipe.execute(raise_on_error=False))

        return await self._call(doing, op)

    def _raise_reply_errors(self, replies: Sequence[Any], doing: str) -> None:
        """Raise the first error reply of the lane as the pool would; LaneDown for one the pool rides out.

        The pool rides out a server that cannot take writes now (READONLY after a failover, LOADING).
        """
        for r in replies:
            if isinstance(r, ReplyError):
                exc = BaseParser.parse_error(str(r))  # type: ignore[no-untyped-call]
                if isinstance(exc, _FAILOVER_ERRORS):  # READONLY, LOADING (a ConnectionError)...
                    raise LaneDown(f"{type(exc).__name__}: {str(exc)[:200]}")
                raise _translate(exc, self.url, doing, "" if self.mode == "single" else self.where)

    async def _run_on_lane(
        self,
        lane: Lane,
        name: str,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
        then: Callable[[Any], None] | None,
    ) -> list[Any]:
        """:meth:`_run_scripts` on the lane.

        An error reply is raised as the pool would raise it, once (the other calls of the
        pipeline are not run twice); one that says the server cannot take writes now
        (READONLY after a failover, LOADING) raises LaneDown: the pool rides it out.
        """
        for attempt in range(2):
            sha = self._scripts[name][1]
            if not sha:
                await self._call("loading scripts", lambda client: self._load_scripts())
                sha = self._scripts[name][1]
            commands: list[Sequence[Any]] = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
            if then is not None:
                then(CommandList(commands))
            out = await lane.execute(commands)
            if attempt == 0 and any(isinstance(r, ReplyError) and str(r).startswith("NOSCRIPT") for r in out):
                self._scripts = {n: (lua, "") for n, (lua, _) in self._scripts.items()}
                continue
            self._raise_reply_errors(out, f"running {name}")
            return out
        raise LaneDown("the scripts are not loaded")

    async def _run_scripts(
        self,
        client: Any,
        name: str,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
        then: Callable[[Any], None] | None,
    ) -> list[Any]:
        for attempt in range(2):
            sha = self._scripts[name][1]
            if not sha:
                await self._load_scripts()
                sha = self._scripts[name][1]
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                # execute_command: a Cluster pipeline blocks .evalsha() but routes EVALSHA by its keys.
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            if then is not None:
                then(pipe)
            out = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, vexc.NoScriptError) for r in out):
                # A restarted valkey-server (or a promoted replica, or a new cluster node) lacks our scripts.
                self._scripts = {n: (lua, "") for n, (lua, _) in self._scripts.items()}
                continue
            return _raising_first_error(out)
        raise BackendError("unreachable")  # pragma: no cover

    async def claim_many(self, task_ids: Sequence[str], worker: str) -> list[Claim]:
        """Mark tasks STARTED unless final; one round trip for the batch.

        Each claim gets a fencing token, remembered until the task's state is stored
        (:meth:`store_many`). A final state found stored is made sure of first: when
        results must reach replicas before a task is acked, they are waited for here too
        (the worker that stored it may have died before its own ``WAIT`` returned).
        """
        now = f"{time.time():.6f}"
        keys = [names.result_key(t) for t in task_ids]
        groups = self._slot_groups(keys)
        outs = await self.run_script_many("claim", [([keys[i] for i in g], (now, worker, self._ttl)) for g in groups])
        claims: list[Claim] = [Claim("", b"", 0)] * len(keys)
        for group, out in zip(groups, outs, strict=True):
            for i, r in zip(group, out, strict=True):
                claims[i] = Claim(r[0].decode() if r[0] else "", bytes(r[1]), int(r[2]), int(r[3]))
        for tid, c in zip(task_ids, claims, strict=True):
            if c.token:
                self._remember(tid, c.token)
        final = [k for k, c in zip(keys, claims, strict=True) if c.final_record]
        if final and self.replicas_to_wait:
            await self._call("waiting for replicas", lambda client: self._touch_and_wait(client, final))
        return claims

    async def _touch_and_wait(self, client: Any, keys: Sequence[str]) -> None:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.expire(key, int(self._ttl))  # a write on this connection, for WAIT to count
        n = self._queue_waits(pipe, keys)
        out = await pipe.execute()
        self._check_waits(out[len(out) - n:], f"the final result of {len(keys)} task(s) is")

    async def store_many(self, requests: Sequence[StoreRequest]) -> list[bool]:
        """Write states unless a final one is stored; True where the write happened.

        A write is refused (False) when a final state is stored by another claim, or a
        RETRY comes from a claim older than the one whose state is stored (its fencing
        token is lower). A write this claim's token already made counts as written, so a
        store retried after a lost reply or a ``WAIT`` shortfall is not told it lost.
        Returns only once every final state written or found is on the replicas
        ``valkey_replicas_to_wait`` asks for; else raises :class:`NotReplicated`.
        """
        keys = [names.result_key(r.task_id) for r in requests]
        tokens = [r.token or self._tokens.get(r.task_id, 0) for r in requests]
        # A final state takes the task out of the audit (heddle.audit), in the same round trip.
        done = [r.task_id for r in requests if r.state in READY_STATES]
        groups = self._slot_groups(keys)
        announces = self.announces
        calls = []
        for group in groups:
            args: list[Any] = [self._ttl]
            for i in group:
                r = requests[i]
                args += (r.state, r.record, "" if r.retries is None else str(r.retries),
                         str(tokens[i]) if tokens[i] else "", r.channel if announces else "")
            calls.append(([keys[i] for i in group], args))
        waits = 0
        must_wait = [keys[i] for i, r in enumerate(requests) if r.state in READY_STATES]

        def unaudit_and_wait(pipe: Any) -> None:
            nonlocal waits
            if done:
                pipe.zrem(names.SUBMITTED_KEY, *done)
            waits = self._queue_waits(pipe, must_wait)

        out = await self.run_script_many("store", calls, unaudit_and_wait)
        if waits:
            self._check_waits(out[len(out) - waits:], f"the final result of {len(must_wait)} task(s) is")
        written = [False] * len(requests)
        for group, replies in zip(groups, out, strict=False):
            for i, x in zip(group, replies, strict=True):
                written[i] = int(x) == 1
        for r in requests:
            self._tokens.pop(r.task_id, None)
        return written

    async def record_submitted(self, task_ids: Sequence[str], sent_at: float) -> None:
        """Add task ids sent at ``sent_at`` (epoch seconds) to the audit; an id already there keeps its time."""
        if not task_ids:
            return
        score = repr(sent_at)  # formatted once: a float per member costs more than the rest of the command
        scored = [x for tid in task_ids for x in (score, tid)]
        await self._run_commands("recording sent tasks", [("ZADD", names.SUBMITTED_KEY, "NX", *scored)])

    async def forget_submitted(self, task_ids: Sequence[str]) -> None:
        """Take tasks out of the audit."""
        await self._call("updating the audit", lambda c: c.zrem(names.SUBMITTED_KEY, *task_ids))

    async def drop_submitted_before(self, before: float) -> None:
        """Forget audit entries sent before ``before`` (epoch seconds)."""
        await self._call("trimming the audit",
                         lambda c: c.zremrangebyscore(names.SUBMITTED_KEY, "-inf", f"({before}"))

    async def submitted_before(self, before: float, limit: int) -> tuple[int, list[tuple[str, float]]]:
        """How many audit entries were sent before ``before``, and the oldest ``limit`` of them."""
        def op(client: Any) -> Awaitable[list[Any]]:
            pipe = client.pipeline(transaction=False)
            pipe.zcount(names.SUBMITTED_KEY, "-inf", f"({before}")
            pipe.zrangebyscore(names.SUBMITTED_KEY, "-inf", f"({before}", start=0, num=limit, withscores=True)
            return pipe.execute()  # type: ignore[no-any-return]

        total, rows = await self._call("reading the audit", op)
        return int(total), [(tid.decode(), float(at)) for tid, at in rows]

    async def progress_many(self, task_ids: Sequence[str]) -> list[tuple[str, str, float]]:
        """``(state, worker, started_at)`` of each task; PENDING when nothing is stored."""
        if not task_ids:
            return []

        def op(client: Any) -> Awaitable[list[Any]]:
            pipe = client.pipeline(transaction=False)
            for tid in task_ids:
                pipe.hmget(names.result_key(tid), ["state", "worker", "started_at"])
            return pipe.execute()  # type: ignore[no-any-return]

        rows = await self._call("reading task states", op)
        return [
            (st.decode() if st else PENDING, w.decode() if w else "", float(at) if at else 0.0)
            for st, w, at in rows
        ]

    async def announce(self, channel: str, task_id: str, record: bytes) -> None:
        """Publish a stored final record on ``channel`` and the task's channel, as the store script does.

        A record too large to announce is announced by its key.
        """
        payload = record if len(record) <= NOTICE_MAX_BYTES else names.result_key(task_id).encode()

        async def publish(c: Any) -> Any:
            pipe = c.pipeline(transaction=False)
            pipe.publish(channel, payload)
            pipe.publish(names.task_notice_channel(task_id), payload)
            return await pipe.execute()

        await self._call(f"announcing the result of {task_id}", publish)

    async def final_records(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored records of the tasks among ``task_ids`` that reached a final state."""
        if not task_ids:
            return {}
        keys = [names.result_key(t) for t in task_ids]
        groups = self._slot_groups(keys)
        outs = await self.run_script_many("final_records", [([keys[i] for i in g], ()) for g in groups])
        found: dict[str, bytes] = {}
        for group, out in zip(groups, outs, strict=True):
            for j in range(0, len(out), 2):
                found[task_ids[group[int(out[j]) - 1]]] = bytes(out[j + 1])
        return found

    async def store(self, request: StoreRequest) -> bool:
        """Write one state unless a final one is stored."""
        return (await self.store_many([request]))[0]

    async def fencing_tokens(self, task_id: str) -> tuple[int, int]:
        """``(latest claim's token, token of the claim whose state is stored)``; 0 where none."""
        fence, wfence = await self._call(
            f"reading the tokens of {task_id}", lambda c: c.hmget(names.result_key(task_id), ["fence", "wfence"]))
        return int(fence or 0), int(wfence or 0)

    async def read(self, task_id: str) -> tuple[str, ResultRecord | None]:
        """Return ``(state, record)``; state PENDING and no record when nothing is stored."""
        state, record = await self._call(
            f"reading result {task_id}", lambda c: c.hmget(names.result_key(task_id), ["state", "record"]))
        if state is None:
            return PENDING, None
        rec = decode_record(record) if record else None
        return state.decode(), rec

    async def forget(self, task_id: str) -> None:
        """Delete a task's stored state (before a dead letter is replayed)."""
        await self._call(f"deleting result {task_id}", lambda c: c.delete(names.result_key(task_id)))

    async def set_once(self, key: str, value: str, ttl_s: float) -> bool:
        """SET NX with a TTL: True if this call set it."""
        return bool(await self._call(f"setting {key}", lambda c: c.set(key, value, nx=True, ex=max(1, int(ttl_s)))))

    async def set_fields(self, key: str, fields: dict[str, str]) -> None:
        """HSET several fields of a hash (a schedule's last run, say)."""
        await self._call(f"writing {key}", lambda c: c.hset(key, mapping=fields))

    async def get_fields_many(self, keys: Sequence[str]) -> list[dict[str, str]]:
        """HGETALL of each key, pipelined; a missing key gives an empty dict."""
        if not keys:
            return []

        def op(client: Any) -> Awaitable[list[Any]]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return pipe.execute()  # type: ignore[no-any-return]

        rows = await self._call(f"reading {len(keys)} hashes", op)
        return [{_text(k): _text(v) for k, v in (row or {}).items()} for row in rows]

    async def keep_payload(self, data: bytes) -> str:
        """Keep a dead letter's payload (for :attr:`Broker.spill`) as long as dead letters live."""
        key = names.DLQ_PAYLOAD_KEY_PREFIX + hashlib.sha256(data).hexdigest()
        ex = max(1, int(self.settings.dlq_max_age_s))
        await self._call("keeping a dead letter's payload", lambda c: c.set(key, data, ex=ex))
        return key

    async def get_bytes(self, key: str) -> bytes | None:
        """GET a binary value."""
        raw = await self._call(f"reading {key}", lambda c: c.get(key))
        return bytes(raw) if raw is not None else None

    async def get_text(self, key: str) -> str | None:
        """GET a string value."""
        raw = await self._call(f"reading {key}", lambda c: c.get(key))
        return raw.decode() if raw is not None else None

    async def ping(self) -> None:
        """Round trip to the server (every primary of a Cluster)."""
        await self._call("pinging", lambda c: c.ping())

    async def config_values(self, name: str) -> list[str]:
        """``CONFIG GET name`` of the primary (of every primary in a Cluster)."""
        async def op(client: Any) -> list[str]:
            if self.mode == "cluster":
                got = await client.config_get(name, target_nodes=ValkeyCluster.PRIMARIES)
                rows = list(got.values()) if got and all(isinstance(v, dict) for v in got.values()) else [got]
            else:
                rows = [await client.config_get(name)]
            return [_text(r.get(name, r.get(name.encode(), ""))) for r in rows]

        return await self._call(f"reading its {name} setting", op)

    async def replica_counts(self) -> list[int]:
        """Connected replicas of the primary (of each primary in a Cluster), from ``INFO replication``."""
        async def op(client: Any) -> list[Any]:
            if self.mode == "cluster":
                return list((await client.info("replication", target_nodes=ValkeyCluster.PRIMARIES)).values())
            return [await client.info("replication")]

        rows = await self._call("reading its replication state", op)
        return [int(row.get("connected_slaves", 0) or 0) for row in rows]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def decode_record(data: bytes) -> ResultRecord:
    """Decode a stored or notified result record."""
    try:
        return record_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"stored result record is not valid: {exc}") from exc


def encode_record(record: ResultRecord) -> bytes:
    """Encode a result record (results must be msgpack-encodable)."""
    return encoder.encode(record)
