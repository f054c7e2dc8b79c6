"""Backends that speak JSON over HTTP with httpx: one client per event loop, errors translated here."""

from __future__ import annotations

import abc
import json
from typing import Any

import httpx

from heddle.errors import LLMTimeout
from heddle.llm.backends.base import AttemptFailed, Backend, ChatReply, ChatRequest, error_detail


class HTTPBackend(Backend):
    """A backend that POSTs one JSON body per attempt to :attr:`endpoint`."""

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers={"user-agent": "heddle"}, follow_redirects=False)

    async def _close_client(self, client: Any) -> None:
        await client.aclose()

    @staticmethod
    def chat_messages(request: ChatRequest) -> list[dict[str, str]]:
        """The system prompt as the first message, then the conversation (OpenAI and Ollama style)."""
        system = [{"role": "system", "content": request.system}] if request.system else []
        return [*system, *request.messages]

    def headers(self) -> dict[str, str]:
        """Extra request headers (authentication)."""
        return {}

    @abc.abstractmethod
    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body of the provider's chat request."""

    @abc.abstractmethod
    def parse(self, body: Any) -> ChatReply:
        """Read the provider's chat response; raise KeyError/TypeError/ValueError if it is not one."""

    @abc.abstractmethod
    def parse_line(self, line: str, reply: dict[str, Any]) -> str:
        """Read one line of a streamed response: return its text delta ("" for none).

        Updates ``reply`` (``model``, ``input_tokens``, ``output_tokens``, ``stop_reason``,
        and ``done`` at the end of the stream). Raises KeyError/TypeError/ValueError for a
        line that is not the provider's, :class:`StreamFailed` for an error event.
        """

    async def _attempt(self, request: ChatRequest) -> ChatReply:
        timeout = httpx.Timeout(request.timeout_s, connect=min(10.0, request.timeout_s))
        try:
            client: httpx.AsyncClient = self.client()
            if request.stream is not None:
                return await self._streamed(client, request, timeout)
            response = await client.post(
                self.endpoint, json=self.payload(request), headers=self.headers(), timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise AttemptFailed(
                self.error(f"no reply within timeout_seconds={request.timeout_s:g} ({type(exc).__name__})",
                           cls=LLMTimeout)
            ) from None
        except httpx.TransportError as exc:
            raise AttemptFailed(
                self.error(f"cannot connect: {type(exc).__name__}: {exc or 'connection failed'}; is it running?")
            ) from None
        text = response.text
        body = self._checked_body(response)
        if body is None:
            raise AttemptFailed(
                self.error(f"the response is not JSON (is this a {self.name} server?): {text[:200]!r}"),
                retryable=False,
            )
        try:
            return self.parse(body)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise AttemptFailed(
                self.error(f"unexpected response shape ({type(exc).__name__}: {exc}): {text[:200]!r}"),
                retryable=False,
            ) from None

    def _checked_body(self, response: httpx.Response) -> Any:
        """The response's JSON body (None if it is not JSON); raises for an error status."""
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if response.status_code >= 400:
            raise self.status_error(response.status_code, error_detail(body, response.text), response.headers)
        return body

    async def _streamed(self, client: httpx.AsyncClient, request: ChatRequest, timeout: httpx.Timeout) -> ChatReply:
        """One streamed attempt: each text delta goes to ``request.stream`` as its line arrives."""
        sink = request.stream
        assert sink is not None
        reply: dict[str, Any] = {"model": "", "input_tokens": 0, "output_tokens": 0, "stop_reason": "",
                                 "done": False}
        parts: list[str] = []
        async with client.stream("POST", self.endpoint, json=self.payload(request), headers=self.headers(),
                                 timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                self._checked_body(response)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                try:
                    delta = self.parse_line(line, reply)
                except StreamFailed as exc:
                    raise AttemptFailed(self.error(f"the stream failed: {exc}")) from None
                except (KeyError, IndexError, TypeError, ValueError) as exc:
                    raise AttemptFailed(
                        self.error(f"unexpected stream line ({type(exc).__name__}: {exc}): {line[:200]!r}"),
                        retryable=False,
                    ) from None
                if delta:
                    parts.append(delta)
                    await sink.write(delta)
                if reply["done"]:
                    break
        if not reply["done"]:
            raise AttemptFailed(self.error("the stream ended before the reply was complete"))
        return ChatReply(text="".join(parts), model=str(reply["model"] or self.model),
                         input_tokens=as_int(reply["input_tokens"]), output_tokens=as_int(reply["output_tokens"]),
                         stop_reason=str(reply["stop_reason"] or ""))


class StreamFailed(Exception):
    """Raised by ``parse_line`` for an error the provider sent in the stream."""


def as_int(v: Any) -> int:
    """A token count from a response (missing or null counts as 0)."""
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0
