"""What every model backend shares: the request and reply shapes, timeouts and retries.

A backend sends one chat request per attempt (``_attempt``); :meth:`Backend.chat`
wraps attempts in a hard per-attempt time limit and retries 429s, 5xx,
connection errors and timeouts, waiting what the provider's ``retry-after``
header asks for (or an exponential backoff with jitter when it says nothing).
Provider and transport exceptions are translated to
:class:`~heddle.errors.LLMBackendError` here and in the adapters, never later.

Cancelling the calling task cancels the HTTP request in flight: nothing here
catches ``CancelledError``, and httpx closes the connection it was using.

Structured output: a request with a ``json_schema`` carries it in the
provider's own field (Anthropic ``output_config.format``, Ollama ``format``,
OpenAI-compatible ``response_format``) unless the backend says the provider
or model cannot take it (:meth:`Backend.native_schema_problem`), or the
provider refuses it with a 400 that names the field; then the backend falls
back, for good, to the schema in the prompt alone, and logs why once.

Streaming: a request with a ``stream`` sink asks the provider for a streamed
response (Anthropic ``stream: true`` server-sent events, Ollama's NDJSON lines,
OpenAI-compatible ``data:`` events) and hands each text delta to the sink as it
arrives; every attempt begins a reply on the sink first, so a retried attempt's
text is told apart from the one it replaces. The reply returned is the same as
without streaming.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import email.utils
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from heddle.context import task_context
from heddle.errors import LLMBackendError, LLMTimeout
from heddle.redact import redact

log = logging.getLogger("heddle.llm")

# Statuses worth another attempt: timeouts, conflicts, rate limits, server errors
# and Anthropic's 529 "overloaded".
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# The provider says: too many requests, or overloaded (Anthropic's 529).
RATE_LIMIT_STATUSES = frozenset({429, 529})


def _note_rate_limited(wait_s: float) -> None:
    """Add a provider's rate-limit wait to the running task's metadata (``rate_limited_s``).

    A worker that charged the task to model-token buckets empties them for as long
    when it settles the task (heddle.ratelimit), so routers hold back its peers too.
    """
    ctx = task_context()
    if ctx is not None:
        ctx.meta["rate_limited_s"] = round(float(ctx.meta.get("rate_limited_s", 0.0)) + wait_s, 3)
# A provider asking for a longer wait than this gets an error instead: the task
# should fail (and be retried later by whoever sent it) rather than hold a slot.
MAX_RETRY_AFTER_S = 120.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


class TextSink(Protocol):
    """Where a streamed reply's text goes as it arrives (:class:`heddle.chunks.ChunkWriter`)."""

    def begin(self) -> None:
        """A new reply (an attempt) starts."""

    async def write(self, text: str) -> None:
        """One piece of the reply's text, in order."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to run.

    Attributes:
        messages: ``{"role": "user" | "assistant", "content": str}`` in order.
        system: System prompt.
        max_tokens: Most tokens to generate.
        temperature: Sampling temperature.
        json_schema: Output schema; sent in the provider's own structured-output field
            when ``native_schema`` is true and the provider and model can take it.
        timeout_s: Time limit of one attempt.
        retries: Further attempts after a retryable failure.
        schema_name: Name of the schema where the provider wants one (OpenAI's
            ``json_schema.name``): letters, digits, ``_`` and ``-``.
        native_schema: Whether to send ``json_schema`` in the provider's field
            (False: it is only in the prompt).
        stream: Ask for a streamed response and hand its text to this sink as it arrives.
    """

    messages: list[dict[str, str]]
    system: str = ""
    max_tokens: int = 1024
    temperature: float = 0.0
    json_schema: Mapping[str, Any] | None = None
    timeout_s: float = 120.0
    retries: int = 2
    schema_name: str = "output"
    native_schema: bool = True
    stream: TextSink | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ChatReply:
    """What the model answered, with usage.

    Attributes:
        text: The reply text.
        model: Model id the provider reports (or the one requested).
        input_tokens: Prompt tokens billed.
        output_tokens: Generated tokens billed.
        latency_s: Wall time of the successful attempt.
        attempts: Attempts made, including the successful one.
        stop_reason: Why generation stopped, as the provider says it.
    """

    text: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    stop_reason: str = ""


@dataclass
class AttemptFailed(Exception):
    """Raised by ``_attempt`` for a failure that may be retried."""

    error: LLMBackendError
    retry_after_s: float | None = None
    retryable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds a provider asks us to wait: ``retry-after-ms``, ``retry-after`` (seconds or HTTP date)."""
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Backend(abc.ABC):
    """A model provider endpoint for one tier.

    Args:
        url: Base URL of the provider.
        model: Model id sent with every request.
    """

    #: Backend name used in errors, metadata and events.
    name: str = ""
    #: The request field that carries an output schema (named in messages; a 400
    #: that names it means the provider refuses the schema there).
    schema_field: str = ""

    def __init__(self, url: str, model: str) -> None:
        self.url = url.rstrip("/")
        self.model = model
        # HTTP clients hold connection pools bound to the loop they were first used
        # on; a worker has one loop, but `complete()` may be called from several.
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}
        #: Why output schemas go in the prompt only from now on (the provider refused one), or "".
        self.native_refused = ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def describe(self) -> str:
        """``lmstudio backend at http://… (model qwen3-8b)``: the words every error starts with."""
        return f"{self.name} backend at {redact(self.endpoint)} (model {self.model})"

    @property
    def endpoint(self) -> str:
        """The URL requests go to."""
        return self.url

    def error(
        self, message: str, status: int | None = None, cls: type[LLMBackendError] = LLMBackendError
    ) -> LLMBackendError:
        """An error that names this backend, its URL and model (no credential: a provider may echo the key)."""
        return cls(
            redact(f"{self.describe()}: {message}", self.url),
            backend=self.name,
            url=redact(self.endpoint),
            model=self.model,
            status=status,
        )

    def status_error(self, status: int, detail: str, headers: Mapping[str, str]) -> AttemptFailed:
        """Classify an HTTP error status from the provider."""
        hint = ""
        if status in (401, 403):
            hint = f"; check the credentials ({self.credentials_hint()})"
        elif status == 404:
            hint = f"; check the URL and that model {self.model!r} exists there"
        err = self.error(f"HTTP {status}: {detail}{hint}", status)
        return AttemptFailed(err, retry_after_s(headers), retryable=status in RETRY_STATUSES)

    def credentials_hint(self) -> str:
        """Which setting holds this backend's credentials."""
        return "no credentials are sent"

    def native_schema_problem(self, schema: Mapping[str, Any]) -> str | None:
        """Why this provider or model cannot take ``schema`` in its own field, or None if it can."""
        return self.native_refused or None

    @abc.abstractmethod
    async def _attempt(self, request: ChatRequest) -> ChatReply:
        """Send the request once; raise :class:`AttemptFailed` on failure."""

    @abc.abstractmethod
    def _new_client(self) -> Any:
        """A new HTTP client (or SDK client) for the running loop."""

    @abc.abstractmethod
    async def _close_client(self, client: Any) -> None:
        """Close a client made by :meth:`_new_client`."""

    def client(self) -> Any:
        """This backend's client on the running loop, made on first use."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            client = self._clients[loop] = self._new_client()
        return client

    async def aclose(self) -> None:
        """Close the client of the running loop."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await self._close_client(client)

    async def chat(self, request: ChatRequest) -> ChatReply:
        """Run the request with the per-attempt time limit and retries.

        The output schema goes in the provider's own field when it can take it; a
        provider that refuses it there (HTTP 400 naming the field) gets the request
        again at once without it, and so does every later request to this backend.

        Raises:
            LLMTimeout: Every attempt ran past ``request.timeout_s``.
            LLMBackendError: A non-retryable failure, or retries ran out.
        """
        native = (
            request.json_schema is not None
            and request.native_schema
            and self.native_schema_problem(request.json_schema) is None
        )
        if native != request.native_schema:
            request = dataclasses.replace(request, native_schema=native)
        try:
            return await self._chat(request)
        except LLMBackendError as exc:
            detail = str(exc).partition("HTTP 400:")[2]  # the provider's words, not our URL or model
            if not (native and exc.status == 400 and self.schema_field and self.schema_field in detail):
                raise
            self.native_refused = f"the provider refused the schema in {self.schema_field} ({exc})"
            log.warning("%s; output schemas go in the prompt only from now on", self.native_refused)
            return await self._chat(dataclasses.replace(request, native_schema=False))

    async def _chat(self, request: ChatRequest) -> ChatReply:
        attempts = request.retries + 1
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            if request.stream is not None:
                request.stream.begin()
            try:
                async with asyncio.timeout(request.timeout_s):
                    reply = await self._attempt(request)
            except TimeoutError:
                failure = AttemptFailed(
                    self.error(f"no reply within timeout_seconds={request.timeout_s:g}", cls=LLMTimeout)
                )
            except AttemptFailed as exc:
                failure = exc
            else:
                return ChatReply(
                    text=reply.text,
                    model=reply.model or self.model,
                    input_tokens=reply.input_tokens,
                    output_tokens=reply.output_tokens,
                    latency_s=time.monotonic() - started,
                    attempts=attempt,
                    stop_reason=reply.stop_reason,
                )
            err = failure.error
            if not failure.retryable:
                raise err
            if attempt == attempts:
                err.args = (f"{err.args[0]} (gave up after {attempts} attempt(s))",)
                raise err
            wait = failure.retry_after_s
            if wait is None:
                wait = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
                wait = wait / 2 + random.uniform(0, wait / 2)
            elif wait > MAX_RETRY_AFTER_S:
                err.args = (f"{err.args[0]} (the provider asks to retry after {wait:.0f}s; not waiting that long)",)
                raise err
            log.warning("%s; attempt %d of %d, retrying in %.2fs", err, attempt, attempts, wait)
            if getattr(err, "status", None) in RATE_LIMIT_STATUSES:
                _note_rate_limited(wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def error_detail(body: Any, fallback: str) -> str:
    """The provider's error message from a JSON error body of any of the supported shapes."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            kind = err.get("type")
            return f"{kind}: {err['message']}" if isinstance(kind, str) else err["message"]
        if isinstance(err, str):
            return err
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return fallback[:300] or "no error message"
