"""A YAML LLM worker is an ordinary Heddle app with one task, named after the config.

``worker_app(config, tier)`` builds ``Heddle(config.name)`` whose single async
task ``config.name`` takes the input object and returns the model's output
object; ``heddle.worker.Worker(app, tier=tier)`` then consumes
``heddle.tasks.{name}.{tier}`` like any worker, with in-progress acks while
the model call is open and cancellation on revoke.

Per task: validate the input (invalid → FAILURE "invalid input", no model
call) → :func:`heddle.llm.complete` with the system prompt and the output
schema (structured output where the provider takes it, extract, validate, one
repair, then the config's ``escalation`` tiers) → the output object (for a
Pydantic output model, the validated model as plain data). Usage goes into
the result metadata and an :class:`~heddle.events.LLMCallEvent` on
``heddle.events.llm.{name}``.

At start the worker says, once, for each tier it may call, when the output
schema can only go in the prompt (the provider or model takes no schema, or
``structured_output: prompt``) and when an escalation tier has no backend.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from heddle import names
from heddle.context import task_context
from heddle.errors import LLMConfigError, LLMInputError
from heddle.events import LLMCallEvent
from heddle.llm.backends import backend_for_tier, check_tier
from heddle.llm.cache import Memo, StageCache, cache_digest, cache_ttl_s
from heddle.llm.complete import Completion, complete, escalation_chain
from heddle.llm.config import WorkerConfig, load_worker_config
from heddle.llm.schema import Schema, describe_value
from heddle.settings import LLMSettings, Settings

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.graphs.canvas import Signature
    from heddle.results import AsyncResult
    from heddle.worker import Worker

__all__ = ["LLMCallEvent", "LLMWorkerHandle", "handle", "structured_output_notes", "worker_app"]

log = logging.getLogger("heddle.llm")


_event_encoder = msgspec.msgpack.Encoder()


def _invalid_input(name: str, detail: str) -> LLMInputError:
    return LLMInputError(f"invalid input for {name}: {detail}")


class _Runner:
    """Runs one config's tasks; everything that can be built once is built here."""

    def __init__(self, config: WorkerConfig, app: Heddle, tier: str, settings: LLMSettings) -> None:
        self.config = config
        self.app = app
        self.tier = tier
        self.settings = settings
        self.inputs: Schema = config.input_validator()
        self.outputs: Schema = config.output_validator()
        self.subject = names.llm_event_subject(config.name)
        self.cache: StageCache | None = None

    async def run(self, payload: Any, fields: dict[str, Any]) -> Any:
        ctx = task_context()
        tier = (ctx.tier if ctx is not None and ctx.tier else None) or self.tier
        started = time.monotonic()
        try:
            if payload is None:
                payload = fields
            elif fields:
                raise _invalid_input(self.config.name, "pass one input object or keyword fields, not both")
            if not isinstance(payload, dict):
                raise _invalid_input(self.config.name, f"expected one JSON object, got {describe_value(payload)}")
            payload, errors = self.inputs.parse(payload)
            if errors:
                raise _invalid_input(self.config.name, "; ".join(map(str, errors)))
            c = self.config
            memo = await self._memo(tier, payload)
            if memo is not None and memo.hit is not None:
                return memo.hit.output  # a memoized stage: no provider call (heddle.llm.cache)
            completion = await complete(
                json.dumps(payload, ensure_ascii=False),
                tier=tier,
                schema=self.outputs,
                system=c.system_prompt,
                max_tokens=c.max_output_tokens,
                temperature=c.temperature,
                timeout_s=c.timeout_seconds,
                retries=c.retries,
                max_input_tokens=c.max_input_tokens,
                settings=self.settings,
                escalation=c.escalation,
                structured_output=c.structured_output,
                schema_name=c.name,
                stream=c.stream or (ctx is not None and ctx.headers.get(names.HDR_STREAM, "") not in ("", "0")),
                budget_usd=c.budget_usd,
            )
        except Exception as exc:
            await self._announce(ctx.id if ctx else "", tier, None, started, str(exc))
            raise
        await self._announce(ctx.id if ctx else "", tier, completion, started, "")
        if memo is not None:
            await memo.store(completion.data, completion.model)
        return completion.data

    async def _memo(self, tier: str, payload: Any) -> Memo | None:
        """The cache lookup of a task sent with the ``heddle-cache`` header (a ``cache: true`` stage)."""
        ctx = task_context()
        ttl = cache_ttl_s(ctx.headers) if ctx is not None else None
        if ctx is None or ttl is None:
            return None
        backend = backend_for_tier(tier, self.settings)
        if self.cache is None:
            self.cache = StageCache((await self.app.connections()).backend)
        digest = cache_digest(self.config, backend.name, backend.model, payload)
        return await Memo.look_up(self.cache, digest, ttl, ctx, backend.name, tier)

    async def _announce(self, task_id: str, tier: str, c: Completion | None, started: float, error: str) -> None:
        """Publish the call's event; events are best effort and never fail the task."""
        ctx = task_context()
        meta = ctx.meta if ctx is not None else {}
        event = LLMCallEvent(
            task_id=task_id,
            worker_type=self.config.name,
            tier=c.tier if c else tier,
            ok=c is not None,
            backend=c.backend if c else str(meta.get("backend", "")),
            model=c.model if c else str(meta.get("model", "")),
            input_tokens=c.input_tokens if c else int(meta.get("input_tokens", 0)),
            output_tokens=c.output_tokens if c else int(meta.get("output_tokens", 0)),
            latency_s=time.monotonic() - started,
            llm_calls=c.calls if c else int(meta.get("llm_calls", 0)),
            cost_usd=c.cost_usd if c else meta.get("cost_usd"),
            error=error[:1000],
            at=time.time(),
        )
        try:
            conns = await self.app.connections()
            await conns.broker.publish_core(self.subject, _event_encoder.encode(event))
        except Exception as exc:
            log.debug("could not publish LLM event: %r", exc)


def worker_app(
    config: WorkerConfig | str | Path,
    tier: str | None = None,
    *,
    settings: Settings | None = None,
    llm_settings: LLMSettings | None = None,
    **overrides: Any,
) -> Heddle:
    """Build the Heddle app of a YAML LLM worker: one async task named ``config.name``.

    Args:
        config: A :class:`WorkerConfig` or the path of its YAML file.
        tier: Tier served (default: the config's ``default_model_tier``).
        settings: App settings (NATS, Valkey, ``ack_wait_s``...); default from the environment.
        llm_settings: Backend settings; default from the environment.
        **overrides: Individual app settings, e.g. ``nats_url=...``.

    Raises:
        ConfigFileError: The config file is invalid (every error, with file and line).
        LLMConfigError: The tier has no backend configured (names the variables to set).

    Example:
        >>> app = worker_app("configs/workers/summarizer.yaml", "local")
        >>> # heddle.Worker(app, tier="local").run() consumes heddle.tasks.summarizer.local
    """
    from heddle.app import Heddle
    from heddle.task import Task

    cfg = config if isinstance(config, WorkerConfig) else load_worker_config(config)
    served = tier or cfg.default_model_tier
    s = llm_settings if llm_settings is not None else LLMSettings.load()
    check_tier(served, s)  # fail at start-up, not at the first task
    app = Heddle(cfg.name, settings=settings, **overrides)
    app.max_output_tokens = cfg.max_output_tokens  # routers' token estimate (heddle.ratelimit)
    runner = _Runner(cfg, app, served, s)
    for note in structured_output_notes(cfg, served, s, runner.outputs.schema):
        log.warning("%s", note)

    async def run(payload: dict[str, Any] | None = None, /, **fields: Any) -> Any:
        return await runner.run(payload, fields)

    run.__doc__ = cfg.description or f"YAML LLM worker {cfg.name}"
    run.__qualname__ = run.__name__ = cfg.name.replace("-", "_")
    app.register(Task(run, app=app, name=cfg.name, tier=served))
    return app


def structured_output_notes(
    config: WorkerConfig, tier: str, settings: LLMSettings, schema: Any | None = None
) -> list[str]:
    """What a worker says at start about its output schema and escalation tiers, one line each.

    A line for every tier it may call (``tier`` and the escalation after it)
    whose provider or model cannot take the output schema in its own field, or
    all of them with ``structured_output: prompt``, and for every escalation tier
    with no backend configured.
    """
    schema = schema if schema is not None else config.output_validator().schema
    chain = escalation_chain(tier, config.escalation)
    notes: list[str] = []
    if config.structured_output == "prompt":
        notes.append(f"{config.name}: structured_output is prompt, so the output schema goes in the prompt only "
                     f"(tiers {', '.join(chain)}); replies are validated and repaired as usual")
    for t in chain:
        try:
            backend = backend_for_tier(t, settings)
        except LLMConfigError as exc:
            notes.append(f"{config.name}: escalation tier {t} is not available ({exc}); an output still invalid "
                         f"before it skips it")
            continue
        problem = backend.native_schema_problem(schema) if config.structured_output == "auto" else None
        if problem:
            notes.append(f"{config.name}: tier {t} ({backend.name}, model {backend.model}) cannot take the output "
                         f"schema in {backend.schema_field}: {problem}; it goes in the prompt instead, and replies "
                         f"are validated and repaired as usual")
    return notes


class HostedWorker:
    """A worker hosted next to others in one process (``heddle dev``); closes its app when done."""

    actor_kind = "worker"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.ready = worker.ready

    def __getattr__(self, name: str) -> Any:
        # Health and metrics read worker attributes (conns, consumers, inflight...).
        return getattr(self.worker, name)

    async def run(self) -> None:
        """Run the worker, then close its app's connections."""
        try:
            await self.worker.run()
        finally:
            with contextlib.suppress(Exception):
                await self.worker.app.aclose()

    @property
    def last_tick(self) -> float:
        """Monotonic time the worker's fetch loop last went round."""
        return self.worker.last_tick

    def request_stop(self) -> None:
        """Stop fetching and drain."""
        self.worker.request_stop()


class LLMWorkerHandle:
    """Call a YAML LLM worker from Python: ``handle(app, "summarizer").delay(text="...")``.

    With the worker's config (``handle(app, "configs/workers/summarizer.yaml")``)
    the input is checked against ``input_schema`` at the call site.

    Args:
        app: The app to send through.
        name: The worker's name (its worker type).
        tier: Tier to request (default: the router's choice, i.e. the worker's default).
        input_schema: Checked before sending, when given.
    """

    def __init__(self, app: Heddle, name: str, *, tier: str | None = None, input_schema: Schema | None = None) -> None:
        self.app = app
        self.name = name
        self.tier = tier
        self.input_schema = input_schema

    def __repr__(self) -> str:
        return f"<LLMWorkerHandle {self.name} tier={self.tier or 'default'}>"

    def _payload(self, payload: dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
        if payload is None:
            payload = fields
        elif fields:
            raise TypeError(f"pass {self.name} one input object or keyword fields, not both")
        if self.input_schema is not None:
            payload, errors = self.input_schema.parse(payload)
            if errors:
                raise _invalid_input(self.name, "; ".join(map(str, errors)))
        return payload

    def delay(self, payload: dict[str, Any] | None = None, /, **fields: Any) -> AsyncResult[Any]:
        """Send one input object (or its fields as keywords)."""
        return self.apply_async(self._payload(payload, fields))

    def apply_async(self, payload: dict[str, Any], *, stream: bool = False, **options: Any) -> AsyncResult[Any]:
        """Send one input object with ``apply_async`` options (``tier``, ``task_id``, ``countdown``...).

        With ``stream=True`` the worker streams its reply (as with ``stream: true`` in its
        config): read it with ``result.stream()`` / ``result.astream()``.
        """
        payload = self._payload(payload, {})
        if stream:
            options["headers"] = {**(options.get("headers") or {}), names.HDR_STREAM: "1"}
        if self.tier and "tier" not in options:
            options["tier"] = self.tier
        return self.app.send_task(self.name, (payload,), worker_type=self.name, **options)

    def s(self, payload: dict[str, Any] | None = None, /, **fields: Any) -> Signature:
        """A signature for task graphs; with no input it takes the previous task's result."""
        from heddle.graphs.canvas import Signature

        args = () if payload is None and not fields else (self._payload(payload, fields),)
        options: dict[str, Any] = {"worker_type": self.name}
        if self.tier:
            options["tier"] = self.tier
        return Signature(task=self.name, args=args, options=options, app=self.app)


def handle(app: Heddle, worker: str | Path | WorkerConfig, *, tier: str | None = None) -> LLMWorkerHandle:
    """A handle on a YAML LLM worker, by name or by its config (which adds call-site input checks)."""
    if isinstance(worker, WorkerConfig):
        return LLMWorkerHandle(app, worker.name, tier=tier, input_schema=worker.input_validator())
    text = str(worker)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        cfg = load_worker_config(text)
        return LLMWorkerHandle(app, cfg.name, tier=tier, input_schema=cfg.input_validator())
    return LLMWorkerHandle(app, text, tier=tier)
