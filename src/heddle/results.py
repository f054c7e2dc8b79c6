"""Results in Valkey: the one seam around the valkey client, and ``AsyncResult``.

Each task has one hash, ``heddle:result:{id}``, with fields ``state``,
``record`` (a msgpack :class:`~heddle.messages.ResultRecord`, for final and
RETRY states), ``retries`` (retries already scheduled), ``started_at`` and
``worker``. Two Lua scripts keep the state machine atomic:

* ``claim``: a worker about to run a task marks it STARTED, unless a final
  state is stored, in which case it gets that state back and acks without
  running the task again.
* ``store``: write a state and record unless a final one is already there, so a
  late finisher (a worker that was frozen past AckWait) never overwrites the
  result of the worker that finished first, and a revoked task stays revoked.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import valkey.asyncio as valkey_async
import valkey.exceptions as vexc

from heddle import names
from heddle.errors import (
    BackendError,
    BackendUnavailable,
    DecodeError,
    ResultTimeout,
    TaskError,
    TaskRevoked,
)
from heddle.messages import (
    FAILURE,
    PENDING,
    READY_STATES,
    REVOKED,
    SUCCESS,
    ResultRecord,
    encoder,
    record_decoder,
)
from heddle.redact import redact
from heddle.settings import Settings, readable_file, server_endpoint

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.notices import Watch

R = TypeVar("R")

_FINAL = "st == 'SUCCESS' or st == 'FAILURE' or st == 'REVOKED'"
_MAX_CONNECTIONS = 64  # per process and event loop; Valkey allows 10,000 clients by default

# Both scripts take a worker's whole batch (every key in KEYS), so a batch costs
# one command to encode, send and parse instead of one per task.
CLAIM_LUA = f"""
local out = {{}}
for i, key in ipairs(KEYS) do
  local st = redis.call('HGET', key, 'state')
  if {_FINAL} then
    out[i] = {{st, redis.call('HGET', key, 'record') or '', 0}}
  else
    local retries = tonumber(redis.call('HGET', key, 'retries') or '0')
    redis.call('HSET', key, 'state', 'STARTED', 'started_at', ARGV[1], 'worker', ARGV[2])
    redis.call('EXPIRE', key, ARGV[3])
    out[i] = {{st or '', '', retries}}
  end
end
return out
"""

# ARGV: ttl, then state, record, retries ('' = unchanged) for each key.
STORE_LUA = f"""
local out = {{}}
for i, key in ipairs(KEYS) do
  local st = redis.call('HGET', key, 'state')
  if {_FINAL} then
    out[i] = 0
  else
    local a = 2 + (i - 1) * 3
    redis.call('HSET', key, 'state', ARGV[a], 'record', ARGV[a + 1])
    if ARGV[a + 2] ~= '' then
      redis.call('HSET', key, 'retries', ARGV[a + 2])
    end
    redis.call('EXPIRE', key, ARGV[1])
    out[i] = 1
  end
end
return out
"""


# The final records among KEYS, as a flat list of (index, record) pairs: waiting
# handles read many at once without a command each.
FINAL_RECORDS_LUA = f"""
local out = {{}}
for i, key in ipairs(KEYS) do
  local st = redis.call('HGET', key, 'state')
  if {_FINAL} then
    out[#out + 1] = i
    out[#out + 1] = redis.call('HGET', key, 'record') or ''
  end
end
return out
"""


class Claim(msgspec.Struct, frozen=True):
    """What ``claim`` found: the previous state, a final record if any, retries so far."""

    previous_state: str
    final_record: bytes
    retries: int


class StoreRequest(msgspec.Struct, frozen=True):
    """One state write for :meth:`ResultBackend.store_many`."""

    task_id: str
    state: str
    record: bytes
    retries: int | None = None


def _translate(exc: BaseException, url: str, doing: str) -> BackendError:
    """Map a valkey exception to a Heddle error that names the server and the fix, and no secret."""
    shown = redact(url)
    if isinstance(exc, vexc.AuthenticationError | vexc.AuthorizationError | vexc.AuthenticationWrongNumberOfArgsError):
        said = redact(str(exc), url).rstrip(".")
        return BackendError(
            f"authentication failed at valkey-server {shown} while {doing}: {said}. Fix the user and "
            f"password (user:password@host, or :password@host for requirepass) in VALKEY_URL, or the "
            f"server's requirepass or ACL users."
        )
    if isinstance(exc, vexc.ConnectionError | vexc.TimeoutError | OSError):
        return BackendUnavailable(
            redact(
                f"cannot reach valkey-server at {shown} while {doing}: {exc}. "
                f"Start it (`heddle dev` runs an embedded one) or set VALKEY_URL.",
                url,
            )
        )
    return BackendError(redact(f"valkey-server at {shown} failed while {doing}: {exc!r}", url))


class ResultBackend:
    """Async Valkey access for task states and results.

    Args:
        settings: Provides ``valkey_url`` and ``result_ttl_s``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: valkey_async.Valkey | None = None
        self._ttl = str(int(settings.result_ttl_s))
        # Lua scripts by name: source and SHA once loaded. Other modules add
        # theirs (rate limits) through register_script, so Valkey stays behind this seam.
        self._scripts: dict[str, tuple[str, str]] = {
            "claim": (CLAIM_LUA, ""),
            "store": (STORE_LUA, ""),
            "final_records": (FINAL_RECORDS_LUA, ""),
        }

    @property
    def url(self) -> str:
        return self.settings.valkey_url

    async def connect(self) -> None:
        """Connect and load the Lua scripts; raise BackendUnavailable if unreachable.

        Credentials come from ``VALKEY_URL`` or ``VALKEY_USERNAME``/``VALKEY_PASSWORD``;
        TLS from a ``valkeys://`` (``rediss://``) URL, with ``VALKEY_TLS_CA`` and, for
        mutual TLS, ``VALKEY_TLS_CERT``/``VALKEY_TLS_KEY``. A refused login or a failed
        TLS handshake says which of them to fix, and never what they hold.

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
        # A bounded pool: a burst of concurrent result reads waits for a free connection
        # (up to the socket timeout) instead of opening one connection per waiter.
        pool = valkey_async.BlockingConnectionPool.from_url(
            self.url,
            max_connections=_MAX_CONNECTIONS,
            timeout=max(10.0, self.settings.connect_timeout_s),
            socket_connect_timeout=self.settings.connect_timeout_s,
            socket_timeout=max(10.0, self.settings.connect_timeout_s),
            health_check_interval=10,
            **options,
        )
        self.client = valkey_async.Valkey.from_pool(pool)
        try:
            await self.client.ping()
            await self._load_scripts()
        except Exception as exc:
            where = server_endpoint(self.url)
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
            if tls and any(w in low for w in ("ssl", "certificate", "handshake", "closed by server")):
                raise BackendError(
                    f"TLS failed for {where} while connecting ({told}). Fix: {self.settings.tls_fix('valkey', told)}."
                ) from exc
            if tls and "timeout" in low:
                raise BackendUnavailable(
                    f"cannot reach valkey-server at {redact(self.url)} over TLS while connecting ({told}): is it "
                    f"reachable, and does it speak TLS on this port (its tls-port)? For plain text use valkey://."
                ) from exc
            raise _translate(exc, self.url, "connecting") from exc

    def register_script(self, name: str, lua: str) -> None:
        """Make a Lua script callable with :meth:`run_script_many` (loaded lazily)."""
        if name not in self._scripts:
            self._scripts[name] = (lua, "")

    async def _load_scripts(self) -> None:
        assert self.client is not None
        for name, (lua, _) in list(self._scripts.items()):
            self._scripts[name] = (lua, await self.client.script_load(lua))

    async def close(self) -> None:
        """Close the connection pool."""
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    def _c(self) -> valkey_async.Valkey:
        if self.client is None:
            raise BackendError("result backend is not connected; call connect() first")
        return self.client

    async def run_script_many(
        self,
        name: str,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
        then: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        """Run one script for many (keys, args) in a single pipelined round trip.

        ``then(pipeline)`` may queue more commands into the same round trip; their
        replies follow the scripts' in the returned list.
        """
        client = self._c()
        for attempt in range(2):
            sha = self._scripts[name][1]
            if not sha:
                try:
                    await self._load_scripts()
                except Exception as exc:
                    raise _translate(exc, self.url, "loading scripts") from exc
                sha = self._scripts[name][1]
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            if then is not None:
                then(pipe)
            try:
                out = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                raise _translate(exc, self.url, f"running {name}") from exc
            if attempt == 0 and any(isinstance(r, vexc.NoScriptError) for r in out):
                # A restarted valkey-server forgets loaded scripts.
                self._scripts = {n: (lua, "") for n, (lua, _) in self._scripts.items()}
                continue
            for r in out:
                if isinstance(r, Exception):
                    raise _translate(r, self.url, f"running {name}")
            return list(out)
        raise BackendError("unreachable")  # pragma: no cover

    async def claim_many(self, task_ids: Sequence[str], worker: str) -> list[Claim]:
        """Mark tasks STARTED unless final; one round trip for the batch."""
        now = f"{time.time():.6f}"
        keys = [names.result_key(t) for t in task_ids]
        (out,) = await self.run_script_many("claim", [(keys, (now, worker, self._ttl))])
        return [Claim(r[0].decode() if r[0] else "", bytes(r[1]), int(r[2])) for r in out]

    async def store_many(self, requests: Sequence[StoreRequest]) -> list[bool]:
        """Write states unless a final one is stored; True where the write happened."""
        args: list[Any] = [self._ttl]
        for r in requests:
            args += (r.state, r.record, "" if r.retries is None else str(r.retries))
        keys = [names.result_key(r.task_id) for r in requests]
        # A final state takes the task out of the audit (heddle.audit), in the same round trip.
        done = [r.task_id for r in requests if r.state in READY_STATES]

        def unaudit(pipe: Any) -> None:
            if done:
                pipe.zrem(names.SUBMITTED_KEY, *done)

        out = (await self.run_script_many("store", [(keys, args)], unaudit))[0]
        return [bool(x) for x in out]

    async def record_submitted(self, entries: Sequence[tuple[str, float]]) -> None:
        """Add sent task ids to the audit (the earliest send time of an id is kept)."""
        if not entries:
            return
        try:
            await self._c().zadd(names.SUBMITTED_KEY, {tid: at for tid, at in entries}, nx=True)
        except Exception as exc:
            raise _translate(exc, self.url, "recording sent tasks") from exc

    async def forget_submitted(self, task_ids: Sequence[str]) -> None:
        """Take tasks out of the audit."""
        try:
            await self._c().zrem(names.SUBMITTED_KEY, *task_ids)
        except Exception as exc:
            raise _translate(exc, self.url, "updating the audit") from exc

    async def drop_submitted_before(self, before: float) -> None:
        """Forget audit entries sent before ``before`` (epoch seconds)."""
        try:
            await self._c().zremrangebyscore(names.SUBMITTED_KEY, "-inf", f"({before}")
        except Exception as exc:
            raise _translate(exc, self.url, "trimming the audit") from exc

    async def submitted_before(self, before: float, limit: int) -> tuple[int, list[tuple[str, float]]]:
        """How many audit entries were sent before ``before``, and the oldest ``limit`` of them."""
        try:
            pipe = self._c().pipeline(transaction=False)
            pipe.zcount(names.SUBMITTED_KEY, "-inf", f"({before}")
            pipe.zrangebyscore(names.SUBMITTED_KEY, "-inf", f"({before}", start=0, num=limit, withscores=True)
            total, rows = await pipe.execute()
        except Exception as exc:
            raise _translate(exc, self.url, "reading the audit") from exc
        return int(total), [(tid.decode(), float(at)) for tid, at in rows]

    async def progress_many(self, task_ids: Sequence[str]) -> list[tuple[str, str, float]]:
        """``(state, worker, started_at)`` of each task; PENDING when nothing is stored."""
        if not task_ids:
            return []
        try:
            pipe = self._c().pipeline(transaction=False)
            for tid in task_ids:
                pipe.hmget(names.result_key(tid), ["state", "worker", "started_at"])
            rows = await pipe.execute()
        except Exception as exc:
            raise _translate(exc, self.url, "reading task states") from exc
        return [
            (st.decode() if st else PENDING, w.decode() if w else "", float(at) if at else 0.0)
            for st, w, at in rows
        ]

    async def final_records(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored records of the tasks among ``task_ids`` that reached a final state."""
        if not task_ids:
            return {}
        keys = [names.result_key(t) for t in task_ids]
        (out,) = await self.run_script_many("final_records", [(keys, ())])
        return {task_ids[int(out[i]) - 1]: bytes(out[i + 1]) for i in range(0, len(out), 2)}

    async def store(self, request: StoreRequest) -> bool:
        """Write one state unless a final one is stored."""
        return (await self.store_many([request]))[0]

    async def read(self, task_id: str) -> tuple[str, ResultRecord | None]:
        """Return ``(state, record)``; state PENDING and no record when nothing is stored."""
        try:
            pending: Any = self._c().hmget(names.result_key(task_id), ["state", "record"])
            state, record = await pending
        except Exception as exc:
            raise _translate(exc, self.url, f"reading result {task_id}") from exc
        if state is None:
            return PENDING, None
        rec = decode_record(record) if record else None
        return state.decode(), rec

    async def forget(self, task_id: str) -> None:
        """Delete a task's stored state (before a dead letter is replayed)."""
        try:
            await self._c().delete(names.result_key(task_id))
        except Exception as exc:
            raise _translate(exc, self.url, f"deleting result {task_id}") from exc

    async def set_once(self, key: str, value: str, ttl_s: float) -> bool:
        """SET NX with a TTL: True if this call set it."""
        try:
            return bool(await self._c().set(key, value, nx=True, ex=max(1, int(ttl_s))))
        except Exception as exc:
            raise _translate(exc, self.url, f"setting {key}") from exc

    async def keep_payload(self, data: bytes) -> str:
        """Keep a dead letter's payload (for :attr:`Broker.spill`) as long as dead letters live."""
        key = names.DLQ_PAYLOAD_KEY_PREFIX + hashlib.sha256(data).hexdigest()
        try:
            await self._c().set(key, data, ex=max(1, int(self.settings.dlq_max_age_s)))
        except Exception as exc:
            raise _translate(exc, self.url, "keeping a dead letter's payload") from exc
        return key

    async def get_bytes(self, key: str) -> bytes | None:
        """GET a binary value."""
        try:
            raw = await self._c().get(key)
        except Exception as exc:
            raise _translate(exc, self.url, f"reading {key}") from exc
        return bytes(raw) if raw is not None else None

    async def get_text(self, key: str) -> str | None:
        """GET a string value."""
        try:
            raw = await self._c().get(key)
        except Exception as exc:
            raise _translate(exc, self.url, f"reading {key}") from exc
        return raw.decode() if raw is not None else None

    async def ping(self) -> None:
        """Round trip to the server."""
        try:
            await self._c().ping()
        except Exception as exc:
            raise _translate(exc, self.url, "pinging") from exc


def decode_record(data: bytes) -> ResultRecord:
    """Decode a stored or notified result record."""
    try:
        return record_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"stored result record is not valid: {exc}") from exc


def encode_record(record: ResultRecord) -> bytes:
    """Encode a result record (results must be msgpack-encodable)."""
    return encoder.encode(record)


class AsyncResult(Generic[R]):
    """A handle on a task's state and result, like Celery's ``AsyncResult``.

    Sync code calls :meth:`get`, :meth:`revoke` and the properties; async code
    awaits :meth:`aget`, :meth:`arevoke` and :meth:`astate`.

    Args:
        task_id: The task id.
        app: The app whose connections are used.
        task_name: Name of the task, when known.

    Raises:
        TaskIdError: ``task_id`` cannot be a subject token (``>``, ``*``, whitespace...).
    """

    def __init__(self, task_id: str, app: Heddle, task_name: str = "") -> None:
        # The id becomes a subject token: ">" would subscribe to every task's result.
        self.id = names.check_task_id(task_id)
        self.app = app
        self.task_name = task_name
        # Set by apply_async from async code: the publish runs as a task on the
        # caller's loop, and waiting on the result first waits for the publish.
        self._sent: Any = None
        # The result-notice watch made *before* the task was published, on the loop
        # that published it (heddle.notices): no notice can be missed.
        self._watch: Watch | None = None
        self._loop: Any = None
        self._record: ResultRecord | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.task_name or 'task'}[{self.id}]>"

    @property
    def final_record(self) -> ResultRecord | None:
        """The final record, once a wait (``aget``/``get``) or a read found it; else None."""
        return self._record

    # -- async API -----------------------------------------------------------------

    async def sent(self) -> None:
        """Wait until the task message is stored by JetStream (raises if publishing failed)."""
        if self._sent is not None:
            await self._sent

    async def _fetch(self) -> tuple[str, ResultRecord | None]:
        if self._record is not None:
            return self._record.state, self._record
        conns = await self.app._connections()
        state, record = await conns.backend.read(self.id)
        if record is not None and state in READY_STATES:
            self._record = record
        return state, record

    async def astate(self) -> str:
        """The task's current state: PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        return (await self._fetch())[0]

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Wait for the task's result without polling.

        Args:
            timeout: Seconds to wait; None waits forever.
            propagate: Raise :class:`TaskError` / :class:`TaskRevoked` for failed or
                revoked tasks (otherwise return the error object).

        Raises:
            ResultTimeout: The result did not arrive in time.
            TaskError: The task raised (remote type, message and traceback attached).
            TaskRevoked: The task was revoked.
        """
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        await self.sent()
        record = await self._wait(asyncio.get_running_loop(), deadline, timeout)
        return self._outcome(record, propagate)

    async def _wait(self, loop: Any, deadline: float | None, timeout: float | None) -> ResultRecord:
        if self._record is not None:
            return self._record
        conns = await self.app._connections()
        watch = self._watch if self._loop is loop else None
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        record = await conns.watches.wait(self.id, watch, remaining)
        if record is None:
            state = PENDING
            with contextlib.suppress(BackendError):
                state = (await conns.backend.read(self.id))[0]
            raise ResultTimeout(
                f"no result for task {self.id} within {timeout}s (state {state}); "
                f"is a worker running for it (`heddle-worker -A yourmodule`)?"
            )
        self._record = record
        return record

    def _outcome(self, record: ResultRecord, propagate: bool) -> Any:
        if record.state == SUCCESS:
            return record.result
        err = self._error(record)
        if propagate:
            raise err
        return err

    def _error(self, record: ResultRecord) -> Exception:
        if record.state == REVOKED:
            return TaskRevoked(f"task {self.id} was revoked")
        info = record.error
        if info is None:
            return TaskError(self.id, "heddle.UnknownError", f"task ended in {record.state}")
        return TaskError(self.id, info.type, info.message, info.traceback)

    async def arevoke(self) -> None:
        """Revoke: a pending or delayed task never runs; a running one is cancelled."""
        await self.app._revoke(self.id, self.task_name)

    # -- sync API ------------------------------------------------------------------

    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Block until the result is ready and return it (see :meth:`aget`)."""
        self.app._refuse_blocking_in_loop("result.get()", "await result.aget()")
        return self.app._portal.call(self.aget(timeout, propagate), self._portal_timeout(timeout))

    def _portal_timeout(self, timeout: float | None) -> float | None:
        return None if timeout is None else timeout + 30.0

    def revoke(self) -> None:
        """Revoke the task (see :meth:`arevoke`)."""
        self.app._portal.call(self.arevoke(), 30.0)

    @property
    def state(self) -> str:
        """Current state, read from Valkey."""
        return self.app._portal.call(self.astate(), 30.0)

    status = state

    def ready(self) -> bool:
        """True if the task has finished (SUCCESS, FAILURE or REVOKED)."""
        return self.state in READY_STATES

    def successful(self) -> bool:
        """True if the task finished with SUCCESS."""
        return self.state == SUCCESS

    def failed(self) -> bool:
        """True if the task finished with FAILURE."""
        return self.state == FAILURE

    @property
    def record(self) -> ResultRecord | None:
        """The stored result record (state, result, error, timings, metadata) or None."""
        return self.app._portal.call(self._fetch(), 30.0)[1]

    @property
    def result(self) -> Any:
        """The return value if SUCCESS, the error if FAILURE/REVOKED, else None."""
        state, record = self.app._portal.call(self._fetch(), 30.0)
        if record is None or state not in READY_STATES:
            return None
        return self._outcome(record, propagate=False)

    @property
    def traceback(self) -> str | None:
        """The remote traceback text of a failed task, else None."""
        record = self.record
        if record is None or record.error is None:
            return None
        return record.error.traceback
