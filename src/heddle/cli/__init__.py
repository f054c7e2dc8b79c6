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
from rich.markup import escape
from rich.table import Table

from heddle import names
from heddle.app import Heddle
from heddle.errors import BrokerUnavailable, ConfigError, HeddleError
from heddle.health import redact_text, start_health_server
from heddle.redact import redact

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
        obj.include(module)  # the module's shared @heddle.task tasks belong to the app -A names
        return obj
    apps = {k: v for k, v in vars(module).items() if isinstance(v, Heddle)}
    chosen = apps.get("app") or (next(iter(apps.values())) if len(apps) == 1 else None)
    if chosen is not None:
        chosen.include(module)
        return chosen
    if not apps:
        raise ConfigError(
            f"module {module_name!r} defines no heddle.Heddle app; add `app = heddle.Heddle('name')` "
            f"or point -A at module:attribute"
        )
    raise ConfigError(
        f"module {module_name!r} defines several apps ({', '.join(sorted(apps))}); "
        f"choose one with -A {module_name}:NAME"
    )


def banner(app: Heddle, concurrency: int, extra: dict[str, str] | None = None, tier: str | None = None) -> None:
    """Print the start-up banner: where we connect, what we run, on which subjects."""
    console.print(f"[bold]heddle worker[/] [cyan]{app.name}[/]  concurrency={concurrency}")
    console.print(f"  nats   {redact(app.settings.nats_url)}", markup=False)
    console.print(f"  valkey {redact(app.settings.valkey_url)}", markup=False)
    for k, v in (extra or {}).items():
        console.print(f"  {k:<6} {redact(str(v))}", markup=False)
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
        f"  subjects {names.worker_filter(app.worker_type, tier)} "
        f"(durable consumer {names.consumer_name(app.worker_type, tier)})"
    )


def _install_loop_policy() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Actor(Protocol):
    """A loop hosted by an actor process: the worker, the router, the orchestrator."""

    ready: asyncio.Event

    @property
    def last_tick(self) -> float:
        """Monotonic time the actor's message loop last went round (``/healthz``)."""
        ...

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
    actors.extend(getattr(args, "llm_workers", []))  # heddle dev: the other --config workers
    workshop = getattr(args, "workshop", None)  # heddle dev: the Workshop web UI
    if workshop is not None:
        actors.append(workshop)
    from heddle.graph_cli import make_orchestrator

    orchestrator = make_orchestrator(app, args)  # unless --no-orchestrator
    if orchestrator is not None:
        actors.append(orchestrator)
    return actors


async def run_actors(app: Heddle, actors: list[Actor], health_port: int | None) -> None:
    """Run actors until SIGTERM/SIGINT, then drain all of them; health and metrics served meanwhile.

    If one actor fails (at start-up, say), the others are stopped and drained too.
    """
    health = await start_health_server(actors, app.settings, health_port)

    def stop_all() -> None:
        if health is not None:
            health.mark_draining()
        for actor in actors:
            actor.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    runs = [asyncio.ensure_future(a.run()) for a in actors]
    lost = asyncio.ensure_future(_bus_lost(actors))
    try:
        pending: set[asyncio.Future[Any]] = {*runs, lost}
        while not all(r.done() for r in runs):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                stop_all()
                break
        await asyncio.gather(*runs)
        if lost.done() and not lost.cancelled() and lost.exception() is not None:
            raise lost.exception()  # type: ignore[misc]
    finally:
        lost.cancel()
        if health is not None:
            await health.stop()
        await app.aclose()


async def _bus_lost(actors: list[Actor]) -> None:
    """Raise once any actor's NATS connection is closed for good (nats-py will not reconnect).

    The process cannot do its work again: it drains and exits with the error, so a
    supervisor (Kubernetes, systemd) starts a fresh one.
    """
    while True:
        brokers = {id(c.broker): c.broker for a in actors if (c := getattr(a, "conns", None)) is not None}
        for broker in brokers.values():
            if broker.lost:
                raise BrokerUnavailable(f"{redact_text(broker.lost, broker.url)}; exiting so it can be restarted")
        waits = [asyncio.ensure_future(b.lost_event.wait()) for b in brokers.values()]
        # Actors connect after start-up: look again now and then for new connections.
        waits.append(asyncio.ensure_future(asyncio.sleep(1.0)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def run_actor_process(app: Heddle, actor: Actor, health_port: int | None) -> None:
    """The main loop of a one-actor process (``heddle router``, ``orchestrator``, ``workshop``)."""
    _install_loop_policy()
    asyncio.run(run_actors(app, [actor], health_port))


async def serve(app: Heddle, args: argparse.Namespace) -> Worker:
    """Run a worker (and the loops it hosts) until SIGTERM/SIGINT, then drain all of them."""
    from heddle.worker import Worker

    worker = Worker(app, concurrency=args.concurrency, grace_s=args.grace, tier=getattr(args, "tier", None))
    await run_actors(app, [worker, *hosted_actors(app, args)], getattr(args, "health_port", None))
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
    from heddle.llm.commands import add_worker_source_args

    p.add_argument("-A", "--app", default=None, help="module[:attribute] holding the heddle.Heddle app (or --config)")
    add_worker_source_args(p)
    p.add_argument("-c", "--concurrency", type=int, default=16, help="most tasks in flight (default 16)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight tasks get on shutdown")
    p.add_argument("--reload", action="store_true", help="restart when .py files change (development)")
    p.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--quiet", action="store_true", help="no start-up banner")
    _add_router_args(p)
    from heddle.graph_cli import add_orchestrator_args

    add_orchestrator_args(p)  # --no-orchestrator, --max-concurrent-goals
    add_actor_args(p)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port number (0-65535), got {text!r}")
    return int(text)


def add_actor_args(p: argparse.ArgumentParser) -> None:
    """Options every actor command takes: pre-flight checks and the health server's port."""
    p.add_argument(
        "--skip-preflight", action="store_true", help="start without first checking NATS, JetStream and Valkey"
    )
    p.add_argument(
        "--health-port",
        type=_port,
        default=None,
        help="serve /healthz, /readyz and /metrics on this port (default $HEDDLE_HEALTH_PORT; none if unset)",
    )


def preflight(args: argparse.Namespace, app: Heddle, *, valkey: bool = True) -> None:
    """Check NATS, JetStream (and Valkey) before an actor starts, unless --skip-preflight."""
    if getattr(args, "skip_preflight", False):
        return
    from rich.text import Text

    from heddle.errors import PreflightError
    from heddle.preflight import require

    try:
        require(app.settings, valkey=valkey)
    except PreflightError as exc:
        # Unwrapped: the report's lines are long (URLs) and must stay greppable.
        console.print(Text.assemble(("error: ", "bold red"), redact(str(exc))), soft_wrap=True)
        raise SystemExit(2) from None


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
    from heddle.llm.commands import worker_from_args

    app, extra = worker_from_args(args, load_app)  # -A module, or --config / WORKER_CONFIG (LLM worker)
    preflight(args, app)
    if not args.quiet:
        banner(app, args.concurrency, extra, tier=args.tier)
    _install_loop_policy()
    worker = asyncio.run(serve(app, args))
    _exit_if_threads_abandoned(worker)
    return 0


def _run_dev(args: argparse.Namespace) -> int:
    from heddle.testing.servers import EmbeddedServers

    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from heddle.llm.commands import DevLLM

    with EmbeddedServers() as servers, DevLLM(args, console.print) as llm:
        os.environ["NATS_URL"] = servers.nats_url
        os.environ["VALKEY_URL"] = servers.valkey_url
        console.print("[bold green]heddle dev[/]: embedded servers running")
        console.print(f"  NATS_URL={redact(servers.nats_url)}", markup=False)
        console.print(f"  VALKEY_URL={redact(servers.valkey_url)}", markup=False)
        console.print("  export these in another shell to send tasks; Ctrl-C stops everything")
        app, args.llm_workers = llm.split(args, load_app(args.app) if args.app else None)
        app.configure(nats_url=servers.nats_url, valkey_url=servers.valkey_url)
        llm.configure(servers.nats_url, servers.valkey_url)
        from heddle.workshop.cli import dev_workshop

        args.workshop = dev_workshop(args)  # None with --no-workshop
        if args.workshop is not None:
            console.print(f"  Workshop {redact(args.workshop.url)}", markup=False)
        if not args.quiet:
            banner(app, args.concurrency, tier=args.tier)
        _install_loop_policy()
        worker = asyncio.run(serve(app, args))
    console.print("heddle dev: stopped")
    _exit_if_threads_abandoned(worker)
    return 0


def _run_router(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Heddle("router")
    preflight(args, app)
    router = _make_router(app, args)
    console.print(
        f"[bold]heddle router[/]  nats {escape(redact(app.settings.nats_url))}  "
        f"valkey {escape(redact(app.settings.valkey_url))}"
    )

    run_actor_process(app, router, args.health_port)
    return 0


def _run_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 if the local health server says live (or ready), else 1 (Docker reserves 2)."""
    from heddle.health import probe
    from heddle.settings import Settings

    try:
        port = args.port if args.port is not None else Settings.load().health_port
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if port is None:
        print("unhealthy: no health port; pass --port or set HEDDLE_HEALTH_PORT", file=sys.stderr)
        return 1
    ok, said = probe(port, ready=args.ready, host=args.host, timeout_s=args.timeout)
    print(f"{'ok' if ok else 'unhealthy'}: {said}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _run_preflight(args: argparse.Namespace) -> int:
    """Run the pre-flight checks alone and print them; exit 1 if any fails."""
    from heddle.preflight import RUNBOOK, report, run_checks
    from heddle.settings import Settings

    checks = asyncio.run(run_checks(Settings.load(), valkey=not args.no_valkey, timeout_s=args.timeout))
    failed = any(not c.ok for c in checks)
    print(f"pre-flight checks {'failed' if failed else 'passed'}:\n{report(checks)}")
    if failed:
        print(f"  (how to check by hand: {RUNBOOK})")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``heddle`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from heddle.llm.commands import add_llm_commands, add_worker_source_args

    parser = argparse.ArgumentParser(prog="heddle", description="Heddle task queue.")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run a worker for an app's tasks")
    _add_worker_args(w)
    d = sub.add_parser("dev", help="embedded nats-server + valkey-server + a worker, one command")
    d.add_argument("-A", "--app", default=None, help="module[:attribute] holding the heddle.Heddle app")
    add_worker_source_args(d, dev=True)  # --config FILE... (LLM workers), --tier, --local-model
    d.add_argument("-c", "--concurrency", type=int, default=16)
    d.add_argument("--grace", type=float, default=10.0)
    d.add_argument("--loglevel", default="INFO")
    d.add_argument("--quiet", action="store_true")
    _add_router_args(d)
    from heddle.workshop.cli import add_dev_workshop_args

    add_dev_workshop_args(d)  # --no-workshop, --workshop-port
    r = sub.add_parser("router", help="run a router: heddle.tasks.incoming -> worker subjects")
    _add_router_args(r, hosted=False)
    r.add_argument("--loglevel", default="INFO")
    add_actor_args(r)
    hc = sub.add_parser("healthcheck", help="exit 0 if this host's actor process is live (or --ready), else 1")
    hc.add_argument("--ready", action="store_true", help="check /readyz instead of /healthz")
    hc.add_argument("--port", type=_port, default=None, help="health port (default $HEDDLE_HEALTH_PORT)")
    hc.add_argument("--host", default="127.0.0.1", help="health server address (default 127.0.0.1)")
    hc.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    pf = sub.add_parser("preflight", help="check NATS, JetStream and Valkey from here, then exit")
    pf.add_argument("--no-valkey", action="store_true", help="check only NATS and JetStream")
    pf.add_argument("--timeout", type=float, default=None, help="seconds per step (default: connect_timeout_s, 5)")
    dlq = sub.add_parser("dlq", help="list, show and replay dead-lettered messages")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dl = dlq_sub.add_parser("list", help="list dead letters")
    dl.add_argument("--limit", type=int, default=50, help="newest N (default 50)")
    ds = dlq_sub.add_parser("show", help="show one dead letter")
    ds.add_argument("id", type=int, help="dead-letter id (its sequence number, from `heddle dlq list`)")
    dr = dlq_sub.add_parser("replay", help="send dead letters back to the router")
    dr.add_argument("id", type=int, nargs="?", help="dead-letter id")
    dr.add_argument("--all", action="store_true", help="replay every dead letter")
    add_llm_commands(sub)  # validate, models
    from heddle.graph_cli import add_graph_commands

    add_graph_commands(sub)  # orchestrator, submit
    from heddle.status import add_status_commands

    add_status_commands(sub)  # status, events, inspect
    from heddle.workshop.cli import add_workshop_command

    add_workshop_command(sub, add_actor_args)  # workshop
    from heddle.auth import add_auth_command

    add_auth_command(sub)  # auth nats
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
        if args.command in ("validate", "models"):
            from heddle.llm.commands import run_llm_command

            return run_llm_command(args)
        if args.command in ("orchestrator", "submit"):
            from heddle.graph_cli import run_graph_command

            return run_graph_command(args)
        if args.command == "router":
            return _run_router(args)
        if args.command == "healthcheck":
            return _run_healthcheck(args)
        if args.command == "preflight":
            return _run_preflight(args)
        if args.command in ("status", "events", "inspect"):
            from heddle.status import run_status_command

            return run_status_command(args, console)
        if args.command == "workshop":
            from heddle.workshop.cli import run_workshop_command

            return run_workshop_command(args)
        if args.command == "dlq":
            from heddle.dlq import run_dlq_command

            return run_dlq_command(args, console)
        if args.command == "auth":
            from heddle.auth import run_auth_command

            return run_auth_command(args)
    except HeddleError as exc:
        console.print(f"[bold red]error:[/] {escape(redact(str(exc)))}")
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
