"""LM Studio, llama.cpp's server and other OpenAI-compatible servers: ``POST /v1/chat/completions``."""

from __future__ import annotations

import json
import re
from typing import Any

from heddle.llm.backends.base import ChatReply, ChatRequest
from heddle.llm.backends.http import HTTPBackend, StreamFailed, as_int


def _schema_name(name: str) -> str:
    """OpenAI's ``json_schema.name`` rule: 1 to 64 of letters, digits, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "output"


class OpenAICompatBackend(HTTPBackend):
    """OpenAI chat completions, as LM Studio (``LM_STUDIO_URL``) and the embedded model serve them.

    The output schema is sent as ``response_format`` (``json_schema``), which LM
    Studio and llama.cpp enforce by constrained decoding.

    Args:
        url: Server URL, with or without the ``/v1`` suffix (``http://localhost:1234``).
        model: Model id (``LM_STUDIO_MODEL``).
        api_key: Sent as a bearer token when given.
    """

    name = "lmstudio"
    schema_field = "response_format"

    def __init__(self, url: str, model: str, api_key: str | None = None) -> None:
        super().__init__(url, model)
        self.api_key = api_key

    @property
    def endpoint(self) -> str:
        base = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        return f"{base}/v1/chat/completions"

    def credentials_hint(self) -> str:
        return "LM_STUDIO_URL must point at a server that needs no API key"

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.chat_messages(request),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": request.stream is not None,
        }
        if request.stream is not None:  # usage comes in a last chunk of its own, before [DONE]
            body["stream_options"] = {"include_usage": True}
        if request.json_schema is not None and request.native_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": _schema_name(request.schema_name), "strict": True,
                                "schema": request.json_schema},
            }
        return body

    def parse(self, body: Any) -> ChatReply:
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        return ChatReply(
            text=choice["message"].get("content") or "",
            model=str(body.get("model") or self.model),
            input_tokens=as_int(usage.get("prompt_tokens")),
            output_tokens=as_int(usage.get("completion_tokens")),
            stop_reason=str(choice.get("finish_reason") or ""),
        )

    def parse_line(self, line: str, reply: dict[str, Any]) -> str:
        # Server-sent events: "data: {chat.completion.chunk}" lines, then "data: [DONE]".
        if not line.startswith("data:"):
            return ""  # comments (": keep-alive"), event names, ids
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            reply["done"] = True
            return ""
        event = json.loads(data)
        if event.get("error"):
            err = event["error"]
            raise StreamFailed(str(err.get("message") if isinstance(err, dict) else err))
        reply["model"] = event.get("model") or reply["model"]
        usage = event.get("usage")
        if usage:
            reply["input_tokens"] = as_int(usage.get("prompt_tokens"))
            reply["output_tokens"] = as_int(usage.get("completion_tokens"))
        text = ""
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                reply["stop_reason"] = choice["finish_reason"]
            text += (choice.get("delta") or {}).get("content") or ""
        return text
