"""``heddle workshop``: serve the Workshop (imports nothing web-related until it runs)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from heddle.errors import ConfigError
from heddle.redact import redact

_MISSING_EXTRA = "the Workshop needs its extra: pip install 'heddle[workshop]' ({})"


def add_workshop_command(sub: Any, add_actor_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``heddle workshop`` to the ``heddle`` parser."""
    w = sub.add_parser("workshop", help="web UI: overview, tasks, try a worker, dead letters")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; anything "
                   "else asks for HEDDLE_WORKSHOP_TOKEN, or, when it is unset, for a token the Workshop makes "
                   "and logs as a login URL)")
    w.add_argument("--port", type=int, default=None,
                   help="TCP port (default 8080, or a free one when 8080 is taken)")
    w.add_argument("--configs", action="append", type=Path, default=None,
                   help="directory of YAML worker configs and pipelines (repeatable; default configs/)")
    w.add_argument("--eval-db", type=Path, default=None, metavar="PATH",
                   help="SQLite file of the Evaluate page's runs (default .heddle/workshop.sqlite3)")
    w.add_argument("--loglevel", default="INFO")
    add_actor_args(w)


def add_dev_workshop_args(p: argparse.ArgumentParser) -> None:
    """``heddle dev`` options for its hosted Workshop."""
    p.add_argument("--no-workshop", action="store_true", help="do not serve the Workshop")
    p.add_argument("--workshop-port", type=int, default=None,
                   help="Workshop port on 127.0.0.1 (default 8080, or a free one when 8080 is taken)")


def dev_workshop(args: argparse.Namespace) -> Any:
    """The Workshop ``heddle dev`` hosts (None with --no-workshop or without the extra)."""
    if getattr(args, "no_workshop", False):
        return None
    port = getattr(args, "workshop_port", None)
    try:
        # The web modules (jinja2, starlette) are imported when a Workshop is made.
        from heddle.workshop.server import DEFAULT_PORT, Workshop

        ws = Workshop(port=DEFAULT_PORT if port is None else port, port_flag="--workshop-port",
                      fallback_port=port is None)
    except ImportError as exc:
        logging.getLogger("heddle.workshop").warning(
            "%s; heddle dev goes on without it", _MISSING_EXTRA.format(exc))
        return None
    ws.bind()  # so the URL shown is the one served
    return ws


def run_workshop_command(args: argparse.Namespace) -> int:
    """Serve the Workshop until SIGINT/SIGTERM."""
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    try:
        # The web modules (jinja2, starlette) are imported when a Workshop is made.
        from heddle.workshop.server import DEFAULT_PORT, Workshop

        ws = Workshop(host=args.host, port=DEFAULT_PORT if args.port is None else args.port,
                      config_dirs=args.configs, eval_db=args.eval_db, fallback_port=args.port is None)
    except ImportError as exc:
        raise ConfigError(_MISSING_EXTRA.format(exc)) from None
    from heddle.cli.common import preflight
    from heddle.runtime import run_actor_process

    preflight(args, ws.app)
    ws.bind()  # before the URL is shown: a taken port fails here, naming --port
    print(f"heddle workshop on {ws.url}  (nats {redact(ws.app.settings.nats_url)})", flush=True)

    run_actor_process(ws.app, ws, args.health_port)
    return 0
