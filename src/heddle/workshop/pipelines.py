"""Workshop "Pipelines" page: YAML pipelines as stage graphs, run live (being written)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from heddle.workshop.web import Pages


def routes(pages: Pages) -> list[BaseRoute]:
    """The Pipelines page's routes."""
    return []
