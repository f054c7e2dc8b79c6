"""Router rules from YAML: tier overrides, shared rate limits, fallback tiers.

Validation walks the YAML node tree, so every error carries its file and line,
and all of them are reported at once::

    tier_overrides:            # worker_type -> tier, beats what the task asked for
      summarizer: local
    rate_limits:
      tiers:                   # shared by every router replica
        standard: {rate: 60/m, burst: 10}
      workers:
        extractor: {rate: 5/s, burst: 5, on_limit: delay}   # or dead_letter
    fallback:                  # tried in order when no worker of a tier is alive
      local: [standard]
    unknown_worker_grace_seconds: 30
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from heddle.configfile import ConfigIssue
from heddle.errors import ConfigError
from heddle.names import TIERS

DEFAULT_RULES_PATH = Path("configs/router_rules.yaml")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_TOP_KEYS = ("tier_overrides", "rate_limits", "fallback", "unknown_worker_grace_seconds")


class RulesError(ConfigError):
    """Raised when a router rules file is invalid; ``issues`` holds every error."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("invalid router rules:\n" + "\n".join(f"  {i}" for i in issues))


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


def parse_rate(text: str) -> float:
    """``"60/m"`` → 1.0 (per second); plain numbers are per second."""
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"rate {text!r} is not like '10/s', '60/m' or '100/h'")
    return float(m.group(1)) / _PER[m.group(2)]


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

    def limit(self, node: yaml.Node, where: str) -> RateLimit | None:
        rate: float | None = None
        burst: int | None = None
        on_limit = "delay"
        ok = True
        for k, v in self.mapping(node, where):
            key = k.value
            if key == "rate":
                text = self.scalar(v, f"{where}.rate")
                try:
                    rate = parse_rate(text) if text is not None else None
                except ValueError as exc:
                    self.err(v, f"{where}.rate: {exc}")
                    ok = False
            elif key == "burst":
                text = self.scalar(v, f"{where}.burst")
                if text is None or not text.isdigit() or int(text) < 1:
                    self.err(v, f"{where}.burst must be a whole number >= 1, got {text!r}")
                    ok = False
                else:
                    burst = int(text)
            elif key == "on_limit":
                text = self.scalar(v, f"{where}.on_limit")
                if text not in ("delay", "dead_letter"):
                    self.err(v, f"{where}.on_limit must be 'delay' or 'dead_letter', got {text!r}")
                    ok = False
                else:
                    on_limit = text
            else:
                self.err(k, f"{where}: unknown key {key!r}; expected rate, burst, on_limit")
                ok = False
        if rate is None and ok:
            self.err(node, f"{where} needs a rate, e.g. rate: 10/s")
            return None
        if not ok or rate is None:
            return None
        return RateLimit(rate, burst if burst is not None else max(1, int(rate)), on_limit)


def parse_rules(text: str, file: str = "<rules>") -> RouterRules:
    """Parse and validate rules text; raise :class:`RulesError` listing every problem."""
    w = _Walker(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise RulesError([ConfigIssue(file, line, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if root is None:
        return RouterRules(source=file)
    overrides: dict[str, str] = {}
    tier_limits: dict[str, RateLimit] = {}
    worker_limits: dict[str, RateLimit] = {}
    fallback: dict[str, tuple[str, ...]] = {}
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
                        lim = w.limit(tv, f"rate_limits.tiers.{tk.value}")
                        if lim:
                            tier_limits[tk.value] = lim
                elif rk.value == "workers":
                    for wk, wv in w.mapping(rv, "rate_limits.workers"):
                        lim = w.limit(wv, f"rate_limits.workers.{wk.value}")
                        if lim:
                            worker_limits[wk.value] = lim
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
                if grace < 0:
                    raise ValueError
            except ValueError:
                w.err(v, f"{key} must be a number of seconds >= 0, got {grace_text!r}")
        else:
            w.err(k, f"unknown key {key!r}; expected one of {', '.join(_TOP_KEYS)}")
    if w.issues:
        raise RulesError(w.issues)
    return RouterRules(overrides, tier_limits, worker_limits, fallback, grace, file)


def load_rules(path: str | os.PathLike[str]) -> RouterRules:
    """Read and validate a rules file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RulesError([ConfigIssue(str(p), 1, f"cannot read: {exc.strerror}")]) from None
    return parse_rules(text, str(p))


def find_rules_path(explicit: str | None) -> Path | None:
    """``--rules PATH``, else ``$HEDDLE_ROUTER_RULES``, else ``configs/router_rules.yaml`` if present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("HEDDLE_ROUTER_RULES")
    if env:
        return Path(env)
    return DEFAULT_RULES_PATH if DEFAULT_RULES_PATH.exists() else None
