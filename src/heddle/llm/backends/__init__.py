"""Model backends and the choice of one per tier, from :class:`~heddle.settings.LLMSettings`.

===========  ===========================================================
tier         backend
===========  ===========================================================
``local``    LM Studio (``LM_STUDIO_URL`` + ``LM_STUDIO_MODEL``) or Ollama
             (``OLLAMA_URL`` + ``OLLAMA_MODEL``); with both set,
             ``HEDDLE_LOCAL_BACKEND=lmstudio|ollama`` chooses
``standard`` Anthropic (``ANTHROPIC_API_KEY``), model ``HEDDLE_STANDARD_MODEL``
             (default ``claude-sonnet-5-5``)
``frontier`` Anthropic (``ANTHROPIC_API_KEY``), model ``FRONTIER_MODEL``
===========  ===========================================================
"""

from __future__ import annotations

import threading

from heddle.errors import LLMConfigError
from heddle.llm.backends.base import Backend, ChatReply, ChatRequest
from heddle.names import TIERS
from heddle.settings import LOCAL_BACKENDS, LLMSettings

__all__ = ["Backend", "ChatReply", "ChatRequest", "backend_for_tier", "check_tier"]

_cache: dict[tuple[str, LLMSettings], Backend] = {}
_lock = threading.Lock()


def check_tier(tier: str, settings: LLMSettings) -> str:
    """Which backend serves ``tier`` (``lmstudio``, ``ollama`` or ``anthropic``).

    Raises:
        LLMConfigError: The tier is not configured; the message names the variables to set.
    """
    if tier not in TIERS:
        raise LLMConfigError(f"unknown model tier {tier!r}; use one of {', '.join(TIERS)}")
    s = settings
    if tier == "local":
        choice = s.local_backend
        if choice is not None and choice not in LOCAL_BACKENDS:
            raise LLMConfigError(
                f"HEDDLE_LOCAL_BACKEND={choice!r} is not a local backend; set it to lmstudio or ollama"
            )
        if choice is None:
            if s.lm_studio_url and s.ollama_url:
                raise LLMConfigError(
                    "both LM_STUDIO_URL and OLLAMA_URL are set, so the local tier cannot choose; set "
                    "HEDDLE_LOCAL_BACKEND=lmstudio or HEDDLE_LOCAL_BACKEND=ollama"
                )
            if not s.lm_studio_url and not s.ollama_url:
                raise LLMConfigError(
                    "the local tier has no backend: set LM_STUDIO_URL and LM_STUDIO_MODEL (LM Studio or any "
                    "OpenAI-compatible server) or OLLAMA_URL and OLLAMA_MODEL (Ollama); `heddle dev` serves "
                    "an embedded model instead"
                )
            choice = "lmstudio" if s.lm_studio_url else "ollama"
        needed = (
            (("LM_STUDIO_URL", s.lm_studio_url), ("LM_STUDIO_MODEL", s.lm_studio_model))
            if choice == "lmstudio"
            else (("OLLAMA_URL", s.ollama_url), ("OLLAMA_MODEL", s.ollama_model))
        )
        missing = [var for var, value in needed if not value]
        if missing:
            raise LLMConfigError(
                f"the local tier uses {choice} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                f"not set; set {' and '.join(missing)}"
            )
        return choice
    missing = [] if s.anthropic_api_key else ["ANTHROPIC_API_KEY"]
    if tier == "frontier" and not s.frontier_model:
        missing.append("FRONTIER_MODEL")
    if missing:
        raise LLMConfigError(
            f"the {tier} tier uses Anthropic but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; set {' and '.join(missing)}"
            + (" (a model id such as claude-opus-5-5)" if "FRONTIER_MODEL" in missing else "")
        )
    return "anthropic"


def backend_for_tier(tier: str, settings: LLMSettings | None = None) -> Backend:
    """The backend serving ``tier``; one instance per (tier, settings), reused across calls.

    Raises:
        LLMConfigError: The tier is not configured; the message names the variables to set.
    """
    s = settings if settings is not None else LLMSettings.load()
    key = (tier, s)
    with _lock:
        backend = _cache.get(key)
        if backend is not None:
            return backend
        kind = check_tier(tier, s)
        if kind == "lmstudio":
            from heddle.llm.backends.openai_compat import OpenAICompatBackend

            assert s.lm_studio_url and s.lm_studio_model
            backend = OpenAICompatBackend(s.lm_studio_url, s.lm_studio_model)
        elif kind == "ollama":
            from heddle.llm.backends.ollama import OllamaBackend

            assert s.ollama_url and s.ollama_model
            backend = OllamaBackend(s.ollama_url, s.ollama_model)
        else:
            from heddle.llm.backends.anthropic import AnthropicBackend

            model = s.frontier_model if tier == "frontier" else s.standard_model
            assert s.anthropic_api_key and model
            backend = AnthropicBackend(s.anthropic_base_url, model, s.anthropic_api_key)
        _cache[key] = backend
        return backend
