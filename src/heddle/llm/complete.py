"""``await heddle.llm.complete(...)``: one model call, optionally with a JSON output schema.

With a schema the flow is: call the tier's backend (the schema in the system
prompt and, where the provider takes one, in its structured-output field) →
extract the JSON from the reply (code fences, preamble) → validate it (JSON
Schema, or a Pydantic model with its validators) → if it is not valid, one
repair call that shows the model its reply and the validation errors → if it
is still invalid, the next tier of the escalation, if any, runs the same
steps → fail with the errors, naming the first broken field and its rule.
YAML LLM workers run the same flow.

Inside a task run by a worker, every call adds its usage to
``current_task().meta`` (``input_tokens``, ``output_tokens``, ``model``,
``backend``, ``tier``, ``latency_s``, ``llm_calls`` and, with a price table,
``cost_usd``), so it is stored with the result; with an escalation,
``tiers_tried`` lists each tier tried with its outcome, tokens and cost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from heddle.chunks import task_writer
from heddle.context import task_context
from heddle.errors import BudgetExceeded, ConfigError, LLMConfigError, LLMInputError, LLMOutputError
from heddle.llm.backends import Backend, backend_for_tier
from heddle.llm.backends.base import ChatReply, ChatRequest, TextSink
from heddle.llm.extract import NoJSONFound, extract_json
from heddle.llm.models import ModelSchema
from heddle.llm.prices import Budget, price_for, task_budget
from heddle.llm.schema import Schema, SchemaViolation, check_schema
from heddle.metrics import record_llm_tokens
from heddle.names import TIERS
from heddle.settings import LLMSettings

__all__ = ["Completion", "as_schema", "complete", "escalation_chain", "estimate_tokens"]

log = logging.getLogger("heddle.llm")

# Characters per token for the input-size guard: a deliberate overestimate of
# tokens for English text, so the guard trips before the provider's limit does.
CHARS_PER_TOKEN = 4
_MAX_ERRORS_SHOWN = 10


@dataclass(frozen=True)
class Completion:
    """The result of :func:`complete`.

    Attributes:
        text: The final reply text.
        data: The JSON value parsed from it when a schema was given (else None).
        model: Model id the provider reported.
        backend: ``lmstudio``, ``ollama`` or ``anthropic``.
        tier: The tier called.
        input_tokens: Prompt tokens, summed over the calls made.
        output_tokens: Generated tokens, summed over the calls made.
        latency_s: Wall time of the whole call, retries and repair included.
        calls: Model calls made (2 when the output was repaired).
        attempts: HTTP attempts made, retries included.
        cost_usd: Cost from the price table, or None without a price for the model.
        tiers: With an escalation, every tier tried in order: ``{tier, backend, model,
            outcome (ok | invalid | unavailable | error), input_tokens, output_tokens,
            llm_calls, cost_usd}``; empty without one.
    """

    text: str
    data: Any
    model: str
    backend: str
    tier: str
    input_tokens: int
    output_tokens: int
    latency_s: float
    calls: int = 1
    attempts: int = 1
    cost_usd: float | None = None
    tiers: tuple[dict[str, Any], ...] = ()

    def usage(self) -> dict[str, Any]:
        """Usage as plain data, as stored in result metadata and events."""
        out: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "model": self.model,
            "backend": self.backend,
            "tier": self.tier,
            "latency_s": round(self.latency_s, 4),
            "llm_calls": self.calls,
        }
        if self.cost_usd is not None:
            out["cost_usd"] = self.cost_usd
        return out


def estimate_tokens(*texts: str) -> int:
    """Rough token count of some text (4 characters a token), for the input-size guard."""
    return sum(-(-len(t) // CHARS_PER_TOKEN) for t in texts)


def _messages(messages: str | Sequence[Mapping[str, str]], system: str) -> tuple[str, list[dict[str, str]]]:
    if isinstance(messages, str):
        return system, [{"role": "user", "content": messages}]
    out: list[dict[str, str]] = []
    systems = [system] if system else []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}]['content'] must be a string, got {content!r}")
        if role == "system":
            systems.append(content)
        elif role in ("user", "assistant"):
            out.append({"role": role, "content": content})
        else:
            raise TypeError(f"messages[{i}]['role'] must be 'system', 'user' or 'assistant', got {role!r}")
    if not out or out[-1]["role"] != "user":
        raise TypeError("messages must end with a 'user' message")
    return "\n\n".join(systems), out


_model_schemas: dict[type[Any], ModelSchema] = {}


def _model_schema(model: type[Any]) -> ModelSchema:
    """One validator per model class: its JSON Schema is generated once, not per call."""
    found = _model_schemas.get(model)
    if found is None:
        if len(_model_schemas) > 256:  # models made per call must not pile up
            _model_schemas.clear()
        found = _model_schemas[model] = ModelSchema(model)
    return found


def as_schema(schema: Schema | Mapping[str, Any] | type[Any]) -> Schema:
    """A validator for ``schema``: a :class:`Schema`, a JSON Schema mapping or a Pydantic model class.

    Raises:
        ConfigError: The JSON Schema is invalid (every problem, with where it is).
    """
    if isinstance(schema, Schema):
        return schema
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return _model_schema(schema)
    if not isinstance(schema, Mapping):
        raise ConfigError(f"a schema must be a JSON Schema mapping or a Pydantic model class, got {schema!r}")
    problems = check_schema(schema)
    if problems:
        listed = "; ".join(f"{'.'.join(map(str, p)) or '(root)'}: {m}" for p, m in problems)
        raise ConfigError(f"invalid output schema: {listed}")
    return Schema(schema)


def schema_instructions(schema: Mapping[str, Any]) -> str:
    """What the system prompt says about the output format."""
    return (
        "Reply with only a JSON value that matches this JSON Schema, with no other text before or after it:\n"
        + json.dumps(schema, ensure_ascii=False)
    )


def _problems(violations: Sequence[SchemaViolation]) -> str:
    shown = "; ".join(map(str, violations[:_MAX_ERRORS_SHOWN]))
    more = len(violations) - _MAX_ERRORS_SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


def _check(reply: ChatReply, validator: Schema) -> tuple[Any, str | None]:
    """Parse and validate a reply; return (value, None) or (None, what is wrong)."""
    try:
        value = extract_json(reply.text)
    except NoJSONFound as exc:
        return None, f"it is not valid JSON: {exc}"
    data, errors = validator.parse(value)
    if errors:
        first = errors[0]
        return None, (
            f"it does not match the schema (the first broken field is {first.path}, rule {first.rule}): "
            f"{_problems(errors)}"
        )
    return data, None


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def escalation_chain(tier: str, escalation: Sequence[str]) -> list[str]:
    """The tiers a call tries in order: ``tier``, then those after it in ``escalation``.

    ``escalation: [standard, frontier]`` on a local worker gives local, standard,
    frontier; on a standard worker, standard, frontier.
    """
    rest = list(escalation)
    if tier in rest:
        rest = rest[rest.index(tier) + 1 :]
    return [tier, *(t for t in rest if t != tier)]


async def complete(
    messages: str | Sequence[Mapping[str, str]],
    *,
    tier: str = "standard",
    schema: Schema | Mapping[str, Any] | type[Any] | None = None,
    system: str = "",
    max_tokens: int = 1024,
    temperature: float = 0.0,
    timeout_s: float = 120.0,
    retries: int = 2,
    max_input_tokens: int | None = None,
    settings: LLMSettings | None = None,
    escalation: Sequence[str] = (),
    structured_output: str = "auto",
    schema_name: str = "output",
    stream: bool = False,
    budget_usd: float | None = None,
) -> Completion:
    """Call the model of ``tier`` and return its reply, parsed and validated when ``schema`` is given.

    Args:
        messages: A user prompt, or ``[{"role": "user", "content": ...}, ...]``
            (``system`` entries are joined into the system prompt).
        tier: ``local``, ``standard`` or ``frontier``; see :mod:`heddle.llm.backends`.
        schema: What the reply must be: a JSON Schema (draft 2020-12), a
            :class:`Schema`, or a Pydantic model class (then ``data`` is the validated
            model as plain JSON data).
        system: System prompt.
        max_tokens: Most tokens to generate per call.
        temperature: Sampling temperature.
        timeout_s: Time limit of one model request.
        retries: Retries of a request on 429, 5xx, connection errors and timeouts.
        max_input_tokens: Refuse inputs estimated above this many tokens, without a call.
        settings: Backend settings; default: from the environment.
        escalation: Tiers to try next, in order, when the output is still invalid
            after the repair call (see :func:`escalation_chain`); a tier without a
            backend configured is skipped and recorded as ``unavailable``.
        structured_output: ``auto``: the schema also goes in the provider's own
            structured-output field where the provider and model take one;
            ``prompt``: only in the system prompt.
        schema_name: The schema's name where a provider asks for one (OpenAI-compatible).
        stream: Ask the provider for a streamed reply and, inside a task run by a worker,
            publish its text as it arrives on the task's token stream (``handle.stream()``,
            :mod:`heddle.chunks`); outside a task the reply is streamed but not published.
        budget_usd: What this call may cost in all, repair and escalation included (inside
            a task, the lower of it and the task's budget, counting what the task spent
            before); see :mod:`heddle.llm.prices`.

    Returns:
        A :class:`Completion` with the text, the parsed ``data`` and usage.

    Raises:
        LLMConfigError: The tier has no backend configured.
        LLMBackendError: The provider failed (``LLMTimeout`` when it did not answer in time).
        LLMInputError: The input is longer than ``max_input_tokens``.
        LLMOutputError: The reply does not match ``schema``, even after one repair call
            (on every tier of the escalation).
        BudgetExceeded: The next provider call would pass the budget; it was not made.

    Example:
        >>> c = await heddle.llm.complete("Is 7 prime?", tier="local",
        ...     schema={"type": "object", "required": ["prime"], "properties": {"prime": {"type": "boolean"}}})
        >>> c.data["prime"], c.input_tokens, c.model
    """
    for t in (tier, *escalation):
        if t not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {t!r}")
    if structured_output not in ("auto", "prompt"):
        raise ValueError(f"structured_output must be 'auto' or 'prompt', got {structured_output!r}")
    s = settings if settings is not None else LLMSettings.load()
    backend = backend_for_tier(tier, s)  # the first tier must be configured: fail before anything else
    system, msgs = _messages(messages, system)
    validator = as_schema(schema) if schema is not None else None
    if validator is not None:
        system = "\n\n".join(part for part in (system, schema_instructions(validator.schema)) if part)
    if max_input_tokens is not None:
        estimate = estimate_tokens(system, *(m["content"] for m in msgs))
        if estimate > max_input_tokens:
            raise LLMInputError(
                f"input too long: about {estimate} tokens (estimated at {CHARS_PER_TOKEN} characters a token) "
                f"with the system prompt, more than max_input_tokens={max_input_tokens}"
            )
    request = ChatRequest(
        messages=msgs,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        json_schema=validator.schema if validator is not None else None,
        timeout_s=timeout_s,
        retries=retries,
        schema_name=schema_name,
        native_schema=structured_output == "auto",
        stream=_stream_sink() if stream else None,
    )
    budget = task_budget(budget_usd)
    chain = escalation_chain(tier, escalation) if validator is not None else [tier]
    record = len(chain) > 1
    tried: list[dict[str, Any]] = []
    failures: list[str] = []
    failure: str | None = None
    completion: Completion | None = None
    for t in chain:
        if completion is not None:
            try:
                backend = backend_for_tier(t, s)
            except LLMConfigError as exc:
                entry = {"tier": t, "outcome": "unavailable", "error": str(exc)[:500], "input_tokens": 0,
                         "output_tokens": 0, "cost_usd": None}
                tried.append(entry)
                _record_tier(entry)
                continue
            log.warning("the output of tier %s is still invalid after its repair; escalating to tier %s",
                        completion.tier, t)
        try:
            completion, failure = await _on_tier(backend, t, request, validator, s, budget)
        except Exception as exc:
            if record:
                spent: Completion | None = getattr(exc, "heddle_spent", None)  # a repair call failed
                entry = {"tier": t, "backend": backend.name, "model": backend.model, "input_tokens": 0,
                         "output_tokens": 0, "llm_calls": 0, "cost_usd": None}
                if spent is not None:
                    entry.update(_tier_entry(spent))
                entry.update(outcome="over_budget" if isinstance(exc, BudgetExceeded) else "error",
                             error=str(exc)[:500])
                tried.append(entry)
                _record_tier(entry)
            raise
        if record:
            entry = {**_tier_entry(completion), "outcome": "ok" if failure is None else "invalid"}
            if failure is not None:
                entry["error"] = failure[:500]
            tried.append(entry)
            _record_tier(entry)
        if failure is None:
            return dataclasses.replace(completion, tiers=tuple(tried))
        failures.append(f"{t}: {backend.name} model {completion.model}: {failure}")
    assert completion is not None
    if len(chain) == 1:
        raise LLMOutputError(
            f"the output of {completion.backend} model {completion.model} is invalid after a repair attempt: "
            f"{failure}; last reply: {_clip(completion.text)!r}"
        )
    ran = [f.split(":", 1)[0] for f in failures]
    skipped = [t for t in chain if t not in ran]
    raise LLMOutputError(
        f"the output is invalid after a repair attempt on every tier tried ({', '.join(ran)}): "
        f"{' | '.join(failures)}"
        + (f"; not available: {', '.join(skipped)} (no backend configured)" if skipped else "")
        + f"; last reply: {_clip(completion.text)!r}"
    )


def _stream_sink() -> TextSink:
    """The running task's chunk writer, or a sink that drops the text outside a task."""
    return task_writer() or _NoSink()


class _NoSink:
    def begin(self) -> None:
        pass

    async def write(self, text: str) -> None:
        pass


def _tier_entry(c: Completion) -> dict[str, Any]:
    return {"tier": c.tier, "backend": c.backend, "model": c.model, "input_tokens": c.input_tokens,
            "output_tokens": c.output_tokens, "llm_calls": c.calls, "cost_usd": c.cost_usd}


def _prompt_tokens(request: ChatRequest) -> int:
    return estimate_tokens(request.system, *(m["content"] for m in request.messages))


async def _chat(backend: Backend, tier: str, request: ChatRequest, s: LLMSettings, budget: Budget | None,
                step: str) -> ChatReply:
    """One provider call, refused beforehand when it would pass the budget, counted against it after."""
    if budget is not None:
        budget.before_call(backend.name, backend.model, tier, _prompt_tokens(request), s, step)
    reply = await backend.chat(request)
    if budget is not None:
        budget.spend(reply.model or backend.model, backend.name, reply.input_tokens, reply.output_tokens, s)
    return reply


async def _on_tier(
    backend: Backend, tier: str, request: ChatRequest, validator: Schema | None, s: LLMSettings,
    budget: Budget | None = None,
) -> tuple[Completion, str | None]:
    """One tier's call and, if its reply is invalid, its one repair call; (usage, what is still wrong)."""
    started = time.monotonic()
    replies = [await _chat(backend, tier, request, s, budget, "call")]
    data: Any = None
    failure: str | None = None

    def summary() -> Completion:
        last = replies[-1]
        input_tokens = sum(r.input_tokens for r in replies)
        output_tokens = sum(r.output_tokens for r in replies)
        price = price_for(last.model, s, backend.name) or price_for(backend.model, s, backend.name)
        return Completion(
            text=last.text,
            data=data,
            model=last.model,
            backend=backend.name,
            tier=tier,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_s=time.monotonic() - started,
            calls=len(replies),
            attempts=sum(r.attempts for r in replies),
            cost_usd=price.cost_usd(input_tokens, output_tokens) if price is not None else None,
        )

    if validator is not None:
        data, failure = _check(replies[0], validator)
        if failure is not None:
            repair = dataclasses.replace(
                request,
                messages=[
                    *request.messages,
                    {"role": "assistant", "content": replies[0].text},
                    {
                        "role": "user",
                        "content": f"Your reply cannot be used because {failure}. Reply again with only the "
                        f"corrected JSON, matching the schema exactly.",
                    },
                ],
            )
            try:
                replies.append(await _chat(backend, tier, repair, s, budget, "repair call"))
            except Exception as exc:
                spent = summary()
                _add_to_task_meta(spent)  # the first call was spent (and billed) all the same
                exc.heddle_spent = spent  # type: ignore[attr-defined]  # for the escalation record
                raise
            data, failure = _check(replies[-1], validator)
    completion = summary()
    _add_to_task_meta(completion)
    return completion, failure


def _record_tier(entry: dict[str, Any]) -> None:
    """Append one tier's outcome to the running task's ``tiers_tried`` metadata."""
    ctx = task_context()
    if ctx is not None:
        ctx.meta.setdefault("tiers_tried", []).append(entry)


def _add_to_task_meta(c: Completion) -> None:
    """Add a call's usage to the running task's result metadata (summed over calls)."""
    record_llm_tokens(c.model, c.input_tokens, c.output_tokens)  # /metrics, in a task or not
    ctx = task_context()
    if ctx is None:
        return
    meta = ctx.meta
    for key, value in (
        ("input_tokens", c.input_tokens),
        ("output_tokens", c.output_tokens),
        ("llm_calls", c.calls),
    ):
        meta[key] = int(meta.get(key, 0)) + value
    meta["latency_s"] = round(float(meta.get("latency_s", 0.0)) + c.latency_s, 4)
    meta["model"], meta["backend"], meta["tier"] = c.model, c.backend, c.tier
    if c.cost_usd is not None:
        meta["cost_usd"] = float(meta.get("cost_usd", 0.0)) + c.cost_usd
