"""Dead letters: list, show and replay (``heddle dlq ...``).

A dead letter's id is its sequence number in the ``HEDDLE_DLQ`` stream. Replay
sends the original payload back to ``heddle.tasks.incoming`` with its
original routing headers plus who replayed it and when; it clears the task's
stored FAILURE first so the task runs again. Replaying the same dead letter
twice is a no-op: a Valkey marker remembers each replay, and the message id
``replay:{id}`` lets JetStream drop a concurrent duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import socket
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from heddle import names
from heddle.app import Heddle
from heddle.errors import BrokerError, DecodeError, HeddleError
from heddle.messages import SUCCESS, task_decoder
from heddle.messages import decode as bounded_decode


class DeadLetter(msgspec.Struct, frozen=True):
    """One message in the dead-letter stream."""

    id: int
    headers: dict[str, str]
    data: bytes
    time: float
    #: "by WHO at WHEN" once replayed, else "".
    replayed: str = ""
    #: The task's state now (SUCCESS if a later run succeeded), "" when it has no id.
    task_state: str = ""

    @property
    def replayable(self) -> bool:
        """Not replayed yet, and its task has not succeeded since."""
        return not self.replayed and self.task_state != SUCCESS

    @property
    def failed_at(self) -> str:
        """When it was dead-lettered, as a UTC time (``Heddle-Failed-At`` holds epoch seconds)."""
        return dt.datetime.fromtimestamp(self.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if self.time else "?"

    @property
    def task_id(self) -> str:
        return self.headers.get(names.HDR_TASK_ID, "")

    @property
    def reason(self) -> str:
        return self.headers.get(names.HDR_REASON, "")


async def list_dead_letters(app: Heddle, limit: int | None = None) -> list[DeadLetter]:
    """The newest ``limit`` dead letters (all if None), oldest first."""
    conns = await app.connections()
    await conns.ensure_streams()
    info = await conns.broker.stream_info(names.DLQ_STREAM)
    first, last = info.state.first_seq, info.state.last_seq
    if info.state.messages == 0:
        return []
    if limit is not None:
        first = max(first, last - limit + 1)
    out = []
    for seq in range(first, last + 1):
        dl = await _get(app, seq, missing_ok=True)
        if dl is not None:
            out.append(dl)
    return out


async def _get(app: Heddle, seq: int, missing_ok: bool = False) -> DeadLetter | None:
    conns = await app.connections()
    try:
        m = await conns.broker.get_stream_msg(names.DLQ_STREAM, seq)
    except BrokerError:
        if missing_ok:
            return None
        raise HeddleError(f"no dead letter with id {seq}; `heddle dlq list` shows the ids") from None
    headers = dict(m.headers or {})
    when = float(headers.get(names.HDR_FAILED_AT, "0") or 0)
    data = m.data or b""
    ref = headers.get(names.HDR_PAYLOAD_REF, "")
    if ref.startswith(names.DLQ_PAYLOAD_KEY_PREFIX) and not data:
        # Too large to copy with its headers: the payload was kept in Valkey.
        data = await conns.backend.get_bytes(ref) or b""
    replayed = await conns.backend.get_text(f"{names.REPLAY_KEY_PREFIX}{seq}") or ""
    task_id = headers.get(names.HDR_TASK_ID, "")
    state = (await conns.backend.read(task_id))[0] if task_id else ""
    return DeadLetter(seq, headers, data, when, replayed, state)


async def get_dead_letter(app: Heddle, seq: int) -> DeadLetter:
    """One dead letter by id."""
    dl = await _get(app, seq)
    assert dl is not None
    return dl


async def replay(app: Heddle, seq: int, by: str | None = None) -> str:
    """Send one dead letter back to the router; returns what happened, in words."""
    conns = await app.connections()
    dl = await get_dead_letter(app, seq)
    marker = f"{names.REPLAY_KEY_PREFIX}{seq}"
    if dl.replayed:
        return f"dead letter {seq} was already replayed ({dl.replayed}); not sending it again"
    if dl.task_state == SUCCESS:
        return f"the task of dead letter {seq} ({dl.task_id}) has succeeded since; not sending it again"
    if not dl.data and dl.headers.get(names.HDR_PAYLOAD_REF):
        return f"dead letter {seq} kept its payload in Valkey, and it has expired; it cannot be replayed"
    if not dl.headers.get(names.HDR_WORKER_TYPE):
        return f"dead letter {seq} has no {names.HDR_WORKER_TYPE} header; it cannot be routed"
    who = by or f"{getpass.getuser()}@{socket.gethostname()}"
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    headers = {
        k: v
        for k, v in dl.headers.items()
        if k.startswith("Heddle-")
        and k not in (names.HDR_REASON, names.HDR_FAILED_AT, names.HDR_ORIGINAL_SUBJECT, names.HDR_PAYLOAD_REF)
    }
    headers[names.HDR_MSG_ID] = f"replay:{seq}"
    headers[names.HDR_REPLAYED_BY] = who
    headers[names.HDR_REPLAYED_AT] = when
    if dl.task_id:
        # The stored FAILURE would make the worker skip the task as already finished.
        await conns.backend.forget(dl.task_id)
        conns.submissions.record(dl.task_id)  # pending again: audited until final
    await conns.broker.publish(names.INCOMING_SUBJECT, dl.data, headers)
    await conns.backend.set_once(marker, f"by {who} at {when}", app.settings.dlq_max_age_s)
    return f"replayed dead letter {seq} (task {dl.task_id or '?'}) by {who} at {when}"


async def replay_all(app: Heddle, by: str | None = None) -> list[str]:
    """Replay every dead letter not replayed before."""
    return [await replay(app, dl.id, by) for dl in await list_dead_letters(app)]


def run_dlq_command(args: argparse.Namespace, console: Console) -> int:
    """``heddle dlq list|show|replay``."""
    app = Heddle("dlq")

    async def main() -> int:
        try:
            if args.dlq_command == "list":
                _print_list(console, await list_dead_letters(app, args.limit))
            elif args.dlq_command == "show":
                _print_one(console, await get_dead_letter(app, args.id))
            elif args.dlq_command == "replay":
                if args.all == (args.id is not None):
                    console.print("give a dead-letter id or --all")
                    return 2
                lines = await replay_all(app) if args.all else [await replay(app, args.id)]
                for line in lines:
                    console.print(line)
            return 0
        finally:
            await app.aclose()

    return asyncio.run(main())


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, with "…" when cut."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "…"


def _print_list(console: Console, dls: list[DeadLetter]) -> None:
    table = Table(title=f"dead letters ({len(dls)})")
    for col in ("id", "failed at", "task id", "task", "worker type", "reason", "since"):
        table.add_column(col, overflow="fold")
    for d in dls:
        since = f"replayed {d.replayed}" if d.replayed else ("task succeeded" if d.task_state == SUCCESS else "")
        table.add_row(
            str(d.id), d.failed_at, d.task_id, d.headers.get(names.HDR_TASK, ""),
            d.headers.get(names.HDR_WORKER_TYPE, ""), clip(d.reason, 120), since,
        )
    console.print(table)


def _print_one(console: Console, d: DeadLetter) -> None:
    console.print(f"[bold]dead letter {d.id}[/]")
    for k, v in sorted(d.headers.items()):
        console.print(f"  {k}: {v}" + (f" ({d.failed_at})" if k == names.HDR_FAILED_AT else ""), markup=False)
    if d.replayed:
        console.print(f"  replayed {d.replayed}", markup=False)
    if d.task_state:
        console.print(f"  its task now: {d.task_state}", markup=False)
    try:
        tm = bounded_decode(task_decoder, d.data)
        body: Any = {"task": tm.task, "id": tm.id, "args": tm.args, "kwargs": tm.kwargs}
        console.print("  payload:", body)
    except DecodeError:
        console.print(f"  payload ({len(d.data)} bytes, not a task message): {d.data[:200]!r}")
