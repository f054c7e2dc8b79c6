"""Results in Valkey: the one seam around the valkey client (only this module imports it).

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

valkey exceptions are translated to :mod:`heddle.errors` here and nowhere else.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import valkey.asyncio as valkey_async
import valkey.exceptions as vexc

from heddle import names
from heddle.errors import BackendError, BackendUnavailable, DecodeError
from heddle.messages import PENDING, READY_STATES, ResultRecord, encoder, record_decoder
from heddle.redact import redact
from heddle.settings import Settings, dev_session_note, readable_file, server_endpoint, tls_failure

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
                f"Start it (`heddle dev` runs an embedded one) or set VALKEY_URL. "
                f"{dev_session_note(url, 'VALKEY_URL')}".rstrip(),
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
            if tls and tls_failure(told):
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

    async def set_fields(self, key: str, fields: dict[str, str]) -> None:
        """HSET several fields of a hash (a schedule's last run, say)."""
        try:
            await self._c().hset(key, mapping=fields)  # type: ignore[misc]
        except Exception as exc:
            raise _translate(exc, self.url, f"writing {key}") from exc

    async def get_fields_many(self, keys: Sequence[str]) -> list[dict[str, str]]:
        """HGETALL of each key, pipelined; a missing key gives an empty dict."""
        if not keys:
            return []
        try:
            pipe = self._c().pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            rows = await pipe.execute()
        except Exception as exc:
            raise _translate(exc, self.url, f"reading {len(keys)} hashes") from exc
        return [{_text(k): _text(v) for k, v in (row or {}).items()} for row in rows]

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
