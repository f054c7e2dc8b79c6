"""Task graphs: chain, group, chord, map and error callbacks on embedded servers.

Run it with ``python examples/graphs/run.py``. It starts real servers, one
``heddle worker -A tasks`` process (which also hosts the router and an
orchestrator, so it runs graphs on its own), submits graphs the ways a Celery
user would, prints what comes back, and stops it all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heddle.testing import EmbeddedServers, heddle_process  # noqa: E402

console = Console()



def demo() -> None:
    from tasks import add, app, describe, fetch, parse_int, rank, score, square, use_default, word_count

    import heddle
    from heddle import chain, chord, group

    console.rule("[bold]chain: each result is the first argument of the next step")
    r = chain(fetch.s("b"), word_count.s(), describe.s())
    result = r.delay()
    console.print(f"fetch | word_count | describe = {result.get(timeout=20)!r}")
    console.print(f"  node results: {[c.get(timeout=5) for c in result.children][1:]}", markup=False)
    piped = (fetch.s("c") | word_count.s() | describe.s(unit="tokens")).delay()
    console.print(f"with | : {piped.get(timeout=20)!r}")

    console.rule("[bold]group: parallel, results in order")
    console.print(f"group(score) = {group(score.s(p) for p in 'abc').delay().get(timeout=20)}", markup=False)

    console.rule("[bold]chord: the body gets every header result")
    ranked = chord(group(score.s(p) for p in "abc"), rank.s()).delay()
    console.print(f"chord(score..., rank) = {ranked.get(timeout=20)}", markup=False)

    console.rule("[bold]map and starmap")
    console.print(f"square.map(range(5)) = {square.map(range(5)).delay().get(timeout=20)}", markup=False)
    pairs = add.starmap([(1, 2), (3, 4)]).delay().get(timeout=20)
    console.print(f"add.starmap([(1, 2), (3, 4)]) = {pairs}", markup=False)

    console.rule("[bold]errors")
    saved = (parse_int.s("forty-two").on_error(use_default.s(42)) | add.s(1)).delay()
    console.print(f"parse_int('forty-two') with an error callback, then +1 = {saved.get(timeout=20)}")
    failing = (parse_int.s("x") | add.s(1)).delay()
    try:
        failing.get(timeout=20)
    except heddle.TaskError as exc:
        console.print(f"without one the graph fails: [red]{exc.type_name}: {exc.remote_message}[/]")
    console.print(f"goal state: {app.AsyncResult(failing.id).state}")
    app.close()


def main() -> None:
    with EmbeddedServers() as servers:
        console.print(f"[green]nats-server[/]   {servers.nats_url}")
        console.print(f"[green]valkey-server[/] {servers.valkey_url}")
        os.environ["NATS_URL"] = servers.nats_url
        os.environ["VALKEY_URL"] = servers.valkey_url
        log_path = Path(servers.nats.data_dir) / "worker.log"
        worker_cmd = ["worker", "-A", "tasks", "--quiet"]
        ready = ["taking goals from", "consuming heddle.tasks.graphs_example"]  # log lines that say it serves
        with heddle_process(worker_cmd, cwd=HERE, log_path=log_path, ready=ready) as worker:
            console.print(f"[green]worker[/] pid {worker.pid} (heddle worker -A tasks: worker, router, orchestrator)")
            demo()
        console.print(f"worker stopped (exit {worker.returncode}); stopping servers")
    console.print("[bold green]graphs example done[/]")


if __name__ == "__main__":
    main()
