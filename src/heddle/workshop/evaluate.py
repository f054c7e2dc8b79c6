"""Workshop "Evaluate" page: run a worker against a JSON test suite and compare runs (being written)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from heddle.workshop.web import Pages


def routes(pages: Pages) -> list[BaseRoute]:
    """The Evaluate page's routes."""
    return []
