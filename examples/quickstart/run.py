"""Quickstart: embedded nats-server + valkey-server, one worker process, some tasks.

Run it with ``python examples/quickstart/run.py``. It starts real servers on
free loopback ports, starts ``heddle worker -A tasks`` against them, sends
tasks the ways a Celery user would, prints what comes back, and stops it all.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heddle.testing import EmbeddedServers, heddle_process  # noqa: E402

console = Console()



def demo() -> None:
    from tasks import add, app, divide, flaky_fetch, slow_echo

    import heddle

    console.rule("[bold]sync caller")
    r = add.delay(2, 3)
    console.print(f"add.delay(2, 3).get() = {r.get(timeout=10)}   state={r.state}  id={r.id}")

    r = add.apply_async((40, 2), task_id="quickstart-order-17")
    again = add.apply_async((40, 2), task_id="quickstart-order-17")  # deduplicated
    console.print(f"caller-chosen id {r.id}: {r.get(timeout=10)} (sent twice, ran once: {again.get(timeout=10)})")

    try:
        divide.delay(1, 0).get(timeout=10)
    except heddle.TaskError as exc:
        console.print(f"divide(1, 0) failed remotely: [red]{exc.type_name}: {exc.remote_message}[/]")

    r = flaky_fetch.delay("https://example.invalid/data", 0.5)
    try:
        console.print(f"flaky_fetch after retries: {r.get(timeout=20)} (retries used: {r.record.retries})")
    except heddle.TaskError as exc:
        console.print(f"flaky_fetch gave up after retries: {exc.remote_message}")

    console.rule("[bold]async caller")

    async def async_part() -> None:
        t0 = time.monotonic()
        r = slow_echo.apply_async(("hello later",), countdown=1.0)
        console.print(f"countdown=1.0 -> {await r.aget(timeout=10)!r} after {time.monotonic() - t0:.2f}s")

        r = slow_echo.apply_async(("never",), countdown=5.0)
        await r.arevoke()
        console.print(f"revoked before it ran: state={await r.astate()}")

        n = 2000
        with Progress(console=console) as progress:
            bar = progress.add_task(f"{n} tasks", total=n)
            t0 = time.monotonic()
            results = [add.apply_async((i, i)) for i in range(n)]
            for res in results:
                await res.aget(timeout=60)
                progress.advance(bar)
        elapsed = time.monotonic() - t0
        console.print(f"{n} tasks round trip in {elapsed:.2f}s ({n / elapsed:,.0f} tasks/s)")
        await app.aclose()

    asyncio.run(async_part())
    app.close()


def main() -> None:
    with EmbeddedServers() as servers:
        console.print(f"[green]nats-server[/]   {servers.nats_url}")
        console.print(f"[green]valkey-server[/] {servers.valkey_url}")
        os.environ["NATS_URL"] = servers.nats_url
        os.environ["VALKEY_URL"] = servers.valkey_url
        log_path = Path(servers.nats.data_dir) / "worker.log"
        worker_cmd = ["worker", "-A", "tasks", "--concurrency", "32"]
        ready = [" consuming "]  # log lines that say it serves
        with heddle_process(worker_cmd, cwd=HERE, log_path=log_path, ready=ready) as worker:
            console.print(f"[green]worker[/]        pid {worker.pid} (heddle worker -A tasks)")
            demo()
        console.print(f"worker stopped (exit {worker.returncode}); stopping servers")
    console.print("[bold green]quickstart done[/]")


if __name__ == "__main__":
    main()
