"""Ollama: ``POST /api/chat`` without streaming."""

from __future__ import annotations

from typing import Any

from heddle.llm.backends.base import ChatReply, ChatRequest
from heddle.llm.backends.http import HTTPBackend, as_int


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
            "stream": False,
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
