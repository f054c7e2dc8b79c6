"""Pydantic models as worker schemas: ``output_schema: "mypkg.models:Summary"``.

The model's JSON Schema (``model_json_schema()``) is what the provider and the
prompt see; the reply is validated by the model itself, so field constraints
and ``@field_validator``/``@model_validator`` functions apply, and the value a
task returns is the validated model dumped to plain JSON data
(``model_dump(mode="json")``).

Pydantic is optional: ``pip install 'heddle[pydantic]'``. A config that names a
model without it installed fails with an error that says so.
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

from heddle.errors import ConfigError
from heddle.llm.schema import Schema, SchemaViolation, json_path

__all__ = ["MODEL_PATH_RE", "ModelSchema", "import_model"]

#: ``package.module:Attribute`` (the attribute may be dotted: ``mod:Outer.Inner``).
MODEL_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
EXTRA_HINT = "pip install 'heddle[pydantic]'"


def import_model(path: str) -> type[Any]:
    """The Pydantic model class that ``module:Name`` names.

    Raises:
        ConfigError: The path is malformed, does not import, is not a Pydantic
            model, or pydantic is not installed (the message names the extra).
    """
    if not MODEL_PATH_RE.match(path):
        raise ConfigError(
            f"{path!r} is neither a JSON Schema mapping nor a Pydantic model path such as 'mypkg.models:Summary'"
        )
    try:
        import pydantic
    except ImportError:
        raise ConfigError(
            f"{path!r} names a Pydantic model, but pydantic is not installed; install it with {EXTRA_HINT}"
        ) from None
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for the model {path!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no {attr!r} (from the model path {path!r})")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, pydantic.BaseModel)):
        raise ConfigError(f"{path!r} is {type(obj).__name__} {obj!r}, not a Pydantic model (a BaseModel subclass)")
    return obj


class ModelSchema(Schema):
    """A Pydantic model used as a schema: its JSON Schema for providers, the model for validation.

    Args:
        model: A ``pydantic.BaseModel`` subclass.
        path: Where it came from (``mypkg.models:Summary``), for messages.
    """

    def __init__(self, model: type[Any], path: str = "") -> None:
        super().__init__(model.model_json_schema())
        self.model = model
        self.path = path or f"{model.__module__}:{model.__qualname__}"

    def __repr__(self) -> str:
        return f"<ModelSchema {self.path}>"

    def parse(self, instance: Any) -> tuple[Any, list[SchemaViolation]]:
        """Validate with the model (its validators included); the value is the model as plain JSON data."""
        import pydantic

        try:
            # JSON mode: the reply was JSON, so validate it with JSON's rules (strings may be
            # dates, but nothing is a Python object).
            model = self.model.model_validate_json(json.dumps(instance, ensure_ascii=False))
        except pydantic.ValidationError as exc:
            return None, [
                SchemaViolation(json_path(e["loc"]), e["msg"], e["type"], tuple(range(i, i + 1)))
                for i, e in enumerate(exc.errors(include_url=False))
            ]
        return model.model_dump(mode="json"), []

    def errors(self, instance: Any) -> list[SchemaViolation]:
        """Every violation the model reports for ``instance``."""
        return self.parse(instance)[1]
