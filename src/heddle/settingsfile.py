"""A settings file: the settings of :class:`heddle.settings.Settings` in YAML, for deployments.

A Kubernetes ConfigMap or a file checked in beside the app can hold what would
otherwise be a dozen environment variables::

    # heddle.yaml, found through HEDDLE_SETTINGS=heddle.yaml or Heddle(settings_file=...)
    nats_url: nats://nats-0:4222,nats://nats-1:4222,nats://nats-2:4222
    stream_replicas: 3
    valkey_sentinels: [sentinel-0:26379, sentinel-1:26379, sentinel-2:26379]
    valkey_sentinel_master: heddle
    ack_wait_s: 60

Keys are the setting names (``Settings`` fields, and the flat credential names
such as ``nats_user``); what the file sets, an environment variable or an
explicit argument overrides. Every problem is reported at once, with its line:
unknown keys (with the closest known one), values of the wrong type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from heddle.configfile import ConfigIssue, LineMap, issues_error, load_yaml, unknown_key_message
from heddle.redact import redact

__all__ = ["FILE_KINDS", "SETTINGS_FILE_ENV", "read_settings_file"]

#: The environment variable naming the settings file.
SETTINGS_FILE_ENV = "HEDDLE_SETTINGS"

# What each kind of setting accepts in YAML, and how it is said in an error; each
# converter returns _WRONG for a value it does not take.
_WRONG = object()


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _WRONG


def _whole(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG


def _strings(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return _WRONG


_KINDS: dict[str, tuple[str, Any]] = {
    "str": ("a string", lambda v: v if isinstance(v, str) else _WRONG),
    "int": ("a whole number", _whole),
    "float": ("a number (seconds for a name ending in _s)", _number),
    "bool": ("true or false", lambda v: v if isinstance(v, bool) else _WRONG),
    "int | None": ("a whole number or null", lambda v: None if v is None else _whole(v)),
    "tuple[str, ...]": ("a list of strings (or one comma-separated string)", _strings),
}
#: The annotations a setting may have to be settable from a file.
FILE_KINDS = frozenset(_KINDS)
# Values never shown in an error.
_SECRET_SUFFIXES = ("password", "token")


def read_settings_file(path: str, kinds: Mapping[str, str]) -> dict[str, Any]:
    """The settings ``path`` sets, checked against ``kinds`` (setting name -> type, as annotated).

    Raises:
        ConfigFileError: The file is missing, is not YAML, is not a mapping, or has
            unknown keys or values of the wrong type (all of them, with their lines).
    """
    doc, issues = load_yaml(path)
    values: dict[str, Any] = {}
    if doc is None and not issues:
        doc = LineMap()  # an empty file sets nothing
    if doc is not None and not isinstance(doc, LineMap):
        issues.append(ConfigIssue(path, getattr(doc, "line", 1) or 1,
                                  "a settings file is a mapping of setting names to values, e.g. `stream_replicas: 3`"))
    elif doc is not None:
        for key, value in doc.items():
            line = doc.key_lines.get(key, 0)
            kind = kinds.get(key) if isinstance(key, str) else None
            if kind is None:
                issues.append(ConfigIssue(path, line, unknown_key_message(key, kinds)))
                continue
            said, convert = _KINDS[kind]
            converted = convert(value)
            if converted is _WRONG:
                # A URL given as a list, say, may hold a password: redacted like any log line.
                shown = "" if key.endswith(_SECRET_SUFFIXES) else f" {redact(repr(value))}"
                what = "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else (
                    type(value).__name__)
                issues.append(ConfigIssue(path, line, f"{key} must be {said}, got {what}{shown}"))
                continue
            values[key] = converted
    if issues:
        raise issues_error("the settings file", issues)
    return values
