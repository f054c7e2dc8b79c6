"""YAML LLM worker configs and price tables: load, check every field, report every error.

A worker config::

    name: summarizer                     # worker type; tasks go to heddle.tasks.summarizer.{tier}
    description: Summarise a text in one or two sentences.
    system_prompt: |
      You summarise texts ...
    input_schema:  {type: object, required: [text], properties: {text: {type: string}}}
    output_schema: {type: object, required: [summary], properties: {summary: {type: string}}}
                                         # (or a Pydantic model: output_schema: "mypkg.models:Summary")
    default_model_tier: local            # local | standard | frontier
    max_input_tokens: 4000               # estimated at 4 characters a token
    max_output_tokens: 256
    temperature: 0.2                     # 0 to 1
    timeout_seconds: 60                  # per model request
    retries: 2                           # per model request, on 429 / 5xx / connection errors / timeouts
    escalation: [standard, frontier]     # output still invalid after its repair -> the next tier
    structured_output: auto              # auto: the schema in the provider's own field where it can; prompt
    stream: true                         # publish the reply's tokens as they arrive (handle.stream())
    budget_usd: 0.05                     # most a task's model calls may cost, in US dollars

Unknown keys and wrong types are errors; all of them are reported at once,
each with its file and line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heddle.configfile import ConfigIssue, LineMap, dotted, issues_error, line_of, load_yaml, unknown_key_message
from heddle.errors import ConfigError
from heddle.llm.models import MODEL_PATH_RE, ModelSchema, import_model
from heddle.llm.schema import Schema, check_schema
from heddle.names import TIERS

__all__ = [
    "WORKER_KEYS",
    "Price",
    "WorkerConfig",
    "check_worker_config",
    "load_prices",
    "load_worker_config",
    "looks_like_worker_config",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_OUTPUT_TOKENS = 200_000
MAX_TIMEOUT_S = 3600.0
MAX_RETRIES = 10
#: ``structured_output`` values: ``auto`` sends the output schema in the provider's own
#: field where the provider and model take one; ``prompt`` only ever puts it in the prompt.
STRUCTURED_OUTPUT_MODES = ("auto", "prompt")


@dataclass(frozen=True)
class WorkerConfig:
    """A checked YAML LLM worker config.

    Attributes:
        name: Worker type and task name (letters, digits, ``_``, ``-``).
        system_prompt: Instructions sent as the system prompt.
        input_schema: JSON Schema of the task's input object (a Pydantic model's, when
            ``input_model`` names one).
        output_schema: JSON Schema of the model's output object (likewise with ``output_model``).
        description: What the worker does (shown in banners and tools).
        default_model_tier: Tier used when neither the call nor a router rule picks one.
        max_input_tokens: Inputs estimated above this many tokens fail without a model call.
        max_output_tokens: ``max_tokens`` of each model request.
        temperature: Sampling temperature, 0 to 1.
        timeout_seconds: Time limit of one model request.
        retries: Retries of one model request on 429, 5xx, connection errors and timeouts.
        escalation: Tiers to re-run the task on, in order, when a tier's output is still
            invalid after its repair.
        structured_output: ``auto`` (the schema in the provider's own field where it can
            take one) or ``prompt`` (only in the prompt).
        input_model: ``module:Name`` of the Pydantic model given as ``input_schema``, or "".
        output_model: ``module:Name`` of the Pydantic model given as ``output_schema``, or "".
        stream: Stream every reply and publish its text as it arrives on the task's token
            stream (:mod:`heddle.chunks`); a task sent with the ``heddle-stream`` header streams too.
        budget_usd: Most one task's model calls may cost in all (repair and escalation
            included), in US dollars; None: no limit (see ``heddle.llm.prices``).
        source: The file it was loaded from.
    """

    name: str
    system_prompt: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    description: str = ""
    default_model_tier: str = "standard"
    max_input_tokens: int = 8000
    max_output_tokens: int = 1024
    temperature: float = 0.0
    timeout_seconds: float = 120.0
    retries: int = 2
    escalation: tuple[str, ...] = ()
    structured_output: str = "auto"
    input_model: str = ""
    output_model: str = ""
    stream: bool = False
    budget_usd: float | None = None
    source: str = field(default="", compare=False)

    def __repr__(self) -> str:
        return f"<WorkerConfig {self.name!r} from {self.source or '<memory>'}>"

    def input_validator(self) -> Schema:
        """The compiled input schema (the Pydantic model, when one is named)."""
        if self.input_model:
            return ModelSchema(import_model(self.input_model), self.input_model)
        return Schema(self.input_schema)

    def output_validator(self) -> Schema:
        """The compiled output schema (the Pydantic model, when one is named)."""
        if self.output_model:
            return ModelSchema(import_model(self.output_model), self.output_model)
        return Schema(self.output_schema)


def _kind(v: Any) -> str:
    """A value's type in YAML words, for messages."""
    if v is None:
        return "null"
    for t, word in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "list"),
                    (dict, "mapping")):
        if isinstance(v, t):
            return word
    return type(v).__name__


def _short(v: Any) -> str:
    text = repr(_plain(v))
    return text if len(text) <= 60 else text[:57] + "..."


def _string(nonempty: bool) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string, got {_kind(v)} {_short(v)}"
        if nonempty and not v.strip():
            return "must not be empty"
        return None

    return check


def _check_name(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"must be a string, got {_kind(v)} {_short(v)}"
    if not _NAME_RE.match(v):
        return (
            f"{v!r} may only contain letters, digits, '_' and '-' (1 to 64 characters): it becomes "
            f"the worker type in NATS subjects"
        )
    return None


def _int(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return f"must be an integer, got {_kind(v)} {_short(v)}"
        if v < lo or (hi is not None and v > hi):
            return f"must be from {lo} to {hi}, got {v}" if hi is not None else f"must be >= {lo}, got {v}"
        return None

    return check


def _number(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, int | float) or isinstance(v, bool):
            return f"must be a number, got {_kind(v)} {_short(v)}"
        if (v <= lo if lo_open else v < lo) or v > hi:
            low = f"> {lo:g}" if lo_open else f">= {lo:g}"
            return f"must be {low} and <= {hi:g}, got {v!r}"
        return None

    return check


def _tier(v: Any) -> str | None:
    if v not in TIERS:
        return f"must be one of {', '.join(TIERS)}, got {v!r}"
    return None


_OBJECT_ONLY = "must describe a JSON object (type: object): a task's input and a model's output are one object"


def _object_schema(v: Any) -> str | None:
    if isinstance(v, str) and MODEL_PATH_RE.match(v):
        try:
            model = import_model(v)
        except ConfigError as exc:
            return str(exc)
        if model.model_json_schema().get("type") != "object":
            return f"the model {v!r} " + _OBJECT_ONLY.replace("must describe", "does not describe")
        return None
    if not isinstance(v, dict):
        return (f"must be a JSON Schema mapping or a Pydantic model path ('mypkg.models:Summary'), "
                f"got {_kind(v)} {_short(v)}")
    if v.get("type") != "object":
        return _OBJECT_ONLY
    return None


def _escalation(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return f"must be a list of tiers to try in order, e.g. [standard, frontier]; got {_kind(v)} {_short(v)}"
    for t in v:
        if t not in TIERS:
            return f"lists {t!r}; each entry must be one of {', '.join(TIERS)}"
    if len(set(v)) != len(v):
        return "lists a tier twice"
    return None


def _structured_output(v: Any) -> str | None:
    if v not in STRUCTURED_OUTPUT_MODES:
        return (f"must be auto (the schema in the provider's own field where it can take one) or prompt "
                f"(only in the prompt), got {_short(v)}")
    return None


def _boolean(v: Any) -> str | None:
    if not isinstance(v, bool):
        return f"must be true or false, got {_kind(v)} {_short(v)}"
    return None


# key -> (required, checker). Schemas get a deeper check below.
WORKER_KEYS: dict[str, tuple[bool, Callable[[Any], str | None]]] = {
    "name": (True, _check_name),
    "description": (False, _string(nonempty=False)),
    "system_prompt": (True, _string(nonempty=True)),
    "input_schema": (True, _object_schema),
    "output_schema": (True, _object_schema),
    "default_model_tier": (False, _tier),
    "max_input_tokens": (False, _int(1)),
    "max_output_tokens": (False, _int(1, MAX_OUTPUT_TOKENS)),
    "temperature": (False, _number(0.0, 1.0)),
    "timeout_seconds": (False, _number(0.0, MAX_TIMEOUT_S, lo_open=True)),
    "retries": (False, _int(0, MAX_RETRIES)),
    "escalation": (False, _escalation),
    "structured_output": (False, _structured_output),
    "stream": (False, _boolean),
    "budget_usd": (False, _number(0.0, 1e6, lo_open=True)),
}
# Keys only a worker config has: how `heddle validate` tells one from other config files.
_SIGNATURE_KEYS = frozenset({"system_prompt", "input_schema", "output_schema", "default_model_tier"})


def looks_like_worker_config(data: Any) -> bool:
    """Whether a loaded YAML document is meant as an LLM worker config (by its keys)."""
    return isinstance(data, dict) and bool(_SIGNATURE_KEYS & set(data))


def check_worker_config(data: Any, file: str) -> tuple[WorkerConfig | None, list[ConfigIssue]]:
    """Check a loaded document; return the config (None if invalid) and every issue found."""
    if not isinstance(data, dict):
        line = getattr(data, "line", 1)
        return None, [ConfigIssue(file, line, "a worker config must be a mapping (name: ..., system_prompt: ...)")]
    issues: list[ConfigIssue] = []

    def add(path: tuple[Any, ...], message: str) -> None:
        issues.append(ConfigIssue(file, line_of(data, path), message, dotted(path)))

    for key in data:
        if key not in WORKER_KEYS:
            add((key,), unknown_key_message(key, WORKER_KEYS))
    for key, (required, check) in WORKER_KEYS.items():
        if key not in data:
            if required:
                issues.append(ConfigIssue(file, getattr(data, "line", 1), "is required", key))
            continue
        problem = check(data[key])
        if problem:
            add((key,), problem)
        elif key in ("input_schema", "output_schema") and isinstance(data[key], dict):
            for path, message in check_schema(data[key]):
                add((key, *path), message)
    if issues:
        return None, issues
    values = {k: _plain(v) for k, v in data.items()}
    for key in ("input_schema", "output_schema"):
        if isinstance(values[key], str):  # a Pydantic model: keep its path, expose its JSON Schema
            values[key.replace("_schema", "_model")] = values[key]
            values[key] = import_model(values[key]).model_json_schema()
    if "escalation" in values:
        values["escalation"] = tuple(values["escalation"])
    for key in ("temperature", "timeout_seconds", "budget_usd"):
        if key in values:
            values[key] = float(values[key])
    return WorkerConfig(**values, source=file), []


def _plain(v: Any) -> Any:
    """LineMap/LineList -> dict/list, so configs encode and compare as plain data."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def load_worker_config(path: str | Path) -> WorkerConfig:
    """Load and check a worker config file.

    Raises:
        ConfigFileError: With every problem, each with file and line.
    """
    data, issues = load_yaml(path)
    if data is not None or not issues:
        config, more = check_worker_config(data, str(path))
        issues += more
        if config is not None and not issues:
            return config
    raise issues_error("worker config", issues)


# -- price table -------------------------------------------------------------------


@dataclass(frozen=True)
class Price:
    """US dollars per million input and output tokens of one model."""

    input_per_mtok: float
    output_per_mtok: float

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """Cost of one call."""
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


_PRICE_KEYS = ("input_per_mtok", "output_per_mtok")


def load_prices(path: str | Path) -> dict[str, Price]:
    """Load a price table: ``model: {input_per_mtok: 3.0, output_per_mtok: 15.0}`` per model.

    Raises:
        ConfigFileError: With every problem, each with file and line.
    """
    file = str(path)
    data, issues = load_yaml(path)
    prices: dict[str, Price] = {}
    if data is not None and not isinstance(data, LineMap):
        issues.append(ConfigIssue(file, 1, "a price table maps model ids to {input_per_mtok, output_per_mtok}"))
    elif isinstance(data, LineMap):
        for model, entry in data.items():
            line = data.key_lines.get(model, 0)
            if not isinstance(entry, dict):
                issues.append(ConfigIssue(file, line, "must be {input_per_mtok: N, output_per_mtok: N}", str(model)))
                continue
            bad = False
            for key in entry:
                if key not in _PRICE_KEYS:
                    issues.append(ConfigIssue(file, line_of(data, (model, key)),
                                              unknown_key_message(key, _PRICE_KEYS), f"{model}.{key}"))
                    bad = True
            for key in _PRICE_KEYS:
                v = entry.get(key)
                if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
                    issues.append(ConfigIssue(file, line_of(data, (model, key)),
                                              f"must be US dollars per million tokens (a number >= 0), got {v!r}",
                                              f"{model}.{key}"))
                    bad = True
            if not bad:
                prices[str(model)] = Price(float(entry["input_per_mtok"]), float(entry["output_per_mtok"]))
    if issues:
        raise issues_error("price table", issues)
    return prices
