"""The Workshop: a web UI to watch, try and replay (``heddle workshop``; inside ``heddle dev``).

Needs the ``workshop`` extra (Starlette, Jinja2, uvicorn, python-multipart).
"""

from __future__ import annotations

from heddle.workshop.server import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, Workshop, check_bind, is_loopback

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "TOKEN_ENV", "Workshop", "check_bind", "is_loopback"]
