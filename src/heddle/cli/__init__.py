"""Command line: ``heddle worker``, ``heddle dev`` and the ``heddle-worker`` shortcut."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from heddle import names
from heddle.app import Heddle
from heddle.cli.common import add_actor_args, console, port_number, preflight
from heddle.errors import ConfigError, HeddleError
from heddle.redact import redact
from heddle.runtime import Actor, install_loop_policy, load_app, run_actor_process, run_actors
from heddle.worker import DEFAULT_CONCURRENCY

if TYPE_CHECKING:
    from heddle.cli.llm import DevLLM
    from heddle.devsession import DevSession
    from heddle.worker import Worker



def banner(
    app: Heddle,
    concurrency: int,
    extra: dict[str, str] | None = None,
    tier: str | None = None,
    per_request: tuple[int, float] | None = None,
) -> None:
    """Print the start-up banner: where we connect, what we run, on which subjects.

    ``per_request`` is a YAML LLM worker's (retries, timeout in seconds): they apply
    to each model request, not to the task, and its table row says so.
    """
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
        retries = str(t.options.retries)
        timeout = f"{t.options.timeout:g}s" if t.options.timeout else "-"
        if per_request is not None:
            retries, timeout = f"{per_request[0]} per request", f"{per_request[1]:g}s per request"
        table.add_row(
            name,
            "async" if t.is_async else "sync",
            retries,
            timeout,
            names.task_subject(app.worker_type, tier),
        )
    console.print(table)
    console.print(
        f"  subjects {names.worker_filter(app.worker_type, tier)} "
        f"(durable consumer {names.consumer_name(app.worker_type, tier)})"
    )


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
    from heddle.cli.graphs import make_orchestrator

    orchestrator = make_orchestrator(app, args)  # unless --no-orchestrator
    if orchestrator is not None:
        actors.append(orchestrator)
    if app.schedules:  # app.periodic: every process that loads the app runs its schedules together
        from heddle.scheduler import Scheduler

        actors.append(Scheduler(app))
    return actors


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
    from heddle.cli.llm import add_worker_source_args

    p.add_argument("-A", "--app", default=None, help="module[:attribute] holding the heddle.Heddle app (or --config)")
    add_worker_source_args(p)
    p.add_argument("-c", "--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help=f"most tasks in flight: async tasks on the event loop, sync ones in a thread pool of "
                        f"this size (default {DEFAULT_CONCURRENCY}; near the core count for CPU-bound sync tasks)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight tasks get on shutdown")
    p.add_argument("--reload", action="store_true", help="restart when .py files change (development)")
    p.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--quiet", action="store_true", help="no start-up banner")
    _add_router_args(p)
    from heddle.cli.graphs import add_orchestrator_args

    add_orchestrator_args(p)  # --no-orchestrator, --max-concurrent-goals
    add_actor_args(p)


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
    from heddle.cli.llm import worker_from_args

    app, extra = worker_from_args(args, load_app)  # -A module, or --config / WORKER_CONFIG (LLM worker)
    preflight(args, app)
    if not args.quiet:
        banner(app, args.concurrency, extra, tier=args.tier, per_request=getattr(args, "per_request", None))
    install_loop_policy()
    worker = asyncio.run(serve(app, args))
    _exit_if_threads_abandoned(worker)
    return 0


# heddle dev's servers prefer the ports a client tries when NATS_URL and VALKEY_URL are
# unset, so shells anywhere on the machine reach them; busy, the session file says where.
DEV_NATS_PORT = 4222
DEV_VALKEY_PORT = 6379


def _run_dev(args: argparse.Namespace, argv: Sequence[str]) -> int:
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from heddle.cli.llm import DevLLM

    if args.worker_only:
        # The worker half of `heddle dev --reload`, restarted on changes by the parent,
        # which keeps the servers (and the session file) up and passes their URLs in
        # NATS_URL and VALKEY_URL.
        from heddle.settings import Settings

        settings = Settings.load()
        with DevLLM(args, console.print) as llm:
            hosted = _serve_dev(args, llm, settings.nats_url, settings.valkey_url)
        _exit_if_threads_abandoned(hosted)
        return 0

    from heddle.testing.servers import EmbeddedServers

    worker: Worker | None = None
    with EmbeddedServers(nats_port=args.nats_port, valkey_port=args.valkey_port) as servers, \
            DevLLM(args, console.print) as llm:
        os.environ["NATS_URL"] = servers.nats_url
        os.environ["VALKEY_URL"] = servers.valkey_url
        console.print("[bold green]heddle dev[/]: embedded servers running")
        console.print(f"  NATS_URL={redact(servers.nats_url)}", markup=False)
        console.print(f"  VALKEY_URL={redact(servers.valkey_url)}", markup=False)
        if servers.fallback_note:
            console.print(f"  [yellow]{escape(servers.fallback_note)}[/]")
        session = _claim_dev_session(servers.nats_url, servers.valkey_url)
        console.print("  Ctrl-C stops everything")
        try:
            if args.reload:
                _reload_dev_worker(args, argv)
            else:
                worker = _serve_dev(args, llm, servers.nats_url, servers.valkey_url)
        finally:
            if session is not None:
                session.remove()
    console.print("heddle dev: stopped")
    if worker is not None:
        _exit_if_threads_abandoned(worker)
    return 0


def _claim_dev_session(nats_url: str, valkey_url: str) -> DevSession | None:
    """Write ``.heddle/dev.json`` here, so other shells in this directory find the servers; say so."""
    from heddle.devsession import DevSession
    from heddle.settings import DEFAULT_NATS_URL, DEFAULT_VALKEY_URL

    anywhere = nats_url == DEFAULT_NATS_URL and valkey_url == DEFAULT_VALKEY_URL
    path = DevSession.path_in()
    other = DevSession.find()
    if other is not None and other.pid != os.getpid():
        # Taking the file over would strand the shells that use the other session, and
        # removing it on exit would leave that one unfindable.
        console.print(f"  another heddle dev (pid {other.pid}) owns {path}: shells in this directory reach "
                      f"that one; export the URLs above to reach this one", markup=False)
        return None
    session = DevSession(nats_url, valkey_url, os.getpid(), path)
    try:
        session.write()
    except OSError as exc:
        console.print(f"  cannot write {path} ({exc.strerror or exc}): export the URLs above in other shells",
                      markup=False)
        return None
    elsewhere = ("they are the default URLs too, so shells elsewhere on this machine reach them as well" if anywhere
                 else "elsewhere, export them")
    console.print(f"  wrote {path}: clients and heddle commands started in {os.getcwd()} pick these URLs up "
                  f"when NATS_URL and VALKEY_URL are unset ({elsewhere})", markup=False)
    return session


def _serve_dev(args: argparse.Namespace, llm: DevLLM, nats_url: str, valkey_url: str) -> Worker:
    """The worker part of ``heddle dev``: the app's worker, LLM workers, router, orchestrator, Workshop."""
    app, args.llm_workers = llm.split(args, load_app(args.app) if args.app else None)
    app.configure(nats_url=nats_url, valkey_url=valkey_url)
    llm.configure(nats_url, valkey_url)
    from heddle.cli.workshop import dev_workshop

    args.workshop = dev_workshop(args)  # None with --no-workshop
    if args.workshop is not None:
        console.print(f"  Workshop {redact(args.workshop.url)}", markup=False)
    if not args.quiet:
        banner(app, args.concurrency, tier=args.tier)
    install_loop_policy()
    return asyncio.run(serve(app, args))


def _reload_dev_worker(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Run the worker part in a child process, restarted on .py (and YAML) changes, until Ctrl-C."""
    import signal

    import watchfiles

    # A shell starts background jobs with SIGINT ignored, and Python then leaves it so;
    # Ctrl-C or `kill -INT` must stop this process as it stops `heddle dev` without --reload.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cmd = [sys.executable, "-m", "heddle", "dev", "--worker-only", *[a for a in argv if a != "--reload"]]
    console.print(f"  [yellow]reloading the worker on .py and YAML changes under {escape(os.getcwd())}; "
                  f"the servers and their URLs stay[/]")
    watchfiles.run_process(
        os.getcwd(),
        target=shlex.join(cmd),
        target_type="command",
        watch_filter=watchfiles.PythonFilter(extra_extensions=(".yaml", ".yml")),
        # The child drains in-flight tasks for --grace seconds before it is killed.
        sigint_timeout=int(args.grace) + 5,
    )


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
        settings = Settings.load()
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    port = args.port if args.port is not None else settings.health_port
    # The server listens on HEDDLE_HEALTH_HOST; a wildcard address is reached on loopback.
    host = args.host or (settings.health_host if settings.health_host not in ("0.0.0.0", "::", "") else "127.0.0.1")
    if port is None:
        print("unhealthy: no health port; pass --port or set HEDDLE_HEALTH_PORT", file=sys.stderr)
        return 1
    ok, said = probe(port, ready=args.ready, host=host, timeout_s=args.timeout)
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
    from heddle.cli.llm import add_llm_commands, add_worker_source_args
    from heddle.version import __version__

    parser = argparse.ArgumentParser(prog="heddle", description="Heddle task queue.")
    parser.add_argument("--version", action="version", version=f"heddle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run a worker for an app's tasks")
    _add_worker_args(w)
    d = sub.add_parser(
        "dev",
        help="embedded nats-server + valkey-server + a worker, one command",
        description="Start nats-server and valkey-server on free loopback ports (4222 and 6379 when both are "
                    "free, else any), then a worker for -A's tasks and/or --config's LLM workers in this "
                    "process, with a router, an orchestrator and the Workshop. Writes the servers' URLs to "
                    ".heddle/dev.json, where clients and heddle commands started in this directory find them "
                    "when NATS_URL and VALKEY_URL are unset. For development on one machine; the servers keep "
                    "nothing after exit.",
    )
    d.add_argument("-A", "--app", default=None, help="module[:attribute] holding the heddle.Heddle app")
    add_worker_source_args(d, dev=True)  # --config FILE... (LLM workers), --tier, --local-model
    d.add_argument("-c", "--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help=f"most tasks in flight (default {DEFAULT_CONCURRENCY})")
    d.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight tasks get to finish on Ctrl-C (default 10)")
    d.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    d.add_argument("--quiet", action="store_true", help="no start-up banner")
    d.add_argument("--reload", action="store_true",
                   help="restart the worker part when .py or YAML files change; the servers and their URLs stay")
    d.add_argument("--nats-port", type=port_number, default=DEV_NATS_PORT,
                   help=f"nats-server's port (default {DEV_NATS_PORT}); both servers take free ports when it or "
                        f"--valkey-port is taken; 0: any free port")
    d.add_argument("--valkey-port", type=port_number, default=DEV_VALKEY_PORT,
                   help=f"valkey-server's port (default {DEV_VALKEY_PORT}); see --nats-port")
    # The worker half of `heddle dev --reload`, run by it: servers from NATS_URL/VALKEY_URL.
    d.add_argument("--worker-only", action="store_true", help=argparse.SUPPRESS)
    _add_router_args(d)
    from heddle.cli.workshop import add_dev_workshop_args

    add_dev_workshop_args(d)  # --no-workshop, --workshop-port
    r = sub.add_parser("router", help="run a router: heddle.tasks.incoming -> worker subjects")
    _add_router_args(r, hosted=False)
    r.add_argument("--loglevel", default="INFO")
    add_actor_args(r)
    hc = sub.add_parser("healthcheck", help="exit 0 if this host's actor process is live (or --ready), else 1")
    hc.add_argument("--ready", action="store_true", help="check /readyz instead of /healthz")
    hc.add_argument("--port", type=port_number, default=None, help="health port (default $HEDDLE_HEALTH_PORT)")
    hc.add_argument("--host", default=None,
                    help="health server address (default $HEDDLE_HEALTH_HOST, or 127.0.0.1 when it listens on all)")
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
    from heddle.cli.graphs import add_graph_commands

    add_graph_commands(sub)  # orchestrator, submit, goals
    from heddle.status import add_status_commands

    add_status_commands(sub)  # status, events, inspect, schedules
    from heddle.cli.workshop import add_workshop_command

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
            return _run_dev(args, rest)
        if args.command in ("validate", "models"):
            from heddle.cli.llm import run_llm_command

            return run_llm_command(args)
        if args.command in ("orchestrator", "submit", "goals"):
            from heddle.cli.graphs import run_graph_command

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
        if args.command == "schedules":
            from heddle.status import run_schedules_command

            return run_schedules_command(args, console)
        if args.command == "workshop":
            from heddle.cli.workshop import run_workshop_command

            return run_workshop_command(args)
        if args.command == "dlq":
            from heddle.dlq import run_dlq_command

            return run_dlq_command(args, console)
        if args.command == "auth":
            from heddle.auth import run_auth_command

            return run_auth_command(args)
    except HeddleError as exc:
        # Not wrapped at the console's width: an error may quote a traceback or a path.
        console.print(f"[bold red]error:[/] {escape(redact(str(exc)))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
