"""Command line: ``heddle worker``, ``heddle dev`` and the ``heddle-worker`` shortcut."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.table import Table

from heddle import names
from heddle.app import Heddle
from heddle.errors import ConfigError, HeddleError

if TYPE_CHECKING:
    from heddle.worker import Worker

console = Console(stderr=True)


def load_app(spec: str) -> Heddle:
    """Import ``module[:attribute]`` and return its :class:`Heddle` app."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import {module_name!r} given to -A: {exc}. Run from the directory that "
            f"contains it, or add that directory to PYTHONPATH"
        ) from exc
    if attr:
        obj = getattr(module, attr, None)
        if not isinstance(obj, Heddle):
            raise ConfigError(f"{module_name}:{attr} is {type(obj).__name__}, not a heddle.Heddle app")
        return obj
    apps = {k: v for k, v in vars(module).items() if isinstance(v, Heddle)}
    if "app" in apps:
        return apps["app"]
    if len(apps) == 1:
        return next(iter(apps.values()))
    if not apps:
        raise ConfigError(
            f"module {module_name!r} defines no heddle.Heddle app; add `app = heddle.Heddle('name')` "
            f"or point -A at module:attribute"
        )
    raise ConfigError(
        f"module {module_name!r} defines several apps ({', '.join(sorted(apps))}); "
        f"choose one with -A {module_name}:NAME"
    )


def banner(app: Heddle, concurrency: int, extra: dict[str, str] | None = None) -> None:
    """Print the start-up banner: where we connect, what we run, on which subjects."""
    console.print(f"[bold]heddle worker[/] [cyan]{app.name}[/]  concurrency={concurrency}")
    console.print(f"  nats   {app.settings.nats_url}")
    console.print(f"  valkey {app.settings.valkey_url}")
    for k, v in (extra or {}).items():
        console.print(f"  {k:<6} {v}")
    table = Table(title=f"tasks ({len(app.tasks)})", show_lines=False)
    table.add_column("task")
    table.add_column("kind")
    table.add_column("retries")
    table.add_column("timeout")
    table.add_column("subject")
    for name, t in sorted(app.tasks.items()):
        tier = t.options.tier or app.settings.default_tier
        table.add_row(
            name,
            "async" if t.is_async else "sync",
            str(t.options.retries),
            f"{t.options.timeout:g}s" if t.options.timeout else "-",
            names.task_subject(app.worker_type, tier),
        )
    console.print(table)
    console.print(
        f"  subjects {names.worker_filter(app.worker_type)} "
        f"(durable consumer {names.consumer_name(app.worker_type)})"
    )


def _install_loop_policy() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Actor(Protocol):
    """A loop hosted by an actor process: the worker, the router, the orchestrator."""

    ready: asyncio.Event

    async def run(self) -> None: ...

    def request_stop(self) -> None: ...


def _make_router(app: Heddle, args: argparse.Namespace) -> Actor:
    from heddle.router import Router
    from heddle.rules import find_rules_path

    path = find_rules_path(getattr(args, "rules", None))
    if path is not None:
        console.print(f"  router rules {path} (reloaded on change and on SIGHUP)")
    return Router(app, rules_path=path)


def hosted_actors(app: Heddle, args: argparse.Namespace) -> list[Actor]:
    """Loops a worker process hosts next to its worker (router, orchestrator), per flags."""
    actors: list[Actor] = []
    if not getattr(args, "no_router", False):
        actors.append(_make_router(app, args))
    return actors


async def serve(app: Heddle, args: argparse.Namespace) -> Worker:
    """Run a worker (and the loops it hosts) until SIGTERM/SIGINT, then drain all of them."""
    from heddle.worker import Worker

    worker = Worker(app, concurrency=args.concurrency, grace_s=args.grace, tier=getattr(args, "tier", None))
    actors: list[Actor] = [worker, *hosted_actors(app, args)]

    def stop_all() -> None:
        for actor in actors:
            actor.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    runs = [asyncio.ensure_future(a.run()) for a in actors]
    try:
        done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_EXCEPTION)
        if any(not t.cancelled() and t.exception() is not None for t in done):
            stop_all()  # one loop failed (e.g. at start-up): stop and drain the others
        await asyncio.gather(*runs)
    finally:
        await app.aclose()
    return worker


def _exit_if_threads_abandoned(worker: Worker) -> None:
    """Exit now if sync tasks outlived the grace period (their messages are already nak'd).

    Their threads cannot be stopped, and a normal interpreter exit would wait for
    them, holding the process (and a rolling update) for as long as the task runs.
    """
    if worker.abandoned_threads:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _worker_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a Heddle worker for an app's tasks.")
    _add_worker_args(p)
    return p


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-A", "--app", required=True, help="module[:attribute] holding the heddle.Heddle app")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="most tasks in flight (default 16)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight tasks get on shutdown")
    p.add_argument("--reload", action="store_true", help="restart when .py files change (development)")
    p.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--quiet", action="store_true", help="no start-up banner")
    _add_router_args(p)


def _add_router_args(p: argparse.ArgumentParser, hosted: bool = True) -> None:
    p.add_argument(
        "--rules",
        help="router rules YAML (default: $HEDDLE_ROUTER_RULES, else configs/router_rules.yaml if present)",
    )
    if hosted:
        p.add_argument("--no-router", action="store_true", help="do not host a router loop in this process")


def _run_worker(args: argparse.Namespace, argv_for_reload: Sequence[str]) -> int:
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.reload:
        import watchfiles

        cmd = [sys.executable, "-m", "heddle", "worker", *[a for a in argv_for_reload if a != "--reload"]]
        console.print(f"[yellow]reloading on changes under {os.getcwd()}[/]")
        watchfiles.run_process(
            os.getcwd(),
            target=shlex.join(cmd),
            target_type="command",
            watch_filter=watchfiles.PythonFilter(),
        )
        return 0
    app = load_app(args.app)
    if not args.quiet:
        banner(app, args.concurrency)
    _install_loop_policy()
    worker = asyncio.run(serve(app, args))
    _exit_if_threads_abandoned(worker)
    return 0


def _run_dev(args: argparse.Namespace) -> int:
    from heddle.testing.servers import EmbeddedServers

    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with EmbeddedServers() as servers:
        os.environ["NATS_URL"] = servers.nats_url
        os.environ["VALKEY_URL"] = servers.valkey_url
        console.print("[bold green]heddle dev[/]: embedded servers running")
        console.print(f"  NATS_URL={servers.nats_url}")
        console.print(f"  VALKEY_URL={servers.valkey_url}")
        console.print("  export these in another shell to send tasks; Ctrl-C stops everything")
        app = load_app(args.app)
        app.configure(nats_url=servers.nats_url, valkey_url=servers.valkey_url)
        if not args.quiet:
            banner(app, args.concurrency)
        _install_loop_policy()
        worker = asyncio.run(serve(app, args))
    console.print("heddle dev: stopped")
    _exit_if_threads_abandoned(worker)
    return 0


def _run_router(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Heddle("router")
    router = _make_router(app, args)
    console.print(f"[bold]heddle router[/]  nats {app.settings.nats_url}  valkey {app.settings.valkey_url}")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, router.request_stop)
        try:
            await router.run()
        finally:
            await app.aclose()

    _install_loop_policy()
    asyncio.run(run())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``heddle`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="heddle", description="Heddle task queue.")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run a worker for an app's tasks")
    _add_worker_args(w)
    d = sub.add_parser("dev", help="embedded nats-server + valkey-server + a worker, one command")
    d.add_argument("-A", "--app", required=True, help="module[:attribute] holding the heddle.Heddle app")
    d.add_argument("-c", "--concurrency", type=int, default=16)
    d.add_argument("--grace", type=float, default=10.0)
    d.add_argument("--loglevel", default="INFO")
    d.add_argument("--quiet", action="store_true")
    _add_router_args(d)
    r = sub.add_parser("router", help="run a router: heddle.tasks.incoming -> worker subjects")
    _add_router_args(r, hosted=False)
    r.add_argument("--loglevel", default="INFO")
    dlq = sub.add_parser("dlq", help="list, show and replay dead-lettered messages")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dl = dlq_sub.add_parser("list", help="list dead letters")
    dl.add_argument("--limit", type=int, default=50, help="newest N (default 50)")
    ds = dlq_sub.add_parser("show", help="show one dead letter")
    ds.add_argument("id", type=int, help="dead-letter id (its sequence number, from `heddle dlq list`)")
    dr = dlq_sub.add_parser("replay", help="send dead letters back to the router")
    dr.add_argument("id", type=int, nargs="?", help="dead-letter id")
    dr.add_argument("--all", action="store_true", help="replay every dead letter")
    args = parser.parse_args(argv)
    return _dispatch(args, argv[1:])


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``heddle-worker`` command (same as ``heddle worker``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _worker_parser("heddle-worker").parse_args(argv)
    args.command = "worker"
    return _dispatch(args, argv)


def _dispatch(args: Any, rest: Sequence[str]) -> int:
    try:
        if args.command == "worker":
            return _run_worker(args, rest)
        if args.command == "dev":
            return _run_dev(args)
        if args.command == "router":
            return _run_router(args)
        if args.command == "dlq":
            from heddle.dlq import run_dlq_command

            return run_dlq_command(args, console)
    except HeddleError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
