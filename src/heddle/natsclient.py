"""nats-py's client as Heddle connects with it, and what its errors say: the seam below :mod:`heddle.broker`.

:class:`Connection` is the client :class:`heddle.broker.Broker` connects with;
:func:`translate` maps every nats-py exception to a Heddle error that names the
server and the fix, once for the broker and the puller.

Part of the transport with :mod:`heddle.broker` and :mod:`heddle.pull`. Every
task delivery carries half a dozen headers (``Nats-Msg-Id``, the task name, the
worker type, the notice token...), and nats-py 2.16 parses each header name
with a generator over its characters to reject names holding whitespace: a
third of a worker's Python calls per task went there. :class:`Connection` does
the same check with one regular-expression search and parses the same way
otherwise; ``tests/test_nats_headers.py`` pins it to nats-py's result. Sending,
nats-py builds each header line with a regular-expression match of the name and
five byte-array calls; :func:`encode_headers` checks a name once and builds the
block as one string, to the same bytes (pinned by the same file).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from heddle.errors import BrokerError, BrokerUnavailable, ConfigError
from heddle.pubacks import NoStreamAnswered
from heddle.redact import redact
from heddle.settings import Settings, dev_session_note, nats_server_urls, readable_file, server_endpoint

__all__ = [
    "Connection", "PlainTextServer", "asked_again_on_timeout", "connect_failure", "connect_options", "encode_headers",
    "parse_header_lines", "refused_credentials", "translate",
]

log = logging.getLogger("heddle.broker")
T = TypeVar("T")

_CRLF = b"\r\n"
# A publish made without the event loop (Connection.publish_now) is written to the socket
# at once when this much is waiting, so that a loop of sends that never yields (a list of
# apply_async calls) reaches the server while it runs, not all at its end.
SYNC_WRITE_BYTES = 32 * 1024
# ... unless the socket's own buffer holds this much already: the flusher then writes it.
_SYNC_WRITE_BUFFERED = 1024 * 1024
# What str.isspace() calls whitespace (re's \s in a str pattern is the same set).
_WHITESPACE = re.compile(r"\s")
# What nats-py refuses in a published subject (a CR or LF would inject protocol commands).
_BAD_SUBJECT = re.compile(r"[ \t\r\n]")


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """A NATS header block (``Name: Value`` lines) as a dict, as nats-py parses it.

    Lines without a colon, names that are not ASCII and names holding
    whitespace are skipped; values are stripped and decoded as UTF-8 with
    replacement characters for bad bytes; a later line wins over an earlier one.
    """
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


# What nats-py accepts as a header name, and how it keeps a value on one line.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ONE_LINE = str.maketrans({"\r": " ", "\n": " "})
# Names already checked (a process sends a handful; bounded against a sender of endless new ones).
_CHECKED_NAMES: set[str] = set()
_MAX_CHECKED_NAMES = 1024


def encode_headers(headers: dict[str, str]) -> bytes:
    """The header block nats-py 2.16 sends for ``headers``, byte for byte, with fewer calls.

    Names are stripped and an empty one skipped; a name with other characters raises
    ``nats.errors.BadHeaderError``; values are stripped and a CR or LF in them becomes a space.
    """
    lines = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        if name not in _CHECKED_NAMES:
            stripped = name.strip()
            if not stripped:
                continue
            if not _HEADER_NAME.fullmatch(stripped):
                raise nats.errors.BadHeaderError(stripped)
            if stripped == name and len(_CHECKED_NAMES) < _MAX_CHECKED_NAMES:
                _CHECKED_NAMES.add(name)
            name = stripped
        if "\r" in value or "\n" in value:
            value = value.translate(_ONE_LINE)
        lines.append(f"{name}: {value.strip()}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def _hpub(subject: str, reply: str, payload: bytes, headers: dict[str, str]) -> bytes:
    """The ``HPUB`` command nats-py sends for a message with headers."""
    hdr = encode_headers(headers)
    return b"".join((f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + len(payload)}\r\n".encode(), hdr, payload, _CRLF))


class Connection(Client):
    """A nats-py ``Client`` with a leaner header parser, and subscriptions served in its reader.

    ``subscribe_inline`` is for the subscriptions every task's round trip waits on
    (publish acks, result notices): nats-py hands each message of a callback
    subscription to a task of its own through a queue, one more turn of the event
    loop per message; an inline subscription's handler is called by the reader as
    soon as the message is parsed. The handler must not block and must not raise
    (what it raises is logged and dropped). ``tests/test_nats_headers.py`` pins the
    nats-py internals both rely on.
    """

    _parse_header_lines = staticmethod(parse_header_lines)
    _kick_future: asyncio.Future[None] | None = None
    # Set when publish_now wrote to the socket itself, until the loop's next turn.
    _wrote_this_turn = False

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, str] | None
    ) -> None:
        if headers is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        if not subject:
            raise nats.errors.BadSubjectError
        cmd = _hpub(subject, reply, payload, headers)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(cmd)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def publish_now(self, subject: str, payload: bytes, reply: str, headers: dict[str, str]) -> bool:
        """Queue a publish without awaiting: False (nothing queued) if it must wait its turn.

        The first one of a turn of the event loop is written to the socket at once (when
        the socket's buffer is empty); the others are queued as ``publish`` queues them, for
        the flusher to write at the loop's next turn, and once :data:`SYNC_WRITE_BYTES` are
        waiting they are written at once, so that sends made in a loop that does not yield
        reach the server meanwhile. False while not connected, draining, or with nats-py's
        pending buffer full: the caller then publishes the usual way, which waits.
        """
        if not self._taking() or not subject:
            return False
        try:
            cmd = _hpub(subject, reply, payload, headers)
        except nats.errors.BadHeaderError:
            return False  # publish raises it, where the send is awaited
        if not self._queue(cmd, len(payload)):
            return False
        if self._pending_data_size >= SYNC_WRITE_BYTES and self._write_pending_now(_SYNC_WRITE_BUFFERED):
            return True
        if not self._wrote_this_turn and self._write_pending_now(0):
            # The first send of this turn of the loop leaves now: a lone task's message is on
            # its way before its caller even awaits it, a turn earlier than the flusher would
            # write it. Later sends of the same turn (a burst) are queued and written together.
            self._wrote_this_turn = True
            asyncio.get_running_loop().call_soon(self._next_turn)
            return True
        self._kick_flusher()
        return True

    def publish_core_now(self, subject: str, payload: bytes) -> bool:
        """Queue a core NATS publish (no reply, no headers) for the flusher, without awaiting.

        A ``PUB`` command as ``publish`` queues it (less its empty reply field), after
        the same checks of the subject and the payload's size; False (nothing queued)
        where ``publish`` would have to wait or raise: not connected, draining, a bad
        subject, too large, the pending buffer full. For fire-and-forget messages every
        task sends (lifecycle events, acks): one call instead of nats-py's three coroutines.
        """
        if not self._taking() or not subject or _BAD_SUBJECT.search(subject) or len(payload) > self._max_payload:
            return False
        if not self._queue(b"".join((f"PUB {subject} {len(payload)}\r\n".encode(), payload, _CRLF)), len(payload)):
            return False
        self._kick_flusher()
        return True

    def _taking(self) -> bool:
        """Whether a publish can be queued without awaiting: connected, not draining, the flusher running."""
        return self.is_connected and not self.is_draining_pubs and self._flush_queue is not None

    def _queue(self, cmd: bytes, payload_size: int) -> bool:
        """Append ``cmd`` to nats-py's pending buffer, counted as its publish counts it; False if it is full."""
        if self._pending_data_size + len(cmd) > self._max_pending_size > 0:
            return False
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        return True

    def _kick_flusher(self) -> None:
        if self._flush_queue is not None and self._flush_queue.empty():
            self._flush_queue.put_nowait(self._kick())

    def _next_turn(self) -> None:
        self._wrote_this_turn = False

    def _write_pending_now(self, max_buffered: int) -> bool:
        """Write the pending commands to the socket now, as the flusher would; False if it cannot.

        It cannot while the socket's own buffer holds more than ``max_buffered`` bytes
        (the server is slow to read: the flusher's turn is soon enough).
        """
        writer = getattr(self._transport, "_io_writer", None)  # nats-py's TcpTransport (not websockets)
        transport = getattr(writer, "transport", None)
        if transport is None or transport.is_closing() or transport.get_write_buffer_size() > max_buffered:
            return False
        transport.writelines(self._pending)
        self._pending = []
        self._pending_data_size = 0
        return True

    def _kick(self) -> asyncio.Future[None]:
        # The flusher sets the future it is handed unless it is done: a done one serves every kick.
        if self._kick_future is None:
            self._kick_future = asyncio.get_running_loop().create_future()
            self._kick_future.set_result(None)
        return self._kick_future

    async def subscribe_inline(self, subject: str, handler: Callable[[Msg], None]) -> Subscription:
        """Subscribe to ``subject``; ``handler(msg)`` is called in the reader for each message."""
        sub = await self.subscribe(subject)  # no callback: nats-py starts no task for it
        sub._pending_queue = _Inline(sub, handler)  # type: ignore[assignment]
        return sub


class _Inline:
    """Stands in for a subscription's pending queue: every message goes to the handler at once."""

    def __init__(self, sub: Subscription, handler: Callable[[Msg], None]) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Msg) -> None:
        # nats-py counted the bytes as pending before queueing them: nothing is left pending.
        self._sub._pending_size -= len(msg.data)
        try:
            self._handler(msg)
        except Exception:
            log.exception("a handler of %s failed on a message", msg.subject[:200])

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        """Nothing is queued."""

    async def join(self) -> None:
        """Nothing is queued (Subscription.drain waits on it)."""


def connect_options(settings: Settings) -> dict[str, Any]:
    """nats-py ``connect()`` options for the credentials and TLS in ``settings``.

    Credentials inside ``NATS_URL`` stay there (nats-py reads them from the URL).
    TLS files are read here, so a missing or unreadable one fails before any
    connection with the variable to fix.

    Raises:
        ConfigError: A file named by ``NATS_NKEY``, ``NATS_CREDS`` or ``NATS_TLS_*``
            cannot be read, or is not what it should be.
    """
    a = settings.nats_auth
    opts: dict[str, Any] = {}
    if a.inbox_prefix:
        opts["inbox_prefix"] = a.inbox_prefix
    if a.user:
        opts["user"], opts["password"] = a.user, a.password
    if a.token:
        opts["token"] = a.token
    if a.nkey or a.creds:
        try:
            import nkeys  # noqa: F401 - nats-py signs the server's nonce with it
        except ImportError:
            raise ConfigError(
                "NATS_NKEY and NATS_CREDS need the nkeys package: pip install 'nats-py[nkeys]'"
            ) from None
    if a.nkey:
        opts["nkeys_seed"] = readable_file("NATS_NKEY", a.nkey)
    if a.creds:
        opts["user_credentials"] = readable_file("NATS_CREDS", a.creds)
    if settings.nats_tls:
        ca = readable_file("NATS_TLS_CA", a.tls_ca) if a.tls_ca else None
        try:
            ctx = ssl.create_default_context(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"NATS_TLS_CA={a.tls_ca} is not a PEM CA certificate ({exc.reason or exc})") from None
        if a.tls_cert and a.tls_key:
            cert = readable_file("NATS_TLS_CERT", a.tls_cert)
            key = readable_file("NATS_TLS_KEY", a.tls_key)
            try:
                ctx.load_cert_chain(cert, key)
            except ssl.SSLError as exc:
                raise ConfigError(
                    f"NATS_TLS_CERT={a.tls_cert} and NATS_TLS_KEY={a.tls_key} are not a PEM certificate and "
                    f"its private key ({exc.reason or exc})"
                ) from None
        opts["tls"] = ctx
    return opts


class PlainTextServer(nats.errors.Error):
    """The server does not use TLS, but this process asks for it: its password or token is kept back."""


def connect_failure(settings: Settings, exc: BaseException, said: BaseException | None) -> BrokerError:
    """The error for a first connection that failed: a refused login or TLS names the variable to fix."""
    if isinstance(said, PlainTextServer):
        return BrokerError(str(said))
    where = ", ".join(server_endpoint(u) for u in nats_server_urls(settings.nats_url))
    told = redact(str(said or exc), *settings.secrets())
    if isinstance(said, ssl.SSLError) or isinstance(exc, ssl.SSLError):
        return BrokerError(f"TLS failed for {where} while connecting ({told}). Fix: {settings.tls_fix('nats', told)}.")
    if said is None and not refused_credentials(exc):
        return translate(exc, settings.nats_url, "connecting")
    shown = redact(settings.nats_url)
    at = f" at nats-server {shown}" if "@" in shown else ""  # which URL's user:*** was refused
    return BrokerError(
        f"authentication failed{at}: authorization failed for {where} while connecting ({told}). "
        f"{settings.login_fix('nats')}."
    )


async def asked_again_on_timeout(request: Callable[[], Awaitable[T]]) -> T:
    """A JetStream request that is safe to repeat, asked once more if it timed out.

    A cluster that lost a node leaves requests unanswered until it has elected new
    leaders, seconds later: the caller asks again instead of failing (a router or
    worker starting up while a node was killed used to exit on such a request).
    Safe to repeat: reads, and creating a stream or consumer with a given config
    (made again with the same config, it is left as it is).
    """
    try:
        return await request()
    except nats.errors.TimeoutError:
        log.warning("nats-server did not answer a JetStream request in time; asking once more")
        return await request()


def translate(exc: BaseException, url: str, doing: str, refused: BaseException | None = None) -> BrokerError:
    """Map a nats-py exception to a Heddle error that names the server and the fix, and no secret.

    Args:
        exc: What nats-py raised.
        url: The server's URL (``NATS_URL``); shown with its secrets replaced.
        doing: What was being done, for the message ("connecting").
        refused: The error the server sent before ``exc`` (nats-py reports a
            refused login on the error callback, then raises NoServersError).
    """
    if type(exc) in (BrokerError, NoStreamAnswered):
        return BrokerError(f"{exc}, while {doing}")  # said by heddle.pubacks, without the subject
    shown = redact(url)
    if refused is not None or refused_credentials(exc):
        said = redact(str(refused or exc), url)
        return BrokerError(
            f"authentication failed at nats-server {shown} while {doing}: the server refused the "
            f"credentials ({said}). Fix the user and password (user:password@host) or the token "
            f"(token@host) in NATS_URL, or the server's authorization config."
        )
    if isinstance(exc, nats.errors.TimeoutError):  # a request unanswered on a live connection (also an OSError)
        return BrokerError(
            f"nats-server at {shown} did not answer in time while {doing}; a JetStream cluster that lost "
            f"a node answers again once it has elected new stream leaders (seconds), else check the server"
        )
    if isinstance(exc, nats.errors.NoServersError | OSError | nats.errors.ConnectionClosedError):
        message = (
            f"cannot reach nats-server at {shown} while {doing}: {exc!r}. "
            f"Start it (`heddle dev` runs an embedded one) or set NATS_URL. "
            f"{dev_session_note(url, 'NATS_URL')}".rstrip()
        )
        return BrokerUnavailable(redact(message, url))
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return BrokerError(
            f"JetStream at {shown} did not answer while {doing}; is nats-server running with "
            f"JetStream enabled (`nats-server --jetstream`)?"
        )
    if isinstance(exc, nats.errors.TimeoutError | asyncio.TimeoutError):
        return BrokerError(f"timed out talking to nats-server at {shown} while {doing}")
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        # JetStream says why in its answer; nats-py's repr of the error leaves it out.
        return BrokerError(redact(
            f"JetStream at {shown} refused {doing}: {exc.description} (code {exc.code}, err_code {exc.err_code})",
            url))
    return BrokerError(redact(f"nats-server at {shown} failed while {doing}: {exc!r}", url))


def refused_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` says nats-server refused the client's credentials."""
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    # During the handshake nats-py raises a plain Error with the server's -ERR text:
    # 'Authorization Violation', 'Authentication Timeout', 'User Authentication Expired'.
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text
