"""The one seam around nats-py: connections, streams, consumers, publishing.

nats-py exceptions are translated to :mod:`heddle.errors` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from heddle import names
from heddle.errors import BrokerError, HeddleError, MessageTooLarge
from heddle.natsclient import (
    Connection,
    PlainTextServer,
    asked_again_on_timeout,
    connect_failure,
    connect_options,
    refused_credentials,
    translate,
)
from heddle.pubacks import NoStreamAnswered, PubAcks, PublishAck
from heddle.redact import redact
from heddle.settings import Settings, nats_server_urls

log = logging.getLogger("heddle.broker")
# Pages of a JetStream list (256 entries each) read at most: 256,000 consumers.
_MAX_LIST_PAGES = 1000

#: A message as consumers receive it (nats-py's): the type actors handle, named here so
#: that nothing outside this module imports nats-py.
Message = Msg

# Publish-ack waits are pipelined; this bounds how many are in flight per connection.
_MAX_PENDING_PUBLISHES = 8192
# Header bytes a message may carry without being measured: JetStream stores at most
# 64 KiB of headers, so a payload this far below max_payload always fits.
_HEADERS_ROOM = 65 * 1024
# Token streams (HEDDLE_STREAMS): a reader replays a task's chunks for this long after
# they were written, and the stream never holds more than this in all (oldest go first).
STREAMS_MAX_AGE_S = 3600.0
STREAMS_MAX_BYTES = 256 * 1024 * 1024
STREAMS_MAX_MSGS_PER_SUBJECT = 100_000
_NATS_HDR_LINE = b"NATS/1.0\r\n"
# How often a publish that no stream answered is sent again (Broker.publish).
NO_STREAM_RETRY_S = 0.1


# A permission refused again within this long is logged at debug (counted in the next warning).
_VIOLATION_LOG_S = 60.0
_VIOLATION = re.compile(r'for (\w+) to "([^"]*)"')


def _violation_kind(said: str) -> str:
    """``subscription heddle.results.*`` for a refused ``heddle.results.<id>``: one kind per subject family."""
    m = _VIOLATION.search(said)
    if m is None:
        return said
    tokens = m.group(2).split(".")
    if len(tokens) > 2 and tokens[-1] not in ("*", ">"):
        tokens[-1] = "…"
    return f"{m.group(1)} {'.'.join(tokens)}"


def _stored(out: asyncio.Future[PublishAck], on_stored: Callable[[PublishAck], None] | None, ack: PublishAck) -> None:
    """End a :meth:`Broker.publish_now` future with the stream's ack, telling ``on_stored`` first."""
    if on_stored is not None:
        on_stored(ack)
    out.set_result(ack)


class Broker:
    """A NATS connection with Heddle's streams and consumers on it.

    Args:
        settings: Connection and delivery settings.
        name: Connection name shown by the server (``heddle-worker@host``).
    """

    def __init__(self, settings: Settings, name: str = "heddle") -> None:
        self.settings = settings
        self.name = name
        self.nc: Connection | None = None
        self.js: JetStreamContext | None = None
        self._reconnected_cbs: list[Callable[[], Awaitable[None]]] = []
        self.disconnected_at: float | None = None
        # Set when the connection closed without close() being called (nats-py gave
        # up: the server refused it, say); the process cannot reach the bus again.
        self.lost: str | None = None
        self.lost_event = asyncio.Event()
        self._closing = False
        #: The publishes awaiting JetStream's answer (a sender may wait for room among them).
        self.pubacks = PubAcks(_MAX_PENDING_PUBLISHES)
        # publish_now's messages being sent again after no stream answered them.
        self._again: set[asyncio.Task[None]] = set()
        # Keeps a dead letter's payload elsewhere when it is too large to copy with its
        # headers; returns where (Connections sets it to the result store's).
        self.spill: Callable[[bytes], Awaitable[str]] | None = None

    @property
    def url(self) -> str:
        return self.settings.nats_url

    @property
    def max_payload(self) -> int:
        """The most bytes (payload plus headers) the server takes in one message."""
        return self.nc.max_payload if self.nc is not None else 1024 * 1024

    def check_size(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Raise :class:`MessageTooLarge` if the message would exceed the server's max_payload.

        nats-py checks the payload alone; the server counts the headers too, and
        closes the connection of a client that sends more (nats-py does not reconnect
        after that), so every publish is checked here first.
        """
        limit = self.max_payload
        size = len(payload)
        if size + _HEADERS_ROOM <= limit:
            return  # the common case: no need to measure the headers
        if headers:
            size += len(_NATS_HDR_LINE) + 2 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
        if size > limit:
            raise MessageTooLarge(
                f"a message of {size:,} bytes (payload and headers) for {subject} is over nats-server's "
                f"max_payload of {limit:,} bytes; send less data (pass large data by reference) or raise "
                f"max_payload on the server"
            )

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def on_reconnect(self, cb: Callable[[], Awaitable[None]]) -> None:
        """Run ``cb`` after every reconnection (used to re-bind pull consumers)."""
        self._reconnected_cbs.append(cb)

    async def connect(self) -> None:
        """Connect, retrying forever on later disconnects; fail fast on the first."""

        shown = redact(self.url)
        secrets = self.settings.secrets()
        user = self.settings.nats_auth.user
        violations: dict[str, tuple[float, int]] = {}  # kind -> (logged at, refused since)
        options = connect_options(self.settings)
        # What the server said when it refused the login, or why TLS failed.
        refused: list[BaseException] = []
        tls_failed = asyncio.Event()

        async def disconnected() -> None:
            self.disconnected_at = time.monotonic()
            if not self._closing:
                log.warning("disconnected from nats-server at %s", shown)

        async def reconnected() -> None:
            self.disconnected_at = None
            log.warning("reconnected to nats-server at %s", shown)
            for cb in self._reconnected_cbs:
                try:
                    await cb()
                except Exception:
                    log.exception("reconnect handler failed")

        async def error(exc: Exception) -> None:
            # Permission violations and protocol errors are worth seeing; a reconnect
            # attempt that fails is said once by disconnected() above.
            if refused_credentials(exc) or isinstance(exc, ssl.SSLError | PlainTextServer):
                refused[:] = [exc]
                if isinstance(exc, ssl.SSLError | PlainTextServer) and self.nc is None:
                    tls_failed.set()
            said = redact(str(exc), *secrets)
            if "permissions violation" in said:
                # The connection stays open; only this publish or subscription was dropped.
                # One line a minute per kind (heddle.results.* for every task a client sends).
                kind = _violation_kind(said)
                now = time.monotonic()
                last, more = violations.get(kind, (-_VIOLATION_LOG_S, 0))
                if now - last < _VIOLATION_LOG_S:
                    violations[kind] = (last, more + 1)
                    log.debug("nats-server at %s refused a permission: %s", shown, said)
                    return
                violations[kind] = (now, 0)
                log.warning("nats-server at %s refused %s a permission: %s%s (docs/security.md says what each "
                            "role may do)", shown, f"NATS user {user!r}" if user else "this connection", said,
                            f"; {more} more like it in the last minute" if more else "")
            elif isinstance(exc, nats.errors.Error) and not isinstance(exc, nats.errors.ConnectionClosedError):
                log.warning("nats-server at %s reported: %s", shown, said)
            else:
                log.debug("nats error: %s", redact(repr(exc), *secrets))

        async def closed() -> None:
            if self._closing:
                return
            nc = self.nc
            why = repr(nc.last_error) if nc is not None and nc.last_error is not None else "no reason given"
            self.lost = redact(f"the connection to nats-server at {shown} was closed for good ({why})", *secrets)
            log.error("%s; this process cannot reach the bus again and must be restarted", self.lost)
            self.lost_event.set()

        options.update(
            name=self.name,
            connect_timeout=self.settings.connect_timeout_s,
            allow_reconnect=True,
            # A few attempts for the first connection so a wrong URL fails fast;
            # raised to "forever" below once connected.
            max_reconnect_attempts=2,
            reconnect_time_wait=0.25,
            ping_interval=5,
            max_outstanding_pings=3,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            closed_cb=closed,
        )
        nc = Connection()
        plain_text = (
            f"nats-server at {shown} does not use TLS, but this process asks for it (a tls:// URL or NATS_TLS_CA, "
            f"NATS_TLS_CERT); enable tls {{ }} on the server, or use nats:// and unset NATS_TLS_*"
        )
        if self.settings.nats_tls:
            # nats-py speaks plain text to a server that does not ask for TLS, whatever the
            # URL's scheme: hand the password or token over only once the server said TLS.
            # nats-py asks for them when it writes CONNECT, after the TLS upgrade.
            def guarded(value: str) -> Callable[[], str]:
                def give() -> str:
                    if not nc._server_info.get("tls_required"):
                        raise PlainTextServer(plain_text)
                    return value

                return give

            for key in ("user", "password", "token"):
                if options.get(key):
                    options[key] = guarded(options[key])
        # A comma-separated NATS_URL is a cluster's server list: nats-py connects to one
        # and reconnects to any (it refuses the list as one string).
        connecting = asyncio.ensure_future(nc.connect(nats_server_urls(self.url), **options))
        # nats-py never returns from a failed TLS handshake (it waits for the closing of
        # a socket it handed to the handshake): stop at the first TLS error instead (and
        # at a server without TLS, which would only be tried again).
        failing = asyncio.ensure_future(tls_failed.wait())
        try:
            await asyncio.wait((connecting, failing), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            connecting.cancel()
            raise
        finally:
            failing.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            raise connect_failure(self.settings, refused[0], refused[0])
        try:
            connecting.result()
        except Exception as exc:
            raise connect_failure(self.settings, exc, refused[0] if refused else None) from exc
        self.nc = nc
        if self.settings.nats_tls and not self.nc._server_info.get("tls_required"):
            # Logged in without a password (an nkey, a .creds file, a URL's): still never
            # let "tls://" or NATS_TLS_CA quietly mean plain text.
            await self.close()
            raise BrokerError(plain_text)
        # Once connected, reconnect forever: a restarted nats-server must never
        # leave a worker silently disconnected.
        self.nc.options["max_reconnect_attempts"] = -1
        self.js = self.nc.jetstream(timeout=self.settings.connect_timeout_s)
        await self.pubacks.start(self.nc)

    async def close(self) -> None:
        """Flush pending publishes and close the connection."""
        nc, self.nc = self.nc, None
        self._closing = True
        self.pubacks.close()
        if nc is None or nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.flush(), 2)
        with contextlib.suppress(Exception):
            await nc.close()

    def _js(self) -> JetStreamContext:
        if self.js is None:
            raise BrokerError("broker is not connected; call connect() first")
        return self.js

    async def ensure_streams(self) -> None:
        """Create or update the task, goal, dead-letter and token-chunk streams (idempotent)."""
        s = self.settings
        tasks = api.StreamConfig(
            name=names.TASKS_STREAM,
            subjects=[names.INCOMING_SUBJECT, names.ROUTED_SUBJECTS, names.BANDED_SUBJECTS],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=s.dedup_window_s,
        )
        dlq = api.StreamConfig(
            name=names.DLQ_STREAM,
            subjects=[names.DEAD_LETTER_SUBJECT],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_msgs=s.dlq_max_msgs,
            max_age=s.dlq_max_age_s,
            duplicate_window=s.dedup_window_s,
        )
        goals = api.StreamConfig(
            name=names.GOALS_STREAM,
            subjects=[names.GOALS_SUBJECT],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=s.dedup_window_s,
        )
        chunks = api.StreamConfig(  # token chunks of streamed LLM replies (heddle.chunks)
            name=names.STREAMS_STREAM,
            subjects=[names.STREAM_SUBJECTS],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=STREAMS_MAX_AGE_S,
            max_bytes=STREAMS_MAX_BYTES,
            max_msgs_per_subject=STREAMS_MAX_MSGS_PER_SUBJECT,
            discard=api.DiscardPolicy.OLD,
        )
        for cfg in (tasks, dlq, goals, chunks):
            await self._add_or_update_stream(cfg)

    async def ensure_schedules_stream(self) -> None:
        """Create or update HEDDLE_SCHEDULES: schedule definitions and their ticks (heddle.schedules).

        nats-server keeps the schedules (message schedules, ADR-51): it publishes each
        definition's body to its target subject at every due time, in this stream.

        Raises:
            BrokerError: The server does not keep message schedules (older than 2.14).
        """
        cfg = api.StreamConfig(
            name=names.SCHEDULES_STREAM,
            subjects=[names.SCHEDULES_SUBJECTS],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            duplicate_window=self.settings.dedup_window_s,
            allow_rollup_hdrs=True,
            allow_msg_schedules=True,
        )
        await self._add_or_update_stream(cfg)
        info = await self.stream_info(names.SCHEDULES_STREAM)
        if not info.config.allow_msg_schedules:
            version = self.nc._server_info.get("version", "?") if self.nc is not None else "?"
            raise BrokerError(
                f"nats-server {version} at {redact(self.url)} does not keep message schedules; periodic "
                f"schedules (app.periodic) need nats-server 2.14 or later"
            )

    async def stream_subjects(self, stream: str, subjects_filter: str) -> dict[str, int]:
        """The subjects of ``stream`` matching ``subjects_filter`` that hold messages, with their counts."""
        info = await self.stream_info(stream, subjects_filter=subjects_filter)
        return dict(info.state.subjects or {})

    async def purge_subject(self, stream: str, subject: str) -> None:
        """Delete every message of ``stream`` on ``subject``."""
        try:
            await self._js().purge_stream(stream, subject=subject)
        except Exception as exc:
            raise translate(exc, self.url, f"purging {subject} from {stream}") from exc

    async def _add_or_update_stream(self, cfg: api.StreamConfig) -> None:
        """Create a stream, or update it to ``cfg``, with ``stream_replicas`` replicas (never fewer than it has)."""
        js = self._js()
        cfg.num_replicas = self.settings.stream_replicas
        try:
            await asked_again_on_timeout(lambda: js.add_stream(cfg))
        except nats.js.errors.BadRequestError as exc:
            # 10058: stream name already in use with a different configuration.
            if exc.err_code != 10058:
                raise self._stream_error(exc, f"creating stream {cfg.name}") from exc
            try:
                # A higher replica count is applied in place; a lower one never is, so that
                # a process with the default (1) cannot shrink a cluster's R3 streams.
                current = (await asked_again_on_timeout(lambda: js.stream_info(cfg.name or ""))).config
                cfg.num_replicas = max(current.num_replicas or 1, cfg.num_replicas or 1)
                have = current.as_dict()
                # A duplicate window of 0 asks for the server's default (what ``have`` shows).
                if any(have.get(k) != v for k, v in cfg.as_dict().items() if (k, v) != ("duplicate_window", 0)):
                    await asked_again_on_timeout(lambda: js.update_stream(cfg))
                # else: only the replicas differed, and the stream has more: nothing to change
            except Exception as exc2:
                raise self._stream_error(exc2, f"updating stream {cfg.name}") from exc2
        except Exception as exc:
            raise self._stream_error(exc, f"creating stream {cfg.name}") from exc

    def _stream_error(self, exc: Exception, doing: str) -> HeddleError:
        """A stream refused for its replica count says so, and how to fix it; other errors as usual."""
        said = str(exc).lower()
        replicas = self.settings.stream_replicas
        if replicas > 1 and ("replicas" in said or "insufficient resources" in said or "no suitable peers" in said):
            peers = self._cluster_size()
            return BrokerError(
                f"{doing} with {replicas} replicas failed: nats-server at {redact(self.url)} "
                + (f"has {peers} JetStream server(s) in its cluster" if peers else "is not a JetStream cluster")
                + f" ({exc}); set HEDDLE_STREAM_REPLICAS (stream_replicas) to at most the number of "
                f"JetStream servers, or add servers to the cluster"
            )
        return translate(exc, self.url, doing)

    def _cluster_size(self) -> int:
        """JetStream servers in this server's cluster, as its INFO says (0: not clustered)."""
        info = self.nc._server_info if self.nc is not None else {}
        if not info.get("cluster"):
            return 0
        return len(info.get("connect_urls") or []) or 1  # its own URL is listed too

    async def ensure_consumer(self, worker_type: str, tier: str | None = None) -> str:
        """Create or update the durable pull consumer shared by all replicas of a worker type.

        With ``tier`` the consumer takes only that tier's subject (LLM workers run
        one tier each); without it, every tier.
        """
        s = self.settings
        durable = names.consumer_name(worker_type, tier)
        cfg = api.ConsumerConfig(
            durable_name=durable,
            filter_subject=names.worker_filter(worker_type, tier),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=s.ack_wait_s,
            max_deliver=s.max_deliver,
            max_ack_pending=s.max_ack_pending,
            max_waiting=512,
        )
        try:
            # CONSUMER.DURABLE.CREATE on an existing durable updates its editable fields.
            await asked_again_on_timeout(lambda: self._js().add_consumer(names.TASKS_STREAM, cfg))
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == 10100:  # filtered consumer not unique on a work-queue stream
                raise BrokerError(
                    f"another consumer already takes {cfg.filter_subject} from {names.TASKS_STREAM}: "
                    f"a worker type is served either by all-tier workers or by per-tier workers "
                    f"(--tier), not both; stop the others or use another worker type name"
                ) from exc
            raise translate(exc, self.url, f"creating consumer {durable}") from exc
        except Exception as exc:
            raise translate(exc, self.url, f"creating consumer {durable}") from exc
        return durable

    async def ensure_named_consumer(
        self, durable: str, filter_subject: str, *, max_deliver: int, stream: str = names.TASKS_STREAM
    ) -> str:
        """Create or update a durable pull consumer on one subject (the router's, the orchestrators')."""
        s = self.settings
        cfg = api.ConsumerConfig(
            durable_name=durable,
            filter_subject=filter_subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=s.ack_wait_s,
            max_deliver=max_deliver,
            max_ack_pending=s.max_ack_pending,
            max_waiting=512,
        )
        try:
            await asked_again_on_timeout(lambda: self._js().add_consumer(stream, cfg))
        except Exception as exc:
            raise translate(exc, self.url, f"creating consumer {durable}") from exc
        return durable

    async def pull_subscribe(self, durable: str, stream: str = names.TASKS_STREAM) -> Any:
        """Bind a pull subscription (nats-py's) to an existing durable consumer; see :mod:`heddle.pull`."""
        try:
            psub = await self._js().pull_subscribe_bind(durable=durable, stream=stream)
        except Exception as exc:
            raise translate(exc, self.url, f"binding to consumer {durable}") from exc
        return psub

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float = 5.0
    ) -> PublishAck:
        """Publish to JetStream and wait for the stream's ack (pipelined with other publishes).

        While no stream answers (a cluster electing the stream's leader after losing
        a node, for a few seconds), the same message is sent again every
        ``NO_STREAM_RETRY_S`` until ``timeout_s`` has passed; its ``Nats-Msg-Id``
        makes the stream store it once.
        """
        return await self._publish_until(subject, payload, headers, timeout_s, time.monotonic() + timeout_s)

    async def _publish_until(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float, deadline: float
    ) -> PublishAck:
        while True:
            fut = await self.publish_start(subject, payload, headers, max(0.05, deadline - time.monotonic()))
            try:
                return await fut
            except Exception as exc:
                err = self._ack_error(exc, subject, timeout_s, deadline)
                if err is not None:
                    raise err from exc
            await asyncio.sleep(NO_STREAM_RETRY_S)

    def _ack_error(self, exc: BaseException, subject: str, timeout_s: float, deadline: float) -> BrokerError | None:
        """What a failed publish of ``subject`` raises; None for one to send again (no stream answered yet)."""
        if isinstance(exc, NoStreamAnswered):
            if time.monotonic() + NO_STREAM_RETRY_S < deadline:
                return None
            return translate(exc, self.url, f"publishing to {subject} (tried for {timeout_s:g}s)")
        if isinstance(exc, TimeoutError):  # the sweeper's: the connection is up, the answer is late
            return BrokerError(
                f"JetStream did not acknowledge a message on {subject} within {timeout_s:g}s (nats-server at "
                f"{redact(self.url)}): the stream may be overloaded or electing a leader, or something other "
                f"than a stream subscribes to the subject; the message may or may not be stored"
            )
        return translate(exc, self.url, f"publishing to {subject}")

    def publish_now(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float = 5.0,
        on_stored: Callable[[PublishAck], None] | None = None,
    ) -> asyncio.Future[PublishAck] | None:
        """:meth:`publish` without awaiting: the message is queued now, its ack comes in the future returned.

        The future ends as ``await publish(...)`` would (the same ack, the same errors,
        the same sending again while no stream answers); ``on_stored`` is called with
        the ack first. None, with nothing sent, when the message would have to wait
        (for room among the pending publishes, or in nats-py's buffer) or is too large:
        :meth:`publish` then does what is needed, or raises what is wrong.
        """
        nc = self.nc
        if nc is None:
            return None
        try:
            self.check_size(subject, payload, headers)
        except MessageTooLarge:
            return None
        deadline = time.monotonic() + timeout_s
        ack = self.pubacks.publish_now(nc, subject, payload, headers, timeout_s)
        if ack is None:
            return None
        out: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()
        ack.add_done_callback(functools.partial(
            self._answered, out, on_stored, (subject, payload, headers, timeout_s, deadline)))
        return out

    def _answered(
        self, out: asyncio.Future[PublishAck], on_stored: Callable[[PublishAck], None] | None,
        message: tuple[str, bytes, dict[str, str], float, float], ack: asyncio.Future[PublishAck],
    ) -> None:
        if out.done():
            return
        if ack.cancelled():
            out.cancel()
            return
        exc = ack.exception()
        if exc is None:
            _stored(out, on_stored, ack.result())
            return
        subject, _, _, timeout_s, deadline = message
        err = self._ack_error(exc, subject, timeout_s, deadline)
        if err is None:
            again = asyncio.get_running_loop().create_task(self._publish_again(out, on_stored, message))
            self._again.add(again)
            again.add_done_callback(self._again.discard)
            return
        err.__cause__ = exc
        out.set_exception(err)

    async def _publish_again(
        self, out: asyncio.Future[PublishAck], on_stored: Callable[[PublishAck], None] | None,
        message: tuple[str, bytes, dict[str, str], float, float],
    ) -> None:
        await asyncio.sleep(NO_STREAM_RETRY_S)
        try:
            stored = await self._publish_until(*message)
        except Exception as exc:
            if not out.done():
                out.set_exception(exc)
            return
        if not out.done():
            _stored(out, on_stored, stored)

    async def publishes_settled(self) -> None:
        """Wait until every publish made here is answered (or has failed)."""
        await self.pubacks.settled()
        while self._again:
            await asyncio.gather(*list(self._again), return_exceptions=True)

    async def publish_start(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float = 5.0
    ) -> asyncio.Future[PublishAck]:
        """Publish to JetStream; return the future of the stream's ack (failed after ``timeout_s``)."""
        if self.nc is None:
            raise BrokerError("broker is not connected; call connect() first")
        self.check_size(subject, payload, headers)
        try:
            return await self.pubacks.publish(self.nc, subject, payload, headers, timeout_s)
        except Exception as exc:
            raise translate(exc, self.url, f"publishing to {subject}") from exc

    def translate_error(self, exc: BaseException, doing: str) -> BrokerError:
        """Translate a nats-py exception raised outside this module's calls."""
        return translate(exc, self.url, doing)

    def publish_core_now(self, subject: str, payload: bytes) -> bool:
        """:meth:`publish_core` without awaiting; False (nothing sent) where it would wait (raises MessageTooLarge)."""
        if self.nc is None:
            return False
        self.check_size(subject, payload)
        return self.nc.publish_core_now(subject, payload)

    async def publish_core(self, subject: str, payload: bytes) -> None:
        """Fire-and-forget publish on core NATS (notices, control, events)."""
        if self.nc is None:
            raise BrokerError("broker is not connected")
        self.check_size(subject, payload)
        try:
            await self.nc.publish(subject, payload)
        except Exception as exc:
            raise translate(exc, self.url, f"publishing to {subject}") from exc

    async def subscribe(
        self,
        subject: str,
        cb: Callable[[Msg], Awaitable[None]] | None = None,
        future: asyncio.Future[Any] | None = None,
        inline: Callable[[Msg], None] | None = None,
    ) -> Any:
        """Core NATS subscription; thin wrapper so callers never import nats-py.

        ``inline`` is a plain function called in the connection's reader as each message
        is parsed (:meth:`heddle.natsclient.Connection.subscribe_inline`): for handlers
        that only settle futures, on a path a caller waits on.
        """
        if self.nc is None:
            raise BrokerError("broker is not connected")
        try:
            if inline is not None:
                return await self.nc.subscribe_inline(subject, inline)
            sub = await self.nc.subscribe(subject, cb=cb, future=future)
            if future is not None:
                # A future takes one message: have the server drop the interest after
                # it, and the client ignore any second one (nats-py would otherwise
                # set the future twice and break the connection's reader).
                await sub.unsubscribe(limit=1)
            return sub
        except Exception as exc:
            raise translate(exc, self.url, f"subscribing to {subject}") from exc

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Round-trip to the server so that earlier subscriptions are registered."""
        if self.nc is None:
            raise BrokerError("broker is not connected")
        try:
            await self.nc.flush(timeout=int(max(1, timeout_s)))
        except Exception as exc:
            raise translate(exc, self.url, "flushing") from exc

    async def dead_letter(
        self,
        payload: bytes,
        reason: str,
        *,
        task_id: str,
        subject: str,
        dedup_key: str,
        original_headers: dict[str, str] | None = None,
    ) -> None:
        """Copy a message to the dead-letter stream with the reason in its headers.

        The original ``Heddle-*`` routing headers are kept so the message can be replayed.
        A payload too large to copy with those headers is kept by reference
        (``Heddle-Payload-Ref``, see :attr:`spill`).
        """
        headers = {k: v for k, v in (original_headers or {}).items() if k.startswith("Heddle-")}
        headers |= {
            names.HDR_REASON: reason[:1000].replace("\r", " ").replace("\n", " "),
            names.HDR_TASK_ID: task_id,
            names.HDR_ORIGINAL_SUBJECT: subject,
            names.HDR_FAILED_AT: f"{time.time():.3f}",
            names.HDR_MSG_ID: f"dlq:{dedup_key}",
        }
        try:
            self.check_size(names.DEAD_LETTER_SUBJECT, payload, headers)
        except MessageTooLarge:
            # The message fit the server without these headers. Copying it as it is would
            # make the server close this connection: keep its payload by reference.
            if self.spill is None:
                raise
            headers[names.HDR_PAYLOAD_REF] = await self.spill(payload)
            payload = b""
        await self.publish(names.DEAD_LETTER_SUBJECT, payload, headers)

    async def publish_many(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]], timeout_s: float = 10.0
    ) -> list[PublishAck | BaseException]:
        """Publish to JetStream, pipelined, and wait for every ack at once (the router's batch).

        Returns, per message in order, the stream's ack or the exception (never raises
        for one message: the caller decides what a failed one means).
        """
        futures: list[asyncio.Future[PublishAck]] = []
        loop = asyncio.get_running_loop()
        for subject, payload, headers in messages:
            try:
                futures.append(await self.publish_start(subject, payload, headers, timeout_s))
            except BrokerError as exc:
                failed: asyncio.Future[PublishAck] = loop.create_future()
                failed.set_exception(exc)
                futures.append(failed)
        if futures:
            await asyncio.wait(futures)
        out: list[PublishAck | BaseException] = []
        for (subject, _, _), f in zip(messages, futures, strict=True):
            failure = f.exception()
            out.append(f.result() if failure is None else translate(failure, self.url, f"publishing to {subject}"))
        return out

    async def stream_info(self, stream: str, subjects_filter: str | None = None) -> api.StreamInfo:
        """A stream's state; BrokerError if it does not exist or the server does not answer."""
        try:
            return await asked_again_on_timeout(lambda: self._js().stream_info(stream, subjects_filter=subjects_filter))
        except Exception as exc:
            raise translate(exc, self.url, f"reading stream {stream}") from exc

    async def consumers_info(self, stream: str) -> list[api.ConsumerInfo]:
        """Every consumer of a stream with its counters (JetStream lists them 256 a page)."""
        found: list[api.ConsumerInfo] = []
        try:
            for _ in range(_MAX_LIST_PAGES):
                page = await self._js().consumers_info(stream, offset=len(found) or None)
                found += page
                if not page:
                    break
        except Exception as exc:
            raise translate(exc, self.url, f"listing the consumers of {stream}") from exc
        return found

    async def last_stream_msg(self, stream: str, subject: str) -> api.RawStreamMsg:
        """The newest stored message on ``subject`` (a KV key's current entry, say)."""
        try:
            return await asked_again_on_timeout(lambda: self._js().get_last_msg(stream, subject))
        except Exception as exc:
            raise translate(exc, self.url, f"reading the last message on {subject}") from exc

    async def key_value(self, bucket: str, *, ttl_s: float, description: str = "") -> Any:
        """A JetStream key-value bucket, created (history 1, entries expiring after ``ttl_s``) if missing."""
        js = self._js()
        try:
            return await js.key_value(bucket)
        except Exception:
            pass
        try:
            return await js.create_key_value(bucket=bucket, ttl=ttl_s, history=1, description=description,
                                             replicas=self.settings.stream_replicas)
        except Exception:
            try:
                return await js.key_value(bucket)  # created by another process meanwhile
            except Exception as exc:
                raise translate(exc, self.url, f"opening key-value bucket {bucket}") from exc

    async def get_stream_msg(self, stream: str, seq: int) -> api.RawStreamMsg:
        """Fetch one stored message by sequence number."""
        try:
            return await self._js().get_msg(stream, seq)
        except Exception as exc:
            raise translate(exc, self.url, f"reading {stream} #{seq}") from exc

    async def delete_stream_msg(self, stream: str, seq: int) -> None:
        """Delete one message from a stream; a missing message is not an error."""
        try:
            await self._js().delete_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            return
        except Exception as exc:
            raise translate(exc, self.url, f"deleting {stream} #{seq}") from exc

    async def account_info(self, timeout_s: float = 2.0) -> api.AccountInfo:
        """One JetStream API round trip (health checks): fails if JetStream does not answer."""
        try:
            return await asyncio.wait_for(self._js().account_info(), timeout_s)
        except Exception as exc:
            raise translate(exc, self.url, "asking JetStream for account info") from exc

    async def consumer_info(self, stream: str, durable: str, timeout_s: float = 2.0) -> api.ConsumerInfo:
        """A consumer's state (pending, ack-pending); BrokerError naming it if it does not exist."""
        try:
            return await asyncio.wait_for(self._js().consumer_info(stream, durable), timeout_s)
        except nats.js.errors.NotFoundError as exc:
            raise BrokerError(f"consumer {durable} does not exist on stream {stream} at {redact(self.url)}") from exc
        except Exception as exc:
            raise translate(exc, self.url, f"reading consumer {durable} on {stream}") from exc
