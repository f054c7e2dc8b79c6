"""What every ``heddle`` command shares: the console, actor options and the pre-flight check."""

from __future__ import annotations

import argparse

from rich.console import Console

from heddle.app import Heddle
from heddle.redact import redact

console = Console(stderr=True)


def port_number(text: str) -> int:
    """argparse type of a TCP port number."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port number (0-65535), got {text!r}")
    return int(text)


def add_actor_args(p: argparse.ArgumentParser) -> None:
    """Options every actor command takes: pre-flight checks and the health server's port."""
    p.add_argument(
        "--skip-preflight", action="store_true", help="start without first checking NATS, JetStream and Valkey"
    )
    p.add_argument(
        "--health-port",
        type=port_number,
        default=None,
        help="serve /healthz, /readyz and /metrics on this port (default $HEDDLE_HEALTH_PORT; none if unset)",
    )


def preflight(args: argparse.Namespace, app: Heddle, *, valkey: bool = True) -> None:
    """Check NATS, JetStream (and Valkey) before an actor starts, unless --skip-preflight."""
    if getattr(args, "skip_preflight", False):
        return
    from rich.text import Text

    from heddle.errors import PreflightError
    from heddle.preflight import require

    try:
        require(app.settings, valkey=valkey)
    except PreflightError as exc:
        # Unwrapped: the report's lines are long (URLs) and must stay greppable.
        console.print(Text.assemble(("error: ", "bold red"), redact(str(exc))), soft_wrap=True)
        raise SystemExit(2) from None
