"""Ollama: ``POST /api/chat``, whole (``stream: false``) or streamed as NDJSON lines (``stream: true``)."""

from __future__ import annotations

import json
from typing import Any

from heddle.llm.backends.base import ChatReply, ChatRequest
from heddle.llm.backends.http import HTTPBackend, StreamFailed, as_int


class OllamaBackend(HTTPBackend):
    """Ollama's native chat API (``OLLAMA_URL``, ``OLLAMA_MODEL``).

    The output schema is sent as ``format`` (a JSON Schema, Ollama 0.5 and
    later), which Ollama enforces by constrained decoding.
    """

    name = "ollama"
    schema_field = "format"

    @property
    def endpoint(self) -> str:
        return f"{self.url}/api/chat"

    def status_error(self, status: int, detail: str, headers: Any) -> Any:
        failed = super().status_error(status, detail, headers)
        if status == 404:
            failed.error.args = (f"{failed.error.args[0]} (run `ollama pull {self.model}`)",)
        return failed

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.chat_messages(request),
            "stream": request.stream is not None,
            "options": {"temperature": request.temperature, "num_predict": request.max_tokens},
        }
        if request.json_schema is not None and request.native_schema:
            body["format"] = dict(request.json_schema)
        return body

    def parse(self, body: Any) -> ChatReply:
        return ChatReply(
            text=body["message"].get("content") or "",
            model=str(body.get("model") or self.model),
            input_tokens=as_int(body.get("prompt_eval_count")),
            output_tokens=as_int(body.get("eval_count")),
            stop_reason=str(body.get("done_reason") or ""),
        )

    def parse_line(self, line: str, reply: dict[str, Any]) -> str:
        # One JSON object a line: {"message": {"content": delta}, "done": false}, ..., then
        # {"done": true, "done_reason", "prompt_eval_count", "eval_count"}; {"error": ...} on failure.
        event = json.loads(line)
        if "error" in event:
            raise StreamFailed(str(event["error"]))
        reply["model"] = event.get("model") or reply["model"]
        if event.get("done"):
            reply.update(done=True, stop_reason=event.get("done_reason") or "",
                         input_tokens=as_int(event.get("prompt_eval_count")),
                         output_tokens=as_int(event.get("eval_count")))
        message = event.get("message") or {}
        return str(message.get("content") or "")
