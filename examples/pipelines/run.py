"""A YAML pipeline: validate it, submit it with `heddle submit`, and run it from Python.

Run it with ``python examples/pipelines/run.py``. It starts embedded servers and
one ``heddle worker -A tasks`` process (worker, router and orchestrator), then:

1. ``heddle validate claims.yaml``;
2. ``heddle submit claims.yaml -A tasks --input '{...}'``: live per-stage
   progress, then the timeline and the output;
3. the same pipeline from Python with an input that makes the conditional
   ``escalate`` stage skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heddle.testing import EmbeddedServers, heddle_process  # noqa: E402

console = Console()



def heddle_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "heddle", *args]
    console.print(f"[bold]$ heddle {' '.join(args)}[/]")
    out = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "120"})
    sys.stdout.write(out.stdout)
    sys.stdout.flush()
    return out


def demo() -> None:
    from tasks import app

    from heddle.graphs.pipeline import load_pipeline

    console.rule("[bold]validate")
    if heddle_cli("validate", "claims.yaml").returncode != 0:
        raise SystemExit("claims.yaml is invalid")

    console.rule("[bold]heddle submit")
    text = "The moon orbits the earth. Cheese is made of moonlight!"
    out = heddle_cli("submit", "claims.yaml", "-A", "tasks", "--timeout", "60",
                     "--input", json.dumps({"text": text}))
    if out.returncode != 0:
        raise SystemExit(f"submit failed:\n{out.stderr}")

    console.rule("[bold]from Python")
    pipeline = load_pipeline(HERE / "claims.yaml")
    result = pipeline.apply_async({"text": "Water boils at 100 C at sea level."}, app=app)
    console.print(f"output: {result.get(timeout=60)}", markup=False)
    for row in result.timeline():
        wall = f"{row['wall_s']:.3f}s" if row["wall_s"] is not None else "-"
        console.print(f"  {row['name']:<9} {row['state']:<10} {wall:>7}  {row.get('reason', '')}", markup=False)
    app.close()


def main() -> None:
    with EmbeddedServers() as servers:
        os.environ["NATS_URL"] = servers.nats_url
        os.environ["VALKEY_URL"] = servers.valkey_url
        log_path = Path(servers.nats.data_dir) / "worker.log"
        worker_cmd = ["worker", "-A", "tasks", "--quiet"]
        ready = ["taking goals from", "consuming heddle.tasks.pipelines_example"]  # log lines that say it serves
        with heddle_process(worker_cmd, cwd=HERE, log_path=log_path, ready=ready) as worker:
            console.print(f"[green]worker[/] pid {worker.pid} (heddle worker -A tasks: worker, router, orchestrator)")
            demo()
        console.print(f"worker stopped (exit {worker.returncode}); stopping servers")
    console.print("[bold green]pipelines example done[/]")


if __name__ == "__main__":
    main()
