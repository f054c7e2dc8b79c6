"""Anthropic Messages API through the official ``anthropic`` SDK (tiers ``standard`` and ``frontier``).

Sampling parameters are not sent: the API version the SDK speaks (2026-10-21)
rejects ``temperature`` for every model, so a config's ``temperature`` applies to
the local backends only.

The SDK's own retries are off (``max_retries=0``): :class:`Backend.chat` retries
every backend the same way and honours ``retry-after``. SDK exceptions are
translated here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from heddle.errors import LLMTimeout
from heddle.llm.backends.base import AttemptFailed, Backend, ChatReply, ChatRequest

if TYPE_CHECKING:
    import anthropic


class AnthropicBackend(Backend):
    """Claude models via ``POST /v1/messages``.

    Args:
        url: API base URL (``ANTHROPIC_BASE_URL``, default ``https://api.anthropic.com``).
        model: Model id (``HEDDLE_STANDARD_MODEL`` or ``FRONTIER_MODEL``).
        api_key: ``ANTHROPIC_API_KEY``.
    """

    name = "anthropic"

    def __init__(self, url: str, model: str, api_key: str) -> None:
        super().__init__(url, model)
        self._api_key = api_key

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
        try:
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
                input_tokens=int(usage.input_tokens or 0),
                output_tokens=int(usage.output_tokens or 0),
                stop_reason=str(message.stop_reason or ""),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise AttemptFailed(
                self.error(f"unexpected response shape ({type(exc).__name__}: {exc})"), retryable=False
            ) from None
