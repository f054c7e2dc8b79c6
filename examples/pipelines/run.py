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
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heddle.testing import EmbeddedServers  # noqa: E402

console = Console()


def wait_for_line(log_path: Path, proc: subprocess.Popen[bytes], text: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited early:\n{log_path.read_text()}")
        if text in log_path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise SystemExit(f"worker did not start:\n{log_path.read_text()}")


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

    from heddle.pipeline import load_pipeline

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
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "heddle", "worker", "-A", "tasks", "--quiet"],
                cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_for_line(log_path, worker, "taking goals from")
            wait_for_line(log_path, worker, "consuming heddle.tasks.pipelines_example")
            console.print(f"[green]worker[/] pid {worker.pid} (heddle worker -A tasks: worker, router, orchestrator)")
            demo()
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(30)
            console.print(f"worker stopped (exit {code})")
    console.print("[bold green]pipelines example done[/]")


if __name__ == "__main__":
    main()
