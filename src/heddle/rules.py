"""Router rules from YAML: tier overrides, shared rate limits, fallback tiers.

Validation walks the YAML node tree, so every error carries its file and line,
and all of them are reported at once::

    tier_overrides:            # worker_type -> tier, beats what the task asked for
      summarizer: local
    rate_limits:
      tiers:                   # shared by every router replica
        standard: {rate: 60/m, burst: 10, tokens_per_minute: 400000}
      workers:
        extractor: {rate: 5/s, burst: 5, on_limit: delay}   # or dead_letter
    fallback:                  # tried in order when no worker of a tier is alive
      local: [standard]
    unknown_worker_grace_seconds: 30
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heddle.configfile import ConfigIssue, SafeConfigLoader, read_config_text, yaml_issue
from heddle.errors import ConfigFileError
from heddle.names import TIERS

DEFAULT_RULES_PATH = Path("configs/router_rules.yaml")
# A sign is accepted so that "-5/s" is told it must be positive, not that it is malformed.
_RATE_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_BURST_RE = re.compile(r"^[0-9]+$")  # ASCII digits only: str.isdigit() also accepts "²", which int() refuses
#: Keys a router rules file may have at the top (``heddle validate`` recognises the file by them).
RULES_KEYS = ("tier_overrides", "rate_limits", "fallback", "unknown_worker_grace_seconds")
_LIMIT_KEYS = ("rate", "burst", "on_limit", "tokens_per_minute")

# A bucket's rate and burst go to a Lua script in Valkey that divides by the rate
# and sets the bucket's expiry to burst / rate seconds. A rate of 0 divides by
# zero and a tiny rate or huge burst makes an expiry Valkey refuses; either way
# every take fails and the router naks the task forever. So a rate must be at
# least one a day, and a burst at most a million (a bigger burst is no limit).
#: Smallest rate a limit may have, per second (one a day).
MIN_RATE_PER_S = 1 / 86400
#: Largest burst a limit may have.
MAX_BURST = 1_000_000


class RulesError(ConfigFileError):
    """Raised when a router rules file is invalid; ``issues`` holds every error."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("invalid router rules:\n" + "\n".join(f"  {i}" for i in issues), issues)


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``rate_per_s`` tokens a second, at most ``burst`` saved up."""

    rate_per_s: float
    burst: int
    on_limit: str = "delay"  # or "dead_letter"


@dataclass(frozen=True)
class RouterRules:
    """Parsed router rules (the defaults route by request and worker default only)."""

    tier_overrides: dict[str, str] = field(default_factory=dict)
    tier_limits: dict[str, RateLimit] = field(default_factory=dict)
    worker_limits: dict[str, RateLimit] = field(default_factory=dict)
    fallback: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unknown_worker_grace_s: float = 30.0
    source: str = ""
    # Model tokens a minute (``tokens_per_minute``), as buckets of tokens a second with a
    # minute's worth of burst; a task is charged its estimate (heddle.ratelimit).
    tier_token_limits: dict[str, RateLimit] = field(default_factory=dict)
    worker_token_limits: dict[str, RateLimit] = field(default_factory=dict)

    @property
    def limited_tiers(self) -> frozenset[str]:
        """Tiers with any limit: their tasks go through the router."""
        return frozenset(self.tier_limits) | frozenset(self.tier_token_limits)

    @property
    def limited_workers(self) -> frozenset[str]:
        """Worker types with any limit: their tasks go through the router."""
        return frozenset(self.worker_limits) | frozenset(self.worker_token_limits)


def parse_rate(text: str) -> float:
    """``"60/m"`` → 1.0 (per second).

    Raises:
        ValueError: If ``text`` is not a count per second, minute or hour, or is
            a rate no bucket can keep: 0 or less, under one a day
            (:data:`MIN_RATE_PER_S`), or too large to be a number.
    """
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"rate {text!r} is not like '10/s', '60/m' or '100/h'")
    rate = float(m.group(1)) / _PER[m.group(2)]
    if not math.isfinite(rate):
        raise ValueError(f"rate {text!r} is too large to be a number; use a rate such as '1000/s', "
                         f"or remove the limit")
    if rate < MIN_RATE_PER_S:
        held = "holds every task forever" if rate <= 0 else "is too slow for a token bucket"
        raise ValueError(f"rate {text!r} {held}; a rate must be at least one a day, such as '1/s', "
                         f"'1/h' or '0.05/h', or remove the limit")
    return rate


class _Walker:
    def __init__(self, file: str) -> None:
        self.file = file
        self.issues: list[ConfigIssue] = []

    def err(self, node: yaml.Node, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, node.start_mark.line + 1, message))

    def mapping(self, node: yaml.Node, where: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            self.err(node, f"{where} must be a mapping")
            return []
        out = []
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.err(k, f"{where}: keys must be plain names")
                continue
            out.append((k, v))
        return out

    def scalar(self, node: yaml.Node, where: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.err(node, f"{where} must be a single value")
            return None
        return str(node.value)

    def tier(self, node: yaml.Node, where: str) -> str | None:
        value = self.scalar(node, where)
        if value is not None and value not in TIERS:
            self.err(node, f"{where}: {value!r} is not a tier; use one of {', '.join(TIERS)}")
            return None
        return value

    def limit(self, node: yaml.Node, where: str) -> tuple[RateLimit | None, RateLimit | None]:
        """A limit entry: its request bucket and its model-token bucket (either may be absent)."""
        rate: float | None = None
        burst: int | None = None
        tokens: int | None = None
        on_limit = "delay"
        ok = True
        for k, v in self.mapping(node, where):
            key = k.value
            if key == "tokens_per_minute":
                text = self.scalar(v, f"{where}.tokens_per_minute")
                digits = text.lstrip("0") if text is not None and _BURST_RE.match(text) else ""
                if not digits or len(digits) > 12:
                    self.err(v, f"{where}.tokens_per_minute must be a whole number of model tokens >= 1 "
                                f"(prompt and output), e.g. 40000; got {text!r}")
                    ok = False
                else:
                    tokens = int(digits)
            elif key == "rate":
                text = self.scalar(v, f"{where}.rate")
                try:
                    rate = parse_rate(text) if text is not None else None
                except ValueError as exc:
                    self.err(v, f"{where}.rate: {exc}")
                    ok = False
            elif key == "burst":
                text = self.scalar(v, f"{where}.burst")
                digits = text.lstrip("0") if text is not None and _BURST_RE.match(text) else ""
                if not digits:
                    self.err(v, f"{where}.burst must be a whole number >= 1, got {text!r}")
                    ok = False
                elif len(digits) > len(str(MAX_BURST)) or int(digits) > MAX_BURST:
                    shown = digits if len(digits) <= 20 else digits[:20] + "..."
                    self.err(v, f"{where}.burst must be at most {MAX_BURST:,}, got {shown}; "
                                f"a bigger burst is no limit at all, so remove the limit instead")
                    ok = False
                else:
                    burst = int(digits)
            elif key == "on_limit":
                text = self.scalar(v, f"{where}.on_limit")
                if text not in ("delay", "dead_letter"):
                    self.err(v, f"{where}.on_limit must be 'delay' or 'dead_letter', got {text!r}")
                    ok = False
                else:
                    on_limit = text
            else:
                close = difflib.get_close_matches(str(key), _LIMIT_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.err(k, f"{where}: unknown key {key!r}{hint}; expected {', '.join(_LIMIT_KEYS)}")
                ok = False
        if rate is None and tokens is None and ok:
            self.err(node, f"{where} needs a rate (e.g. rate: 10/s), tokens_per_minute, or both")
            return None, None
        if not ok:
            return None, None
        requests = None
        if rate is not None:
            requests = RateLimit(rate, burst if burst is not None else max(1, min(MAX_BURST, int(rate))), on_limit)
        token_bucket = RateLimit(tokens / 60.0, tokens) if tokens is not None else None
        return requests, token_bucket


def parse_rules(text: str, file: str = "<rules>") -> RouterRules:
    """Parse and validate rules text; raise :class:`RulesError` listing every problem."""
    w = _Walker(file)
    try:
        # The same loader and limits (size, aliases, nesting) as every Heddle config file.
        root = yaml.compose(text, Loader=SafeConfigLoader)
    except yaml.YAMLError as exc:
        raise RulesError([yaml_issue(exc, file, syntax="not valid YAML")]) from None
    if root is None:
        return RouterRules(source=file)
    overrides: dict[str, str] = {}
    tier_limits: dict[str, RateLimit] = {}
    worker_limits: dict[str, RateLimit] = {}
    fallback: dict[str, tuple[str, ...]] = {}
    tier_tokens: dict[str, RateLimit] = {}
    worker_tokens: dict[str, RateLimit] = {}
    grace = 30.0
    for k, v in w.mapping(root, "rules"):
        key = k.value
        if key == "tier_overrides":
            for wk, wv in w.mapping(v, "tier_overrides"):
                tier = w.tier(wv, f"tier_overrides.{wk.value}")
                if tier:
                    overrides[wk.value] = tier
        elif key == "rate_limits":
            for rk, rv in w.mapping(v, "rate_limits"):
                if rk.value == "tiers":
                    for tk, tv in w.mapping(rv, "rate_limits.tiers"):
                        if tk.value not in TIERS:
                            w.err(tk, f"rate_limits.tiers: {tk.value!r} is not a tier; use one of {', '.join(TIERS)}")
                            continue
                        lim, tok = w.limit(tv, f"rate_limits.tiers.{tk.value}")
                        if lim:
                            tier_limits[tk.value] = lim
                        if tok:
                            tier_tokens[tk.value] = tok
                elif rk.value == "workers":
                    for wk, wv in w.mapping(rv, "rate_limits.workers"):
                        lim, tok = w.limit(wv, f"rate_limits.workers.{wk.value}")
                        if lim:
                            worker_limits[wk.value] = lim
                        if tok:
                            worker_tokens[wk.value] = tok
                else:
                    w.err(rk, f"rate_limits: unknown key {rk.value!r}; expected tiers or workers")
        elif key == "fallback":
            for fk, fv in w.mapping(v, "fallback"):
                if fk.value not in TIERS:
                    w.err(fk, f"fallback: {fk.value!r} is not a tier; use one of {', '.join(TIERS)}")
                    continue
                if not isinstance(fv, yaml.SequenceNode):
                    w.err(fv, f"fallback.{fk.value} must be a list of tiers, e.g. [standard]")
                    continue
                chain = [w.tier(item, f"fallback.{fk.value}") for item in fv.value]
                fallback[fk.value] = tuple(t for t in chain if t)
        elif key == "unknown_worker_grace_seconds":
            grace_text = w.scalar(v, key)
            try:
                grace = float(grace_text) if grace_text is not None else grace
                if not 0 <= grace < math.inf:  # also refuses nan, which compares false with everything
                    raise ValueError
            except ValueError:
                w.err(v, f"{key} must be a number of seconds >= 0, got {grace_text!r}")
        else:
            w.err(k, f"unknown key {key!r}; expected one of {', '.join(RULES_KEYS)}")
    if w.issues:
        raise RulesError(w.issues)
    return RouterRules(overrides, tier_limits, worker_limits, fallback, grace, file, tier_tokens, worker_tokens)


def load_rules(path: str | os.PathLike[str]) -> RouterRules:
    """Read and validate a rules file; raise :class:`RulesError` listing every problem."""
    p = Path(path)
    text, issues = read_config_text(p)
    if text is None:
        raise RulesError(issues)
    return parse_rules(text, str(p))


def check_rules_file(path: str | os.PathLike[str]) -> list[ConfigIssue]:
    """Every problem in a rules file, with file and line; empty if it is valid (``heddle validate``)."""
    try:
        load_rules(path)
    except RulesError as exc:
        return list(exc.issues)
    return []


def looks_like_rules(data: Any) -> bool:
    """Whether a loaded YAML document is meant as router rules: a mapping with one of :data:`RULES_KEYS`."""
    return isinstance(data, dict) and any(k in data for k in RULES_KEYS)


def find_rules_path(explicit: str | None) -> Path | None:
    """``--rules PATH``, else ``$HEDDLE_ROUTER_RULES``, else ``configs/router_rules.yaml`` if present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("HEDDLE_ROUTER_RULES")
    if env:
        return Path(env)
    return DEFAULT_RULES_PATH if DEFAULT_RULES_PATH.exists() else None
