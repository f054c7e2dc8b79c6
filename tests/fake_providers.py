"""Fake model providers: local HTTP servers that speak each provider's real wire protocol.

A :class:`FakeProvider` listens on a free ``127.0.0.1`` port and answers each
request from a script of :class:`Reply` values, in the exact JSON shapes of the
Anthropic Messages API, OpenAI chat completions or Ollama's ``/api/chat``,
including their error bodies. Every request is checked against the protocol
(path, auth header, ``anthropic-version``, ``max_tokens``, model, message
roles, ``stream: false`` for Ollama, the structured-output fields: Anthropic's
``output_config.format`` with only the JSON Schema subset the API takes,
OpenAI's ``response_format`` with a valid ``json_schema.name``, Ollama's
``format``...): a request that breaks it gets a 400 and is recorded in
:attr:`FakeProvider.violations`, which tests assert empty. A provider made with
``refuse_schema=True`` answers any structured-output field with the 400 a
server or model without structured outputs sends.

The server is a few dozen lines of asyncio (HTTP/1.1 with keep-alive) in a
background thread, so a test can hold a request open for seconds, answer with
broken bytes, or see the client hang up.

A request that asks for a stream (``stream: true``) is answered in the provider's
streaming wire format, over chunked transfer encoding, one piece of the reply's
text per event: Anthropic's server-sent events (message_start,
content_block_start, ping, content_block_delta text_delta..., content_block_stop,
message_delta, message_stop), OpenAI's ``data: {chat.completion.chunk}`` events
(a usage chunk when ``stream_options.include_usage``) ending with ``data: [DONE]``,
and Ollama's NDJSON lines ending with ``done: true``. ``Reply.hold`` makes the
fake send the first ``hold_after`` pieces, then wait until the test sets the
event, so a test can see chunks arrive while the provider is still streaming;
``Reply.cut_after`` drops the connection after that many pieces.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

KINDS = ("anthropic", "openai", "ollama")
PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "ollama": "/api/chat"}
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable", 529: "Overloaded"}


@dataclass
class Reply:
    """One scripted answer.

    Attributes:
        text: The model's output text (a 200 in the provider's response shape).
        status: HTTP status; >= 400 sends the provider's error body with ``error``.
        error: Error message for error statuses.
        headers: Extra response headers (``retry-after``).
        delay_s: Seconds to wait before answering (the client may give up first).
        hang: Never answer; wait until the client hangs up.
        raw: Send these bytes as the body instead of JSON.
        input_tokens: Usage reported.
        output_tokens: Usage reported.
        cache_read_tokens: Prompt tokens an Anthropic answer reports as read from its prompt cache.
        cache_write_tokens: Prompt tokens an Anthropic answer reports as written to its prompt cache.
    """

    text: str = ""
    status: int = 200
    error: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    hang: bool = False
    raw: bytes | None = None
    input_tokens: int = 11
    output_tokens: int = 7
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    pieces: list[str] | None = None
    hold: threading.Event | None = None
    hold_after: int = 1
    cut_after: int | None = None

    def split(self) -> list[str]:
        """The pieces a streamed answer sends: ``pieces``, or the text a word at a time."""
        if self.pieces is not None:
            return list(self.pieces)
        return re.findall(r"\s*\S+|\s+$", self.text) or [self.text]


@dataclass
class Seen:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class FakeProvider:
    """A fake provider of one ``kind`` (anthropic, openai, ollama) on a free loopback port.

    Args:
        kind: Which wire protocol to speak.
        api_key: The key the Anthropic fake accepts.
    """

    def __init__(self, kind: str, api_key: str = "test-key", refuse_schema: bool = False) -> None:
        assert kind in KINDS, kind
        self.kind = kind
        self.api_key = api_key
        self.refuse_schema = refuse_schema
        self.refusals = 0
        self.script: collections.deque[Reply] = collections.deque()
        self.requests: list[Seen] = []
        self.violations: list[str] = []
        self.hangups = 0
        #: Pieces of streamed answers sent so far, over all requests.
        self.pieces_sent = 0
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- control ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (what LM_STUDIO_URL / OLLAMA_URL / ANTHROPIC_BASE_URL are set to)."""
        return f"http://127.0.0.1:{self.port}"

    def add(self, *replies: Reply) -> FakeProvider:
        """Append replies to the script."""
        self.script.extend(replies)
        return self

    def reply_json(self, value: Any, **kw: Any) -> Reply:
        """A reply whose text is ``value`` as JSON."""
        return Reply(text=json.dumps(value), **kw)

    def wait_for(self, predicate: Any, timeout_s: float = 20.0, what: str = "the fake provider") -> None:
        """Block until ``predicate(self)`` is true (checked on every request and hang-up)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
                self._changed.wait(left)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def __enter__(self) -> FakeProvider:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def start() -> None:
                self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]

            loop.run_until_complete(start())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-{self.kind}", daemon=True)
        self._thread.start()
        assert ready.wait(10), "fake provider did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)

    # -- HTTP ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await self._read_body(reader, headers)
                keep = await self._request(method, target, headers, body, reader, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    return out
                out += await reader.readexactly(size)
                await reader.readline()
        n = int(headers.get("content-length") or 0)
        return await reader.readexactly(n) if n else b""

    async def _until_hangup(self, reader: asyncio.StreamReader, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: forever); True if the client hung up meanwhile."""
        read = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({read}, timeout=seconds)
        if not done:
            read.cancel()
            return False
        if read.exception() is None and read.result():
            raise ValueError("client pipelined a request while waiting for an answer")
        self.hangups += 1
        self._notify()
        return True

    async def _request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        raw: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(Seen(method, target, headers, body, time.monotonic()))
        self._notify()
        refused = self._refusal(body)
        if refused is not None:
            self.refusals += 1
            await self._send(writer, 400, json.dumps(error_body(self.kind, 400, refused)).encode(), {})
            return True
        problem = self._violation(method, target, headers, body)
        if problem is not None:
            self.violations.append(problem)
            status, payload = problem_status(self.kind, problem)
            await self._send(writer, status, json.dumps(payload).encode(), {})
            return True
        reply = self.script.popleft() if self.script else Reply(status=500, error="the test scripted no more replies")
        if reply.hang:
            await self._until_hangup(reader, None)
            return False
        if reply.delay_s and await self._until_hangup(reader, reply.delay_s):
            return False
        if body.get("stream") is True and reply.status < 400 and reply.raw is None:
            return await self._stream(writer, body, reply)
        if reply.raw is not None:
            data = reply.raw
        elif reply.status >= 400:
            data = json.dumps(error_body(self.kind, reply.status, reply.error)).encode()
        else:
            data = json.dumps(success_body(self.kind, body, reply)).encode()
        await self._send(writer, reply.status, data, reply.headers)
        return True

    async def _send(self, writer: asyncio.StreamWriter, status: int, data: bytes, extra: dict[str, str]) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "content-type: application/json",
                f"content-length: {len(data)}", "connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in extra.items()]
        if self.kind == "anthropic":
            head.append(f"request-id: req_{uuid.uuid4().hex[:16]}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, request: dict[str, Any], reply: Reply) -> bool:
        """Answer in the provider's streaming format, a piece at a time (chunked transfer encoding)."""
        ctype = "application/x-ndjson" if self.kind == "ollama" else "text/event-stream"
        head = ["HTTP/1.1 200 OK", f"content-type: {ctype}", "transfer-encoding: chunked", "connection: keep-alive",
                "cache-control: no-cache"]
        if self.kind == "anthropic":
            head.append(f"request-id: req_{uuid.uuid4().hex[:16]}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

        async def send(data: str) -> None:
            raw = data.encode()
            writer.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            await writer.drain()

        events = stream_events(self.kind, request, reply)
        pieces = reply.split()
        for before, _ in events[0]:
            await send(before)
        for i, piece in enumerate(pieces):
            if reply.cut_after is not None and i == reply.cut_after:
                writer.close()
                return False
            if reply.hold is not None and i == reply.hold_after:
                await asyncio.get_running_loop().run_in_executor(None, reply.hold.wait, 60)
            await send(delta_event(self.kind, request["model"], piece))
            self.pieces_sent += 1
            self._notify()
        for after, _ in events[1]:
            await send(after)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    # -- the protocols ---------------------------------------------------------------

    def _refusal(self, body: Any) -> str | None:
        """The error of a server or model without structured outputs, when the request asks for them."""
        if not self.refuse_schema or not isinstance(body, dict):
            return None
        if self.kind == "anthropic" and "output_config" in body:
            return f"output_config.format: structured outputs are not supported by model {body.get('model')}"
        if self.kind == "openai" and "response_format" in body:
            return "response_format: 'json_schema' is not supported by this model"
        if self.kind == "ollama" and isinstance(body.get("format"), dict):
            return "invalid format: this version of the server takes format 'json' only"
        return None

    def _violation(self, method: str, path: str, headers: dict[str, str], body: Any) -> str | None:
        if method != "POST" or path != PATHS[self.kind]:
            return f"{method} {path}: this fake serves only POST {PATHS[self.kind]}"
        if not isinstance(body, dict):
            return "the request body is not a JSON object"
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "model: required string"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: required non-empty list"
        roles = ("user", "assistant") if self.kind == "anthropic" else ("system", "user", "assistant")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str | list):
                return f"messages[{i}]: needs role in {roles} and content"
        if self.kind == "anthropic":
            return _anthropic_violation(headers, body, self.api_key)
        if self.kind == "openai":
            mt = body.get("max_tokens")
            if mt is not None and (not isinstance(mt, int) or mt < 1):
                return "max_tokens: must be a positive integer"
            rf = body.get("response_format")
            if rf is not None and (
                rf.get("type") != "json_schema" or not isinstance(rf.get("json_schema", {}).get("schema"), dict)
            ):
                return "response_format: expected {type: json_schema, json_schema: {name, schema}}"
            so = body.get("stream_options")
            if so is not None and (body.get("stream") is not True or not isinstance(so, dict)):
                return "stream_options: only allowed with stream: true, as an object"
            if rf is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(rf["json_schema"].get("name"))):
                return "response_format.json_schema.name: must match ^[a-zA-Z0-9_-]{1,64}$"
            return None
        if not isinstance(body.get("stream"), bool):
            return "stream: Ollama streams unless the request says stream: false (say true or false)"
        fmt = body.get("format")
        if fmt is not None and fmt != "json" and not isinstance(fmt, dict):
            return "format: must be 'json' or a JSON schema"
        return None


def _anthropic_violation(headers: dict[str, str], body: dict[str, Any], key: str) -> str | None:
    auth_ok = headers.get("x-api-key") == key or headers.get("authorization") == f"Bearer {key}"
    if not auth_ok:
        return "authentication: x-api-key or Authorization: Bearer must carry the API key"
    version = headers.get("anthropic-version")
    if not version:
        return "anthropic-version: header is required"
    mt = body.get("max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        return "max_tokens: Field required (a positive integer)"
    if body["messages"][0].get("role") != "user":
        return "messages: the first message must use the user role"
    if version >= "2026-10-21":
        for key_ in ("temperature", "top_p", "top_k"):
            if key_ in body:
                return f"{key_}: Extra inputs are not permitted"
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        return "system: must be a string or a list of text blocks"
    if "output_format" in body:
        return "output_format: Extra inputs are not permitted (it moved to output_config.format)"
    if "output_config" in body:
        config = body["output_config"]
        if not isinstance(config, dict) or set(config) - {"format", "effort"}:
            return "output_config: must be an object with format (and effort)"
        fmt = config.get("format")
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            return "output_config.format: expected {type: json_schema, schema: {...}}"
        problem = _structured_output_problem(fmt["schema"], "output_config.format.schema")
        if problem:
            return problem
    return None


# The JSON Schema subset Anthropic's structured outputs take; anything else is a 400.
_ANTHROPIC_KEYWORDS = frozenset({"type", "enum", "const", "anyOf", "allOf", "$ref", "$defs", "definitions",
                                 "properties", "required", "additionalProperties", "items", "minItems",
                                 "description", "title", "default", "format", "pattern", "examples"})


def _structured_output_problem(schema: Any, where: str) -> str | None:
    if not isinstance(schema, dict):
        return f"{where}: must be an object"
    for key, value in schema.items():
        if key not in _ANTHROPIC_KEYWORDS:
            return f"{where}: JSON Schema keyword {key!r} is not supported in structured outputs"
        if key == "minItems" and value not in (0, 1):
            return f"{where}.minItems: only 0 or 1 is supported"
    if schema.get("type") == "object" and schema.get("additionalProperties") is not False:
        return f"{where}: objects must set additionalProperties: false"
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            problem = _structured_output_problem(sub, f"{where}.{key}.{name}")
            if problem:
                return problem
    for key in ("anyOf", "allOf"):
        for i, sub in enumerate(schema.get(key) or []):
            problem = _structured_output_problem(sub, f"{where}.{key}[{i}]")
            if problem:
                return problem
    if "items" in schema:
        return _structured_output_problem(schema["items"], f"{where}.items")
    return None


def problem_status(kind: str, problem: str) -> tuple[int, Any]:
    """The provider's answer to a request that breaks its protocol."""
    status = 401 if problem.startswith("authentication") else 400
    return status, error_body(kind, status, problem)


def error_body(kind: str, status: int, message: str) -> Any:
    """An error body exactly as the provider sends it."""
    if kind == "anthropic":
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 429: "rate_limit_error", 529: "overloaded_error"}
        return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}
    if kind == "openai":
        return {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                          "param": None, "code": None}}
    return {"error": message}


def success_body(kind: str, request: dict[str, Any], reply: Reply) -> Any:
    """A successful chat response exactly as the provider sends it."""
    model = request["model"]
    if kind == "anthropic":
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": reply.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens,
                      "cache_creation_input_tokens": reply.cache_write_tokens,
                      "cache_read_input_tokens": reply.cache_read_tokens},
        }
    if kind == "openai":
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
                      "total_tokens": reply.input_tokens + reply.output_tokens},
        }
    return {
        "model": model,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
        "message": {"role": "assistant", "content": reply.text},
        "done_reason": "stop",
        "done": True,
        "total_duration": 1_000_000,
        "load_duration": 100_000,
        "prompt_eval_count": reply.input_tokens,
        "prompt_eval_duration": 200_000,
        "eval_count": reply.output_tokens,
        "eval_duration": 700_000,
    }


def _sse(event: str | None, data: Any) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"


def delta_event(kind: str, model: str, piece: str) -> str:
    """One piece of streamed text as the provider sends it."""
    if kind == "anthropic":
        return _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": piece}})
    if kind == "openai":
        return _sse(None, {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model, "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                                        "finish_reason": None}]})
    return json.dumps({"model": model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                       "message": {"role": "assistant", "content": piece}, "done": False}) + "\n"


def stream_events(kind: str, request: dict[str, Any], reply: Reply) -> tuple[list[tuple[str, str]],
                                                                          list[tuple[str, str]]]:
    """What a streamed answer sends before and after its text pieces: ([(data, name)], [(data, name)])."""
    model = request["model"]
    if kind == "anthropic":
        start = {"type": "message_start", "message": {
            "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "content": [],
            "model": model, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1,
                      "cache_creation_input_tokens": reply.cache_write_tokens,
                      "cache_read_input_tokens": reply.cache_read_tokens}}}
        before = [(_sse("message_start", start), "message_start"),
                  (_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}}), ""),
                  (_sse("ping", {"type": "ping"}), "ping")]
        after = [(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}), ""),
                 (_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                            "stop_sequence": None},
                                         "usage": {"output_tokens": reply.output_tokens}}), ""),
                 (_sse("message_stop", {"type": "message_stop"}), "")]
        return before, after
    if kind == "openai":
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        before = [(_sse(None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]}), "")]
        after = [(_sse(None, {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": "stop"}]}), "")]
        if (request.get("stream_options") or {}).get("include_usage"):
            after.append((_sse(None, {**base, "choices": [], "usage": {
                "prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
                "total_tokens": reply.input_tokens + reply.output_tokens}}), ""))
        after.append(("data: [DONE]\n\n", ""))
        return before, after
    done = {"model": model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
            "message": {"role": "assistant", "content": ""}, "done_reason": "stop", "done": True,
            "total_duration": 1_000_000, "load_duration": 100_000, "prompt_eval_count": reply.input_tokens,
            "prompt_eval_duration": 200_000, "eval_count": reply.output_tokens, "eval_duration": 700_000}
    return [], [(json.dumps(done) + "\n", "")]


def settings_for(provider: FakeProvider, model: str = "fake-model", **extra: Any) -> tuple[str, Any]:
    """The tier and LLMSettings that point a backend at ``provider``."""
    from heddle.settings import LLMSettings

    if provider.kind == "anthropic":
        return "standard", LLMSettings(
            anthropic_api_key=provider.api_key, anthropic_base_url=provider.url, standard_model=model, **extra
        )
    if provider.kind == "openai":
        return "local", LLMSettings(lm_studio_url=provider.url, lm_studio_model=model, **extra)
    return "local", LLMSettings(ollama_url=provider.url, ollama_model=model, **extra)
