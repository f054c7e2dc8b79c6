"""Python tasks for the pipeline example (``task:`` stages get their input as keyword arguments).

A stage can also name a YAML LLM worker with ``worker_type:``; it then gets its
input as one dict. These stand in for such workers so the example runs anywhere.
"""

from __future__ import annotations

import asyncio
from typing import Any

import heddle

app = heddle.Heddle("pipelines_example")  # NATS_URL / VALKEY_URL from the environment

KNOWN_FACTS = {"water boils at 100 c at sea level", "the moon orbits the earth"}


@app.task
def extract_claims(text: str) -> dict[str, Any]:
    claims = [s.strip().lower() for s in text.replace("!", ".").split(".") if s.strip()]
    return {"claims": claims, "count": len(claims)}


@app.task
async def check_facts(claims: list[str]) -> dict[str, Any]:
    await asyncio.sleep(0.3)  # a slow lookup, run in parallel with `tone`
    return {
        "supported": [c for c in claims if c in KNOWN_FACTS],
        "unsupported": [c for c in claims if c not in KNOWN_FACTS],
    }


@app.task
async def tone(text: str) -> dict[str, Any]:
    await asyncio.sleep(0.3)
    return {"label": "excited" if "!" in text else "calm"}


@app.task
def escalate(claims: list[str]) -> dict[str, Any]:
    return {"ticket": f"REVIEW-{len(claims)}", "claims": claims}


@app.task
def report(checked: dict[str, Any], tone: str, source: str) -> str:
    return (
        f"[{source}] {len(checked['supported'])} supported, {len(checked['unsupported'])} unsupported, "
        f"tone {tone}"
    )
