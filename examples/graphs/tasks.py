"""Tasks for the task-graph example: ``heddle-worker -A tasks`` runs them and the graphs."""

from __future__ import annotations

import asyncio
from typing import Any

import heddle

app = heddle.Heddle("graphs_example")  # NATS_URL / VALKEY_URL from the environment

PAGES = {
    "a": "Heddles lift warp threads. The shuttle passes the weft.",
    "b": "A loom weaves cloth. Heddles and reeds guide the threads. Patterns emerge.",
    "c": "Celery chains tasks.",
}


@app.task
async def fetch(page: str) -> str:
    """Pretend to download a page."""
    await asyncio.sleep(0.01)
    return PAGES[page]


@app.task
def word_count(text: str) -> int:
    return len(text.split())


@app.task
def describe(count: int, unit: str = "words") -> str:
    return f"{count} {unit}"


@app.task
def score(page: str) -> dict[str, Any]:
    """Score one page: its sentence count."""
    return {"page": page, "sentences": PAGES[page].count(".")}


@app.task
def rank(scores: list[dict[str, Any]]) -> list[str]:
    """The chord's body: called once with every score, in order."""
    return [s["page"] for s in sorted(scores, key=lambda s: -s["sentences"])]


@app.task
def square(x: int) -> int:
    return x * x


@app.task
def parse_int(text: str) -> int:
    return int(text)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def use_default(failure: dict[str, Any], default: int) -> int:
    """An error callback: gets the failure, returns a value that stands in for the node's."""
    return default
