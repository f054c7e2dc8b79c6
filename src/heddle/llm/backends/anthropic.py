"""Anthropic Messages API through the official ``anthropic`` SDK (tiers ``standard`` and ``frontier``).

Sampling parameters are not sent: the API version the SDK speaks (2026-10-21)
rejects ``temperature`` for every model, so a config's ``temperature`` applies to
the local backends only.

The SDK's own retries are off (``max_retries=0``): :class:`Backend.chat` retries
every backend the same way and honours ``retry-after``. SDK exceptions are
translated here.

Structured outputs: the output schema goes as ``output_config: {format: {type:
json_schema, schema}}``, after the SDK's ``transform_schema`` has reshaped it
into the subset the API takes (every object closed with ``additionalProperties:
false``; numeric, length and size bounds and patterns moved into descriptions,
since the API rejects them). Heddle still validates the reply against the full
schema. Models older than the 4.5 generation, and recursive schemas, get the
schema in the prompt only.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from heddle.errors import LLMTimeout
from heddle.llm.backends.base import AttemptFailed, Backend, ChatReply, ChatRequest
from heddle.llm.schema import is_recursive

if TYPE_CHECKING:
    import anthropic


# Models from before structured outputs (generally available from Claude Haiku 4.5,
# Sonnet 4.5 and Opus 4.5 on): Claude 2 and 3, Sonnet 4, Opus 4 and Opus 4.1.
_NO_STRUCTURED_OUTPUT = re.compile(r"^claude-(instant|2|3)|^claude-(opus|sonnet)-4(-[01])?(-\d{8})?$")


class AnthropicBackend(Backend):
    """Claude models via ``POST /v1/messages``.

    Args:
        url: API base URL (``ANTHROPIC_BASE_URL``, default ``https://api.anthropic.com``).
        model: Model id (``HEDDLE_STANDARD_MODEL`` or ``FRONTIER_MODEL``).
        api_key: ``ANTHROPIC_API_KEY``.
    """

    name = "anthropic"
    schema_field = "output_config"

    def __init__(self, url: str, model: str, api_key: str) -> None:
        super().__init__(url, model)
        self._api_key = api_key
        # id(schema) -> (schema, the API's format or None, why not): schemas are built
        # once per worker, so each is transformed once, not per request.
        self._formats: dict[int, tuple[Mapping[str, Any], dict[str, Any] | None, str | None]] = {}
        self._formats_lock = threading.Lock()

    def _format(self, schema: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        with self._formats_lock:
            cached = self._formats.get(id(schema))
            if cached is not None and cached[0] is schema:
                return cached[1], cached[2]
        fmt: dict[str, Any] | None = None
        problem: str | None = None
        if _NO_STRUCTURED_OUTPUT.match(self.model):
            problem = (f"model {self.model} predates structured outputs (Claude Haiku 4.5, Sonnet 4.5, "
                       f"Opus 4.5 and later take them)")
        elif is_recursive(schema):
            problem = "the schema is recursive, and structured outputs take no recursive schemas"
        else:
            import anthropic

            try:
                fmt = {"type": "json_schema", "schema": anthropic.transform_schema(dict(schema))}
            except (ValueError, TypeError, KeyError) as exc:
                problem = f"the schema does not fit structured outputs: {exc}"
        with self._formats_lock:
            if len(self._formats) > 256:  # schemas made per call (complete() in a loop) must not pile up
                self._formats.clear()
            self._formats[id(schema)] = (schema, fmt, problem)
        return fmt, problem

    def native_schema_problem(self, schema: Mapping[str, Any]) -> str | None:
        return super().native_schema_problem(schema) or self._format(schema)[1]

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1/messages"

    def credentials_hint(self) -> str:
        return "ANTHROPIC_API_KEY"

    def _new_client(self) -> anthropic.AsyncAnthropic:
        import anthropic  # imported on first use: it takes about a second

        return anthropic.AsyncAnthropic(api_key=self._api_key, base_url=self.url, max_retries=0)

    async def _close_client(self, client: Any) -> None:
        await client.close()

    async def _attempt(self, request: ChatRequest) -> ChatReply:
        import anthropic

        client: anthropic.AsyncAnthropic = self.client()
        kwargs: dict[str, Any] = {}
        if request.system:
            kwargs["system"] = request.system
        if request.native_schema and request.json_schema is not None:
            fmt, _ = self._format(request.json_schema)
            if fmt is not None:
                kwargs["output_config"] = {"format": fmt}
        try:
            if request.stream is not None:
                events = await client.messages.create(
                    model=self.model,
                    max_tokens=request.max_tokens,
                    messages=request.messages,  # type: ignore[arg-type]
                    timeout=request.timeout_s,
                    stream=True,
                    **kwargs,
                )
                return await self._read_stream(events, request)
            message = await client.messages.create(
                model=self.model,
                max_tokens=request.max_tokens,
                messages=request.messages,  # type: ignore[arg-type]
                timeout=request.timeout_s,
                **kwargs,
            )
        except anthropic.APITimeoutError:
            raise AttemptFailed(
                self.error(f"no reply within timeout_seconds={request.timeout_s:g}", cls=LLMTimeout)
            ) from None
        except anthropic.APIConnectionError as exc:
            raise AttemptFailed(self.error(f"cannot connect: {exc.__cause__ or exc}")) from None
        except anthropic.APIResponseValidationError as exc:
            raise AttemptFailed(
                self.error(f"the response is not a Messages API response: {exc.message}"), retryable=False
            ) from None
        except anthropic.APIStatusError as exc:
            detail = f"{exc.type}: {exc.api_message}" if exc.api_message else exc.message
            raise self.status_error(exc.status_code, detail, exc.response.headers) from None
        except ValueError as exc:  # the SDK lets json.JSONDecodeError through for a broken body
            raise AttemptFailed(
                self.error(f"the response is not JSON (is this the Anthropic API?): {exc}"), retryable=False
            ) from None
        try:
            text = "".join(block.text for block in message.content if block.type == "text")
            usage = message.usage
            return ChatReply(
                text=text,
                model=str(message.model or self.model),
                input_tokens=_prompt_tokens(usage),
                output_tokens=int(usage.output_tokens or 0),
                stop_reason=str(message.stop_reason or ""),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise AttemptFailed(
                self.error(f"unexpected response shape ({type(exc).__name__}: {exc})"), retryable=False
            ) from None

    async def _read_stream(self, events: Any, request: ChatRequest) -> ChatReply:
        """Read a streamed reply's server-sent events; each text delta goes to the request's sink.

        message_start (model, input tokens), content_block_delta (text_delta: the text),
        message_delta (stop reason, output tokens), message_stop (the end); ping and the
        content block start and stop carry nothing needed.
        """
        sink = request.stream
        assert sink is not None
        parts: list[str] = []
        model, input_tokens, output_tokens, stop, done = self.model, 0, 0, "", False
        try:
            async for event in events:
                kind = event.type
                if kind == "content_block_delta" and event.delta.type == "text_delta":
                    parts.append(event.delta.text)
                    await sink.write(event.delta.text)
                elif kind == "message_start":
                    model = str(event.message.model or self.model)
                    input_tokens = _prompt_tokens(event.message.usage)
                    output_tokens = int(event.message.usage.output_tokens or 0)
                elif kind == "message_delta":
                    stop = str(event.delta.stop_reason or stop)
                    output_tokens = int(event.usage.output_tokens or output_tokens)
                    input_tokens = _prompt_tokens(event.usage) or input_tokens
                elif kind == "message_stop":
                    done = True
        except (AttributeError, TypeError) as exc:
            raise AttemptFailed(
                self.error(f"unexpected stream event ({type(exc).__name__}: {exc})"), retryable=False
            ) from None
        if not done:
            raise AttemptFailed(self.error("the stream ended before message_stop"))
        return ChatReply(text="".join(parts), model=model, input_tokens=input_tokens,
                         output_tokens=output_tokens, stop_reason=stop)


def _prompt_tokens(usage: Any) -> int:
    """The prompt's tokens: the Messages API counts those read from or written to its prompt cache
    apart from ``input_tokens`` (a fully cached prompt reports 0 there)."""
    return sum(int(getattr(usage, name, None) or 0)
               for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
