"""The Workshop's web app: Starlette routes, Jinja2 templates (autoescaped), htmx, SSE.

Pages render on the server; htmx swaps fragments in place, and one
Server-Sent Events stream per page (``/events/stream``) says when to refresh
them: ``tick`` every two seconds (overview), ``task`` with a task id when one
of its events arrives (task lists, result boxes). No script is inline and no
asset comes from elsewhere, so the Content-Security-Policy is ``'self'`` only.

Security: beyond loopback a token is required (``?token=`` once, traded for a
signed, expiring session cookie that does not contain it, or ``Authorization:
Bearer``); on loopback the ``Host`` header must be a loopback name (DNS
rebinding). Every POST needs the page's CSRF token (the ``X-CSRF-Token`` header
htmx sends, or a ``csrf_token`` form field) and, if the browser sends
``Origin``, a same-origin one.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jinja2
import markupsafe
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heddle import names
from heddle.dlq import clip as _clip
from heddle.errors import DecodeError, HeddleError
from heddle.messages import READY_STATES, task_decoder
from heddle.messages import decode as bounded_decode
from heddle.redact import redact
from heddle.send import usd

if TYPE_CHECKING:
    from heddle.connections import Connections
    from heddle.llm.config import WorkerConfig
    from heddle.workshop.server import Workshop

HERE = Path(__file__).parent
SESSION_COOKIE = "heddle_workshop_session"
DEFAULT_SESSION_TTL_S = 8 * 3600.0
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]
STATES = ("PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED")


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=repr)


def _shown(value: Any) -> Any:
    """Every ``{{ value }}`` of every page passes here: no secret is rendered (URLs in errors, keys)."""
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        return redact(value)
    return value


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every task argument, result and model output is text, never markup
    undefined=jinja2.StrictUndefined,
    finalize=_shown,
)
_env.filters["when"] = _when
_env.filters["pretty"] = _pretty
_env.filters["clip"] = lambda text, limit: _clip(str(text), int(limit))
_env.filters["usd"] = lambda amount: "-" if amount is None else usd(float(amount))


class Sessions:
    """Signed, expiring session cookies: ``v1.<expiry>.<HMAC-SHA256 of both>``, never the token.

    The signing key is derived from the Workshop's token, so a restart keeps
    everyone signed in and rotating the token ends every session at once. The
    expiry is in the signed text: a cookie cannot be stretched, and the server
    refuses it after ``ttl_s`` whatever the browser keeps.

    Args:
        token: The Workshop's access token.
        ttl_s: How long a session lasts, in seconds.
    """

    _VERSION = "v1"
    _LABEL = b"heddle workshop session v1"

    def __init__(self, token: str, ttl_s: float = DEFAULT_SESSION_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._key = hmac.new(token.encode(), self._LABEL, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"<Sessions ttl_s={self.ttl_s:g}>"  # never the key

    def _signature(self, expires: int) -> str:
        mac = hmac.new(self._key, f"{self._VERSION}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def issue(self, now: float | None = None) -> str:
        """A new session cookie value, valid for ``ttl_s`` from ``now`` (default: the current time)."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        return f"{self._VERSION}.{expires}.{self._signature(expires)}"

    def valid(self, value: str, now: float | None = None) -> bool:
        """Whether ``value`` is a session this Workshop issued that has not expired."""
        version, _, rest = value.partition(".")
        expiry, _, signature = rest.partition(".")
        if version != self._VERSION or not expiry.isascii() or not expiry.isdigit() or len(expiry) > 12:
            return False
        if not hmac.compare_digest(signature.encode(), self._signature(int(expiry)).encode()):
            return False
        now = time.time() if now is None else now
        # Also refuse an expiry further off than ttl_s: a session issued before ttl_s was lowered.
        return now < int(expiry) <= now + self.ttl_s + 1


def is_https(request: Request) -> bool:
    """Whether the browser reached the Workshop over https: directly, or through a proxy that says so.

    The proxy's word (``X-Forwarded-Proto``, or ``Forwarded: proto=``) is taken
    as it is: it only ever adds ``Secure`` to the cookie, which a forged header
    cannot turn into a weakness.
    """
    if request.url.scheme == "https":
        return True
    forwarded_proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    if forwarded_proto == "https":
        return True
    first_hop = request.headers.get("forwarded", "").split(",")[0]
    return any(p.strip().lower() in ("proto=https", 'proto="https"') for p in first_hop.split(";"))


class Guard:
    """ASGI middleware: token or session, Host check and security headers on every response."""

    def __init__(self, app: ASGIApp, ws: Workshop) -> None:
        self.app = app
        self.ws = ws

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        refusal = self._refuse(Request(scope))
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refuse(self, request: Request) -> Response | None:
        from heddle.workshop.server import is_loopback

        token, sessions = self.ws.token, self.ws.sessions
        if token is None or sessions is None:
            host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
            if not is_loopback(host):
                return PlainTextResponse(
                    f"this Workshop answers only on loopback names, not {host!r}", status_code=400
                )
            return None
        given = request.query_params.get("token")
        if given is not None:
            if not hmac.compare_digest(given.encode(), token.encode()):
                return PlainTextResponse("wrong token", status_code=401)
            # Trade the token in the URL for a session cookie, and drop it from the address bar.
            signed_in = RedirectResponse(request.url.path, status_code=303)
            signed_in.set_cookie(
                SESSION_COOKIE, sessions.issue(), max_age=int(sessions.ttl_s), path="/",
                secure=is_https(request), httponly=True, samesite="strict",
            )
            return signed_in
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            if hmac.compare_digest(auth[7:].encode(), token.encode()):
                return None
        else:
            session = request.cookies.get(SESSION_COOKIE)
            if session is not None and sessions.valid(session):
                return None
        resp = PlainTextResponse(
            "this Workshop needs its token (or your session has expired): open it once as "
            "/?token=THE_TOKEN ($HEDDLE_WORKSHOP_TOKEN) or send Authorization: Bearer THE_TOKEN",
            status_code=401,
        )
        if SESSION_COOKIE in request.cookies:
            resp.delete_cookie(SESSION_COOKIE, path="/", secure=is_https(request), httponly=True, samesite="strict")
        return resp


@dataclass(frozen=True)
class Target:
    """Something "Try a worker" can run: a registered Python task or a YAML LLM worker."""

    kind: str  # "task" or "yaml"
    worker_type: str
    task: str
    config: WorkerConfig | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.worker_type}:{self.task}"

    @property
    def label(self) -> str:
        if self.kind == "yaml":
            return f"{self.task} (YAML LLM worker)"
        return f"{self.task} (worker type {self.worker_type})"


def yaml_workers(ws: Workshop) -> dict[str, WorkerConfig]:
    """YAML worker configs found under the Workshop's config directories, by name."""
    from heddle.configfile import load_yaml
    from heddle.llm.config import load_worker_config, looks_like_worker_config

    found: dict[str, WorkerConfig] = {}
    for base in ws.config_dirs:
        for path in sorted([*base.glob("*.yaml"), *base.glob("workers/*.yaml")]):
            try:
                data = load_yaml(path)
                if not looks_like_worker_config(data[0] if isinstance(data, tuple) else data):
                    continue
                cfg = load_worker_config(path)
            except Exception:
                continue
            found.setdefault(cfg.name, cfg)
    return found


def targets(ws: Workshop) -> list[Target]:
    """Every runnable target: YAML workers from config files, then tasks of live workers."""
    out: list[Target] = []
    configs = yaml_workers(ws)
    for name, cfg in sorted(configs.items()):
        out.append(Target("yaml", name, name, cfg))
    seen: set[tuple[str, str]] = set()
    workers = ws.registry.workers() if ws.registry is not None else []
    for info in sorted(workers, key=lambda i: i.worker_type):
        if info.worker_type in configs:
            continue
        for task in info.tasks:
            if (info.worker_type, task) not in seen:
                seen.add((info.worker_type, task))
                out.append(Target("task", info.worker_type, task))
    return out


def schema_fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Form fields for an object schema's properties."""
    required = set(schema.get("required", []))
    fields = []
    for name, prop in (schema.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        kind = prop.get("type", "json")
        if isinstance(kind, list):
            kind = "json"
        if "enum" in prop:
            kind = "enum"
        elif kind not in ("string", "integer", "number", "boolean"):
            kind = "json"
        fields.append({
            "name": name,
            "kind": kind,
            "required": name in required,
            "enum": [str(v) for v in prop.get("enum", [])],
            "description": str(prop.get("description", "")),
            "long": kind == "string" and int(prop.get("maxLength", 1000)) > 200,
        })
    return fields


class FormProblem(HeddleError):
    """Raised when a submitted form cannot become task arguments."""


def _field_value(field: dict[str, Any], raw: str | None, prop: dict[str, Any]) -> Any:
    kind, name = field["kind"], field["name"]
    if kind == "boolean":
        return raw is not None
    if raw is None or raw == "":
        return None
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
        if kind == "json":
            return json.loads(raw)
    except ValueError as exc:
        raise FormProblem(f"{name}: {exc}") from None
    if kind == "enum":
        for v in prop.get("enum", []):
            if str(v) == raw:
                return v
    return raw


def payload_from_form(cfg: WorkerConfig, form: FormData) -> dict[str, Any]:
    """The input object of a YAML worker from its form, checked against ``input_schema``."""
    props = cfg.input_schema.get("properties") or {}
    payload: dict[str, Any] = {}
    for field in schema_fields(cfg.input_schema):
        raw = form.get(f"field_{field['name']}")
        value = _field_value(field, raw if isinstance(raw, str) else None, props.get(field["name"], {}))
        if value is not None or field["kind"] == "boolean":
            payload[field["name"]] = value
    errors = cfg.input_validator().errors(payload)
    if errors:
        raise FormProblem("; ".join(map(str, errors)))
    return payload


def args_from_form(form: FormData) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments from the JSON fields of the form."""
    try:
        args = json.loads(str(form.get("args") or "[]"))
    except ValueError as exc:
        raise FormProblem(f"arguments must be a JSON list, e.g. [2, 3]: {exc}") from None
    try:
        kwargs = json.loads(str(form.get("kwargs") or "{}"))
    except ValueError as exc:
        raise FormProblem(f'keyword arguments must be a JSON object, e.g. {{"x": 1}}: {exc}') from None
    if not isinstance(args, list):
        raise FormProblem(f"arguments must be a JSON list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise FormProblem(f"keyword arguments must be a JSON object, got {type(kwargs).__name__}")
    return args, kwargs


class Pages:
    """What every page module needs: the actor, rendering, the CSRF check, the connections.

    The Workshop's pages live in a few modules (this one, :mod:`.pipelines`,
    :mod:`.evaluate`); each takes a ``Pages`` and returns its routes.
    """

    def __init__(self, ws: Workshop) -> None:
        self.ws = ws

    def render(self, request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        """Render a template with the page context every template expects."""
        ws = self.ws
        html = _env.get_template(name).render(
            request=request, csrf_token=ws.csrf_token, path=request.url.path,
            hx_headers=json.dumps({"X-CSRF-Token": ws.csrf_token}), **ctx,
        )
        return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})

    async def csrf_form(self, request: Request) -> FormData:
        """The posted form, once its CSRF token and origin are checked.

        Raises:
            PermissionError: cross-origin, or a missing or wrong token.
        """
        form = await request.form()
        origin = request.headers.get("origin")
        if origin is not None:
            o = urlsplit(origin)
            if o.netloc != request.headers.get("host", ""):
                raise PermissionError(f"cross-origin request from {origin} refused")
        supplied = request.headers.get("x-csrf-token") or str(form.get("csrf_token") or "")
        if not supplied or not hmac.compare_digest(supplied.encode(), self.ws.csrf_token.encode()):
            raise PermissionError("missing or wrong CSRF token; reload the page and try again")
        return form

    @staticmethod
    def refused(exc: PermissionError) -> PlainTextResponse:
        """The answer to a request :meth:`csrf_form` refused."""
        return PlainTextResponse(str(exc), status_code=403)

    def problem(self, request: Request, message: str, status_code: int = 422) -> HTMLResponse:
        """A fragment that says what was wrong with a submission."""
        return self.render(request, "_problem.html", status_code=status_code, problem=message)

    async def conns(self) -> Connections:
        """The Workshop's connections (an error page until it is connected)."""
        if self.ws.conns is None:
            raise HeddleError("the Workshop is not connected yet")
        return self.ws.conns


def build_app(ws: Workshop) -> ASGIApp:
    """The Workshop's ASGI app, bound to its actor."""
    from heddle.workshop import evaluate, pipelines

    pages = Pages(ws)
    render, csrf_form, refused, conns = pages.render, pages.csrf_form, pages.refused, pages.conns

    # -- overview --------------------------------------------------------------------------

    async def overview_data() -> dict[str, Any]:
        from heddle.status import ConsumerRow, read_streams
        from heddle.workshop.state import chart_points

        c = await conns()
        queues: list[ConsumerRow] = []
        dead = 0
        try:
            # Every consumer of every Heddle stream: workers', the router's, the orchestrators'.
            streams, queues = await read_streams(c.broker)
            dead = next((s.messages for s in streams if s.name == names.DLQ_STREAM), 0)
        except Exception as exc:  # shown, not raised: the overview keeps updating
            queues = [ConsumerRow("", f"unavailable: {exc}", 0, 0, 0, 0)]
        workers = sorted(ws.registry.workers() if ws.registry else [], key=lambda i: (i.worker_type, i.id))
        ok, bad = ws.throughput.totals(60)
        series = ws.throughput.series(300, 10)
        return {
            "workers": workers,
            "last_seen": {k: v[0] for k, v in ws.workers_seen.items()},
            "queues": queues,
            "dead": dead,
            "ok_per_min": ok,
            "failed_per_min": bad,
            "failure_rate": (bad / (ok + bad) * 100) if ok + bad else 0.0,
            "chart": chart_points(series),
            "now": time.time(),
        }

    async def overview(request: Request) -> Response:
        return render(request, "overview.html", **await overview_data())

    async def overview_fragment(request: Request) -> Response:
        return render(request, "_overview.html", **await overview_data())

    # -- tasks -----------------------------------------------------------------------------

    def task_list(request: Request) -> dict[str, Any]:
        state = request.query_params.get("state") or None
        if state is not None and state not in STATES:
            state = None
        q = request.query_params.get("q") or ""
        return {"tasks": ws.recent.list(state, q[:200]), "state": state or "", "q": q, "states": STATES}

    async def tasks(request: Request) -> Response:
        return render(request, "tasks.html", **task_list(request))

    async def tasks_fragment(request: Request) -> Response:
        return render(request, "_tasks.html", **task_list(request))

    async def task_page(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        c = await conns()
        state, record = await c.backend.read(task_id)
        entry = ws.recent.get(task_id)
        dead = None
        args = kwargs = None
        if entry is not None and entry.args is not None:
            args, kwargs = entry.args, entry.kwargs
        if entry is None or args is None or state == "FAILURE":
            from heddle.status import find_dead_letter

            found = await find_dead_letter(ws.app, task_id, scan=500)
            if found is not None:
                dead = {"id": found[0], "reason": found[1].get(names.HDR_REASON, "")}
                if args is None:
                    try:
                        tm = bounded_decode(task_decoder, found[2])
                        args, kwargs = tm.args, tm.kwargs
                    except DecodeError:
                        pass
        if entry is None and record is None and dead is None:
            return render(request, "missing.html", status_code=404, what=f"task {task_id}",
                          hint="no event, stored result or dead letter mentions it (results expire)")
        from heddle.schedules import schedule_of

        return render(request, "task.html", task_id=task_id, state=state, record=record, entry=entry,
                      args=args, kwargs=kwargs, dead=dead, schedule=schedule_of(task_id) or "")

    async def result_fragment(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        c = await conns()
        state, record = await c.backend.read(task_id)
        return render(request, "_result.html", task_id=task_id, state=state, record=record,
                      final=state in READY_STATES and record is not None)

    async def task_stream(request: Request) -> Response:
        """A task's token stream as server-sent events: ``chunk`` ({text, new_reply}) from the first, then ``end``."""
        from heddle.results import AsyncResult

        try:
            result: AsyncResult[Any] = AsyncResult(request.path_params["task_id"], ws.app)
        except HeddleError as exc:
            return PlainTextResponse(str(exc), status_code=404)

        async def gen() -> AsyncIterator[str]:
            try:
                async for chunk in result.astream(timeout=STREAM_WAIT_S):
                    data = json.dumps({"text": _shown(str(chunk)), "new_reply": chunk.new_reply})
                    yield f"event: chunk\ndata: {data}\n\n"
            except HeddleError as exc:
                yield f"event: problem\ndata: {json.dumps(_shown(str(exc)))}\n\n"
            yield "event: end\ndata: {}\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    # -- try a worker ------------------------------------------------------------------------

    async def try_page(request: Request) -> Response:
        ts = targets(ws)
        chosen = request.query_params.get("target") or (ts[0].key if ts else "")
        target = next((t for t in ts if t.key == chosen), None)
        return render(request, "try.html", targets=ts, target=target, tiers=names.TIERS,
                      fields=schema_fields(target.config.input_schema) if target and target.config else [])

    async def try_form(request: Request) -> Response:
        ts = targets(ws)
        target = next((t for t in ts if t.key == request.query_params.get("target")), None)
        if target is None:
            return PlainTextResponse("unknown target; reload the page", status_code=404)
        return render(request, "_try_form.html", target=target, tiers=names.TIERS,
                      fields=schema_fields(target.config.input_schema) if target.config else [])

    async def try_submit(request: Request) -> Response:
        try:
            form = await csrf_form(request)
        except PermissionError as exc:
            return refused(exc)
        key = str(form.get("target") or "")
        target = next((t for t in targets(ws) if t.key == key), None)
        if target is None:
            return pages.problem(request, f"no such worker or task: {key!r} (is its worker running?)")
        tier = str(form.get("tier") or "") or None
        if tier is not None and tier not in names.TIERS:
            return pages.problem(request, f"tier must be one of {', '.join(names.TIERS)}, got {tier!r}")
        try:
            if target.config is not None:
                payload = payload_from_form(target.config, form)
                headers = {names.HDR_STREAM: "1"} if form.get("stream") else None  # heddle.chunks
                result = ws.app.send_task(target.task, payload, worker_type=target.worker_type, tier=tier,
                                          headers=headers)
            else:
                args, kwargs = args_from_form(form)
                result = ws.app.send_task(target.task, args, kwargs, worker_type=target.worker_type, tier=tier)
            await result.sent()
            # The page learns of the result from events and reads it from Valkey; a result-notice
            # subscription left open would also receive the notice of a later replay, which a
            # one-shot future subscription cannot take (nats-py raises InvalidStateError).
            (await conns()).release_watch(result.id)
        except (FormProblem, TypeError) as exc:
            return pages.problem(request, str(exc))
        except HeddleError as exc:
            return pages.problem(request, f"could not send: {exc}", 502)
        return render(request, "_submitted.html", task_id=result.id, target=target, state="PENDING",
                      record=None, final=False)

    # -- dead letters ------------------------------------------------------------------------

    async def dlq_page(request: Request) -> Response:
        from heddle.dlq import list_dead_letters

        dls = await list_dead_letters(ws.app, 200)
        return render(request, "dlq.html", dead_letters=list(reversed(dls)), HDR=_hdrs())

    async def dlq_one(request: Request) -> Response:
        from heddle.dlq import get_dead_letter

        try:
            seq = int(request.path_params["seq"])
            d = await get_dead_letter(ws.app, seq)
        except (ValueError, HeddleError) as exc:
            return render(request, "missing.html", status_code=404, what="dead letter", hint=str(exc))
        try:
            tm = bounded_decode(task_decoder, d.data)
            body: Any = {"task": tm.task, "id": tm.id, "args": tm.args, "kwargs": tm.kwargs}
        except DecodeError:
            body = None
        return render(request, "dlq_one.html", d=d, body=body, raw=d.data[:500], HDR=_hdrs())

    async def dlq_replay(request: Request) -> Response:
        from heddle.dlq import replay

        try:
            await csrf_form(request)
        except PermissionError as exc:
            return refused(exc)
        try:
            said = await replay(ws.app, int(request.path_params["seq"]), by=f"workshop@{socket.gethostname()}")
        except (ValueError, HeddleError) as exc:
            return pages.problem(request, str(exc), 404)
        return render(request, "_note.html", note=said)

    # -- audit ---------------------------------------------------------------------------------

    async def audit_page(request: Request) -> Response:
        from heddle.audit import unfinished
        from heddle.status import DEFAULT_AUDIT_AGE_S

        raw = request.query_params.get("older_than") or ""
        try:
            older_than = float(raw) if raw else DEFAULT_AUDIT_AGE_S
            if not 0 <= older_than < 10**9:
                raise ValueError
        except ValueError:
            return render(request, "audit.html", status_code=422, report=None, older_than=raw[:20],
                          problem=f"older_than must be seconds >= 0, got {raw[:20]!r}")
        report = await unfinished((await conns()).backend, older_than, 200)
        return render(request, "audit.html", report=report, older_than=f"{older_than:g}", problem="",
                      now=time.time())

    # -- schedules -------------------------------------------------------------------------------

    async def schedules_page(request: Request) -> Response:
        from heddle.schedules import read_installed, when_text

        states = await read_installed(ws.app)
        now = time.time()
        rows = [{
            "app": st.app, "name": st.schedule.name, "task": st.schedule.task, "when": st.schedule.describe(),
            "last_run": when_text(st.last_run, now), "last_task_id": st.last_task_id or "",
            "next_run": when_text(st.next_run, now),
        } for st in states]
        return render(request, "schedules.html", rows=rows)

    # -- live ------------------------------------------------------------------------------------

    async def stream(request: Request) -> Response:
        async def gen() -> AsyncIterator[str]:
            with ws.client() as q:
                yield "retry: 2000\n\n"
                while not ws.stopping.is_set():
                    try:
                        event, data = await asyncio.wait_for(q.get(), 1.0)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    clean = data.replace("\r", " ").replace("\n", " ")
                    yield f"event: {event}\ndata: {clean}\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", overview),
        Route("/fragments/overview", overview_fragment),
        Route("/tasks", tasks),
        Route("/fragments/tasks", tasks_fragment),
        Route("/tasks/{task_id}", task_page),
        Route("/fragments/result/{task_id}", result_fragment),
        Route("/tasks/{task_id}/stream", task_stream),
        Route("/try", try_page),
        Route("/fragments/try-form", try_form),
        Route("/try", try_submit, methods=["POST"]),
        Route("/dlq", dlq_page),
        Route("/dlq/{seq}", dlq_one),
        Route("/dlq/{seq}/replay", dlq_replay, methods=["POST"]),
        Route("/audit", audit_page),
        Route("/schedules", schedules_page),
        Route("/events/stream", stream),
        *pipelines.routes(pages),
        *evaluate.routes(pages),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Guard(Starlette(routes=routes), ws)


# How long a page may follow one task's token stream before the server ends it.
STREAM_WAIT_S = 600.0


def _hdrs() -> dict[str, str]:
    return {"task_id": names.HDR_TASK_ID, "task": names.HDR_TASK, "worker_type": names.HDR_WORKER_TYPE,
            "reason": names.HDR_REASON, "failed_at": names.HDR_FAILED_AT}


__all__ = ["CSP", "SESSION_COOKIE", "Pages", "Sessions", "Target", "build_app", "is_https", "schema_fields"]
