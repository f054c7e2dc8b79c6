"""Pre-flight checks: can this process reach NATS, JetStream and Valkey?

Every actor command runs them before it starts (``--skip-preflight`` skips
them) and ``heddle preflight`` runs them alone. Each failure names the URL
(password redacted), what went wrong and the fix. What is checked, in order:

1. **NATS** — the URL parses; a TCP connection opens (the host resolves, something
   listens); the server greets with a NATS ``INFO`` line (so the port is not the
   monitoring port or another service).
2. **JetStream** — that ``INFO`` says ``"jetstream": true``, then a real client
   connects (credentials, TLS) and one JetStream API request answers. Credentials
   the server refuses fail the NATS check as "authentication failed", not as JetStream.
3. **Valkey** — the URL parses, a TCP connection opens, and ``PING`` plus loading
   Heddle's scripts succeed (credentials, a read-only replica). Under Sentinel
   (``VALKEY_SENTINELS``) a sentinel must answer and name the primary; under
   Cluster (``VALKEY_CLUSTER``) the node must know the cluster's slot map. When
   final results must reach replicas before tasks are acked
   (``valkey_replicas_to_wait``), the primary must have that many connected.

docs/runbooks/verify-nats-connectivity.md says how to run each step by hand.
No secret is ever in a check's text: every URL and error passes through
:func:`heddle.redact.redact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from heddle.errors import BrokerUnavailable, HeddleError, PreflightError
from heddle.redact import redact
from heddle.settings import Settings, dev_session_note

RUNBOOK = "docs/runbooks/verify-nats-connectivity.md"

_NATS_SCHEMES = {"nats": 4222, "tls": 4222}
_VALKEY_SCHEMES = {"valkey": 6379, "valkeys": 6379, "redis": 6379, "rediss": 6379}
_INFO_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        name: ``NATS``, ``JetStream`` or ``Valkey``.
        url: The URL checked, password redacted.
        ok: Whether it passed.
        detail: What was found (on success) or what went wrong, naming the URL.
        fix: What to do about a failure.
    """

    name: str
    url: str
    ok: bool
    detail: str
    fix: str = ""


class _Failed(Exception):
    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def _endpoint(url: str, schemes: dict[str, int], var: str, example: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        # Not the ValueError's text: it quotes what stood after a colon, which is part
        # of the password when the password holds a / ? or # that is not percent-encoded.
        raise _Failed(
            f"{var}={redact(url)} has an invalid port (percent-encode any @ : / ? # in a password)",
            f"set {var} like {example}",
        ) from None
    if parts.scheme not in schemes or not parts.hostname:
        raise _Failed(
            f"{var}={redact(url)} is not a valid URL ({', '.join(f'{s}://' for s in schemes)}host:port expected)",
            f"set {var} like {example}",
        )
    return parts.hostname, port or schemes[parts.scheme]


async def _open(host: str, port: int, what: str, url: str, var: str, timeout_s: float) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter
]:
    """A TCP connection, with each way it can fail told apart."""
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except socket.gaierror as exc:
        raise _Failed(
            f"cannot reach {what} at {url}: host name {host!r} does not resolve ({exc.strerror})",
            f"check the host in {var}; in Kubernetes the Service must exist in the pod's namespace",
        ) from None
    except ConnectionRefusedError:
        raise _Failed(
            f"cannot reach {what} at {url}: connection refused (nothing listens on {host}:{port})",
            f"start {what} there, or set {var} to where it runs. {dev_session_note(url, var)}".rstrip(". "),
        ) from None
    except TimeoutError:
        raise _Failed(
            f"cannot reach {what} at {url}: no TCP connection within {timeout_s:g}s",
            "check the host and port, firewalls and NetworkPolicies between here and the server",
        ) from None
    except OSError as exc:
        raise _Failed(f"cannot reach {what} at {url}: {exc.strerror or exc}", f"check {var}") from None


async def _nats_info(url: str, timeout_s: float) -> dict[str, object]:
    """The server's INFO greeting, read over a plain TCP connection."""
    host, port = _endpoint(url, _NATS_SCHEMES, "NATS_URL", "nats://host:4222")
    reader, writer = await _open(host, port, "nats-server", redact(url), "NATS_URL", timeout_s)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except TimeoutError:
        raise _Failed(
            f"{redact(url)} accepted the connection but sent no NATS greeting within {timeout_s:g}s: "
            f"it is not a nats-server client port (8222 is the monitoring port; 4222 the client port)",
            "point NATS_URL at the client port of nats-server",
        ) from None
    except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
        raise _Failed(f"{redact(url)} closed or garbled the connection: {exc!r}", "check NATS_URL") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if not line.startswith(b"INFO "):
        raise _Failed(
            f"{redact(url)} is not a nats-server: it greeted with {line[:60]!r}",
            "point NATS_URL at nats-server's client port (4222 by default)",
        )
    try:
        info = json.loads(line[5:])
    except ValueError:
        raise _Failed(f"{redact(url)} sent an unreadable INFO line", "check NATS_URL") from None
    return info if isinstance(info, dict) else {}


async def check_nats(settings: Settings, timeout_s: float | None = None) -> list[Check]:
    """The NATS and JetStream checks (JetStream is not checked when NATS fails)."""
    from heddle.broker import Broker

    timeout_s = timeout_s or settings.connect_timeout_s
    shown = redact(settings.nats_url)
    # NATS_URL may list several servers; the client needs one of them.
    urls = [u.strip() for u in settings.nats_url.split(",") if u.strip()] or [settings.nats_url]
    info: dict[str, object] | None = None
    failures: list[_Failed] = []
    for url in urls:
        try:
            info = await _nats_info(url, timeout_s)
            break
        except _Failed as exc:
            failures.append(exc)
    if info is None:
        f = failures[0]
        return [Check("NATS", shown, False, redact("; ".join(x.detail for x in failures), settings.nats_url), f.fix)]
    server = f"nats-server {info.get('version', '?')} ({info.get('server_name') or info.get('server_id', '?')})"
    nats_ok = Check("NATS", shown, True, f"{server} answers at {shown}")
    if not info.get("jetstream"):
        return [
            nats_ok,
            Check(
                "JetStream",
                shown,
                False,
                f"JetStream is not enabled on {server} at {shown}",
                "start nats-server with -js (--jetstream), or add `jetstream {}` to its config file",
            ),
        ]
    broker = Broker(settings.with_(connect_timeout_s=timeout_s), name="heddle-preflight")
    try:
        await asyncio.wait_for(broker.connect(), timeout_s * 3)
        account = await broker.account_info(timeout_s)
    except (HeddleError, TimeoutError) as exc:
        detail = redact(str(exc), settings.nats_url) or f"no answer from {shown} within {timeout_s * 3:g}s"
        if detail.startswith("authentication failed"):
            # The server answers, but not to us: a NATS failure, not a JetStream one.
            return [
                Check(
                    "NATS",
                    shown,
                    False,
                    f"{server} answers, but {detail}",
                    "check the credentials against the server's authorization config: NATS_USER and "
                    "NATS_PASSWORD, NATS_TOKEN, NATS_NKEY or NATS_CREDS, or nats://user:password@host:4222 "
                    "in NATS_URL (percent-encode @ : / there)",
                )
            ]
        low = detail.lower()
        if isinstance(exc, BrokerUnavailable):
            fix = "check that every server in NATS_URL is reachable from here and speaks to this client (TLS?)"
        elif "authoriz" in low or "permission" in low:
            fix = "give this user JetStream permissions ($JS.API.>) in the nats-server config"
        elif "did not answer" in low or "timed out" in low or isinstance(exc, TimeoutError):
            fix = "enable JetStream for this account in the nats-server config"
        else:
            fix = "check NATS_URL (one nats://host:port, or several separated by commas) and the nats-server log"
        return [nats_ok, Check("JetStream", shown, False, detail, fix)]
    finally:
        await broker.close()
    return [nats_ok, Check("JetStream", shown, True, f"enabled at {shown} ({account.streams} streams in the account)")]


async def check_valkey(settings: Settings, timeout_s: float | None = None) -> Check:
    """The Valkey check: TCP, then PING and loading Heddle's scripts."""
    from heddle.store import ResultBackend

    timeout_s = timeout_s or settings.connect_timeout_s
    url = settings.valkey_url
    sentinel = settings.valkey_mode == "sentinel"
    if sentinel:
        shown = f"sentinels {','.join(settings.valkey_sentinels)} (primary {settings.valkey_sentinel_master!r})"
    else:
        shown = redact(url) + (" (cluster)" if settings.valkey_cluster else "")
    parts = urlsplit(url)
    try:
        if sentinel:
            await _any_sentinel(settings, shown, timeout_s)
        elif parts.scheme != "unix":
            host, port = _endpoint(url, _VALKEY_SCHEMES, "VALKEY_URL", "valkey://host:6379/0")
            _, writer = await _open(host, port, "valkey-server", shown, "VALKEY_URL", timeout_s)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    except _Failed as exc:
        return Check("Valkey", shown, False, redact(exc.detail, url), exc.fix)
    backend = ResultBackend(settings.with_(connect_timeout_s=timeout_s))
    replicas = ""
    try:
        await asyncio.wait_for(backend.connect(), timeout_s * 2)
        wanted = backend.replicas_to_wait
        if wanted:
            have = min(await asyncio.wait_for(backend.replica_counts(), timeout_s))
            if have < wanted:
                return Check(
                    "Valkey", shown, False,
                    f"{'a' if settings.valkey_cluster else 'the'} primary has {have} connected replica(s), and final "
                    f"results must reach {wanted} before "
                    f"a task is acknowledged (valkey_replicas_to_wait): no task would be acked",
                    "start the replicas (replicaof the primary), or set VALKEY_WAIT_REPLICAS to what the primary has "
                    "(0 acks a result held by the primary alone; docs/scaling.md)",
                )
            replicas = f", {have} replica(s) connected (results wait for {wanted})"
    except (HeddleError, TimeoutError) as exc:
        detail = redact(str(exc), url) or f"no answer from {shown} within {timeout_s * 2:g}s"
        low = detail.lower()
        fix = (
            "check VALKEY_USERNAME and VALKEY_PASSWORD (or valkey://user:password@host:6379/0 in VALKEY_URL, "
            "valkey://:password@... for requirepass) against the server's requirepass or ACL users"
            if "auth" in low or "wrongpass" in low or "password" in low
            else "check VALKEY_SENTINEL_MASTER against `sentinel monitor` in the sentinels' config, and that "
                 "the sentinels agree on a primary that is up" if sentinel
            else "check that VALKEY_URL points at a node of the cluster and that every slot is served "
                 "(CLUSTER INFO: cluster_state:ok)" if settings.valkey_cluster
            else "check that VALKEY_URL points at a writable valkey-server (a primary, not a replica)"
        )
        return Check("Valkey", shown, False, detail, fix)
    finally:
        await backend.close()
    return Check("Valkey", shown, True, f"{shown} answered PING and loaded Heddle's scripts{replicas}")


async def _any_sentinel(settings: Settings, shown: str, timeout_s: float) -> None:
    """Open a TCP connection to the sentinels until one answers; _Failed naming them all if none does."""
    from heddle.settings import sentinel_address

    failures = []
    for entry in settings.valkey_sentinels:
        host, port = sentinel_address(entry)
        try:
            _, writer = await _open(host, port, "valkey-sentinel", entry, "VALKEY_SENTINELS", timeout_s)
        except _Failed as exc:
            failures.append(exc.detail)
            continue
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return
    raise _Failed("no sentinel answered: " + "; ".join(failures),
                  "start the sentinels, or fix VALKEY_SENTINELS (host:port of each, comma-separated)")


async def run_checks(settings: Settings, *, valkey: bool = True, timeout_s: float | None = None) -> list[Check]:
    """Run every check; NATS and Valkey are checked side by side."""
    if not valkey:
        return await check_nats(settings, timeout_s)
    nats_checks, valkey_check = await asyncio.gather(check_nats(settings, timeout_s), check_valkey(settings, timeout_s))
    return [*nats_checks, valkey_check]


def report(checks: Sequence[Check]) -> str:
    """Checks as text, one line each, with the fix under every failure (secrets replaced)."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        lines.append(f"  {mark} {c.name:<{width}}  {redact(c.detail)}")
        if not c.ok and c.fix:
            lines.append(f"       {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)


def require(settings: Settings, *, valkey: bool = True, timeout_s: float | None = None) -> list[Check]:
    """Run the checks before an actor starts; raise PreflightError listing the failures.

    Raises:
        PreflightError: A check failed; the message has the URL, the failure and the fix.
    """
    checks = asyncio.run(run_checks(settings, valkey=valkey, timeout_s=timeout_s))
    if any(not c.ok for c in checks):
        raise PreflightError(
            f"pre-flight checks failed:\n{report(checks)}\n"
            f"  (how to check by hand: {RUNBOOK}; --skip-preflight starts without these checks)"
        )
    return checks
