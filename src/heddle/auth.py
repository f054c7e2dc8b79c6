"""``heddle auth nats``: one NATS user per role, each allowed only what that role does.

NATS is Heddle's trust boundary. This module knows which subjects and JetStream
API calls each role uses (read from the code: ``names`` holds every subject) and
writes them as nats-server permissions:

* ``DIR/nats-auth.conf``: an ``authorization { users = [...] }`` block for
  nats-server to ``include``, one user per role with fresh random passwords
  (or, with ``--nkeys``, the public keys of fresh nkeys, whose seeds go to
  ``DIR/<role>.nk``);
* ``DIR/<role>.env``: that role's ``NATS_USER``, ``NATS_PASSWORD`` (or
  ``NATS_NKEY``) and ``NATS_INBOX_PREFIX`` (and ``NATS_URL`` with ``--url``), for
  ``--env-file``, ``kubectl create secret --from-env-file`` or ``set -a; . DIR/worker.env``.

Each role has its own reply-inbox prefix (``_INBOX_worker``, ...): JetStream API
replies and pull-consumer deliveries go to the requester's inbox, so a role
allowed to subscribe to ``_INBOX.>`` would read every other role's deliveries,
task payloads included. docs/security.md has the role table and the threat model.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from heddle import names

__all__ = ["ROLES", "Permissions", "add_auth_command", "inbox_prefix", "nats_auth_conf", "role_permissions",
           "run_auth_command", "write_nats_auth"]

#: Every role, in the order the files list them.
ROLES = ("client", "worker", "router", "orchestrator", "workshop")

_API = "$JS.API"
_STREAMS = (names.TASKS_STREAM, names.DLQ_STREAM, names.GOALS_STREAM, names.STREAMS_STREAM)
_KV_STREAM = f"KV_{names.WORKERS_BUCKET}"
_KV_SUBJECTS = f"$KV.{names.WORKERS_BUCKET}.>"
_PASSWORD_BYTES = 32


@dataclass(frozen=True)
class Permissions:
    """A nats-server user's permissions: subjects it may publish to and subscribe to.

    A deny wins over an allow; anything not allowed is refused.
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = field(default=())
    subscribe_deny: tuple[str, ...] = field(default=())


def inbox_prefix(role: str) -> str:
    """The reply-inbox prefix of ``role`` (``NATS_INBOX_PREFIX``)."""
    return f"_INBOX_{role}"


def _streams(*ops: str) -> list[str]:
    """Stream API calls ``ops`` (``CREATE``, ``UPDATE``, ``INFO``) on Heddle's four streams."""
    return [f"{_API}.STREAM.{op}.{s}" for op in ops for s in _STREAMS]


def _consumer(stream: str, durable: str) -> list[str]:
    """Everything a process does with its durable pull consumer: create or update, read, pull, ack."""
    return [
        f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"{_API}.CONSUMER.CREATE.{stream}.{durable}",
        f"{_API}.CONSUMER.CREATE.{stream}.{durable}.>",
        f"{_API}.CONSUMER.INFO.{stream}.{durable}",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        # Acks, naks and in-progress acks go to the reply subject of each delivery.
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def _advisory(consumer: str) -> str:
    return names.MAX_DELIVERIES_ADVISORY.format(stream=names.TASKS_STREAM, consumer=consumer)


def _messages(stream: str) -> list[str]:
    """Read and delete one stored message (a max-deliveries advisory's task)."""
    return [f"{_API}.STREAM.MSG.GET.{stream}", f"{_API}.STREAM.MSG.DELETE.{stream}"]


# The workers bucket (heartbeats): a worker writes its entry; routers and the Workshop read them all.
_KV_CREATE = [f"{_API}.STREAM.CREATE.{_KV_STREAM}", f"{_API}.STREAM.INFO.{_KV_STREAM}"]
_KV_READ = [
    f"{_API}.STREAM.INFO.{_KV_STREAM}",
    f"{_API}.STREAM.MSG.GET.{_KV_STREAM}",
    f"{_API}.DIRECT.GET.{_KV_STREAM}",
    f"{_API}.DIRECT.GET.{_KV_STREAM}.>",
]
# Periodic schedules (heddle.schedules): a worker process of an app with schedules creates
# the stream, installs and removes definitions, and takes ticks from its app's consumer.
_SCHEDULES = names.SCHEDULES_STREAM
_SCHEDULER = [
    *(f"{_API}.STREAM.{op}.{_SCHEDULES}" for op in ("CREATE", "UPDATE", "INFO", "PURGE", "MSG.GET")),
    *_consumer(_SCHEDULES, "*"),
    names.schedule_subject("*", "*"),  # definitions: heddle.schedules.def.{app}.{name}
]
_SCHEDULES_READ = [f"{_API}.STREAM.INFO.{_SCHEDULES}", f"{_API}.STREAM.MSG.GET.{_SCHEDULES}"]
_SEND = [names.INCOMING_SUBJECT, names.GOALS_SUBJECT]  # tasks and goals, as a client sends them
_RESULTS = f"{names.RESULT_SUBJECT_PREFIX}>"
_INFO = f"{_API}.INFO"  # account info: preflight and /readyz
# Token streams (heddle.chunks): workers publish a task's chunks on heddle.streams.{id};
# readers (handle.stream(), the Workshop) replay one task's subject through an ordered
# consumer of their own (an ephemeral push consumer, flow-controlled, delivered to their
# inbox) and read the subject's last sequence to know where a finished task's stream ends.
_CHUNKS = names.STREAMS_STREAM
_STREAM_READ = [
    f"{_API}.CONSUMER.CREATE.{_CHUNKS}",
    f"{_API}.CONSUMER.CREATE.{_CHUNKS}.>",
    f"{_API}.STREAM.MSG.GET.{_CHUNKS}",
    f"$JS.FC.{_CHUNKS}.>",
]


def role_permissions() -> dict[str, Permissions]:
    """What each role may publish and subscribe to; see docs/security.md for why."""
    worker_consumer = _consumer(names.TASKS_STREAM, "*")
    not_theirs = [*_consumer(names.TASKS_STREAM, names.ROUTER_CONSUMER),
                  *_consumer(names.TASKS_STREAM, names.ORCHESTRATOR_CONSUMER)]
    return {
        # Sends tasks and goals and revokes them. Results are read from Valkey: a user that may
        # subscribe to one heddle.results.{id} may subscribe to heddle.results.> too (nats-server
        # cannot tell them apart), so clients get no result notices (docs/security.md).
        "client": Permissions(
            publish=(_INFO, *_streams("CREATE"), *_SEND, names.REVOKE_SUBJECT, *_STREAM_READ),
            subscribe=(f"{inbox_prefix('client')}.>",),
        ),
        # Consumes its worker type's subject, stores results, announces them and its events,
        # dead-letters, heartbeats into the workers bucket; tasks may send subtasks.
        "worker": Permissions(
            publish=(
                _INFO, *_streams("CREATE"), *_KV_CREATE, _KV_SUBJECTS, *worker_consumer,
                *_messages(names.TASKS_STREAM), names.DEAD_LETTER_SUBJECT, *_SEND, _RESULTS,
                f"{names.TASK_EVENTS_PREFIX}>", f"{names.WORKER_EVENTS_PREFIX}>", f"{names.LLM_EVENTS_PREFIX}>",
                *_SCHEDULER, names.STREAM_SUBJECTS, *_STREAM_READ,
            ),
            publish_deny=tuple(not_theirs),
            subscribe=(f"{inbox_prefix('worker')}.>", names.REVOKE_SUBJECT, _advisory("*"),
                       names.MAX_DELIVERIES_ADVISORY.format(stream=_SCHEDULES, consumer="*")),
            subscribe_deny=(_advisory(names.ROUTER_CONSUMER),),
        ),
        # Takes heddle.tasks.incoming, publishes routed copies, follows the workers bucket and
        # announces its routing rules there (heddle.routes).
        "router": Permissions(
            publish=(
                _INFO, *_streams("CREATE", "UPDATE"), *_KV_CREATE, *_KV_READ, _KV_SUBJECTS,
                *_consumer(names.TASKS_STREAM, names.ROUTER_CONSUMER), *_messages(names.TASKS_STREAM),
                names.ROUTED_SUBJECTS, names.BANDED_SUBJECTS, names.DEAD_LETTER_SUBJECT, _RESULTS,
                f"{names.TASK_EVENTS_PREFIX}>",
            ),
            subscribe=(f"{inbox_prefix('router')}.>", _KV_SUBJECTS, _advisory(names.ROUTER_CONSUMER)),
        ),
        # Takes goals, sends their tasks, waits for their results, announces progress.
        "orchestrator": Permissions(
            publish=(
                _INFO, *_streams("CREATE", "UPDATE"),
                *_consumer(names.GOALS_STREAM, names.ORCHESTRATOR_CONSUMER),
                names.INCOMING_SUBJECT, names.DEAD_LETTER_SUBJECT, _RESULTS, f"{names.GOAL_EVENTS_PREFIX}>",
            ),
            subscribe=(f"{inbox_prefix('orchestrator')}.>", _RESULTS, names.REVOKE_SUBJECT),
        ),
        # The Workshop and the operator's commands (status, events, inspect, dlq): reads
        # everything, sends and replays tasks, changes nothing else.
        "workshop": Permissions(
            publish=(
                _INFO, *_streams("CREATE", "INFO"), *_KV_CREATE, *_KV_READ,
                *(f"{_API}.CONSUMER.{op}.{s}" for op in ("LIST", "NAMES") for s in _STREAMS),
                *(f"{_API}.CONSUMER.INFO.{s}.*" for s in _STREAMS),
                f"{_API}.STREAM.MSG.GET.{names.DLQ_STREAM}", *_SCHEDULES_READ,
                *_SEND, names.REVOKE_SUBJECT, *_STREAM_READ,
            ),
            subscribe=(f"{inbox_prefix('workshop')}.>", names.EVENTS_ALL, _RESULTS, _KV_SUBJECTS),
        ),
    }


def _quoted(subjects: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in dict.fromkeys(subjects)) + "]"


def nats_auth_conf(passwords: dict[str, str] | None = None, nkeys: dict[str, str] | None = None) -> str:
    """The nats-server ``authorization`` block: one user per role, by password or by nkey.

    Args:
        passwords: role -> password.
        nkeys: role -> the public key of its nkey (``U...``): the block then holds no secret.
    """
    perms = role_permissions()
    secret = passwords is not None
    lines = [
        "# Heddle's NATS users, one per role, each allowed only what that role does.",
        "# Written by `heddle auth nats`; include it from nats-server's config.",
        "# It holds passwords: keep it as private as the server's config (a Kubernetes Secret, mode 0600)."
        if secret else "# Users are nkeys: this file holds public keys only.",
        "authorization {",
        "  users = [",
    ]
    logins = passwords if passwords is not None else nkeys or {}
    for role, login in logins.items():
        p = perms[role]
        lines += [
            "    {",
            *((f'      user: "{role}"', f'      password: "{login}"') if secret else (f'      nkey: "{login}"',)),
            "      permissions: {",
            f"        publish: {{ allow: {_quoted(p.publish)}"
            + (f", deny: {_quoted(p.publish_deny)}" if p.publish_deny else "") + " }",
            f"        subscribe: {{ allow: {_quoted(p.subscribe)}"
            + (f", deny: {_quoted(p.subscribe_deny)}" if p.subscribe_deny else "") + " }",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def role_env(role: str, password: str | None = None, url: str | None = None, nkey_path: str | None = None) -> str:
    """``role``'s ``NATS_*`` variables as an env file (``KEY=value`` lines): a password, or an nkey seed file."""
    lines = [f"# Heddle NATS login of the {role} role, written by `heddle auth nats`. Keep it private."]
    if url:
        lines.append(f"NATS_URL={url}")
    if nkey_path:
        lines.append(f"NATS_NKEY={nkey_path}")
    else:
        lines += [f"NATS_USER={role}", f"NATS_PASSWORD={password}"]
    lines += [
        f"NATS_INBOX_PREFIX={inbox_prefix(role)}",
        # Tasks go through the router, which is allowed to publish to worker subjects:
        # its rate limits then hold for every sender (heddle.routes).
        "HEDDLE_DIRECT_ROUTING=0",
        "",
    ]
    return "\n".join(lines)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only, from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def write_nats_auth(out: Path, url: str | None = None, *, use_nkeys: bool = False) -> list[Path]:
    """Write ``out/nats-auth.conf`` and ``out/<role>.env`` with fresh credentials; return the paths.

    With ``use_nkeys`` each role gets an nkey instead of a password: its seed in
    ``out/<role>.nk`` (``NATS_NKEY`` names it), and the include holds public keys only.
    Running it again makes new credentials (rotation): replace the server's include
    and every role's files together.
    """
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = [out / "nats-auth.conf"]
    if not use_nkeys:
        passwords = {role: secrets.token_urlsafe(_PASSWORD_BYTES) for role in ROLES}
        _write_private(written[0], nats_auth_conf(passwords=passwords))
        for role, password in passwords.items():
            written.append(out / f"{role}.env")
            _write_private(written[-1], role_env(role, password, url))
        return written
    import nkeys

    publics: dict[str, str] = {}
    for role in ROLES:
        seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
        publics[role] = nkeys.from_seed(bytearray(seed)).public_key.decode()
        seed_path = (out / f"{role}.nk").resolve()
        _write_private(seed_path, seed.decode() + "\n")
        written.append(out / f"{role}.env")
        _write_private(written[-1], role_env(role, url=url, nkey_path=str(seed_path)))
    _write_private(written[0], nats_auth_conf(nkeys=publics))
    return written


def add_auth_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``heddle auth nats --out DIR``."""
    auth = sub.add_parser("auth", help="write credentials: one NATS user per role with least privilege")
    kinds = auth.add_subparsers(dest="auth_command", required=True)
    n = kinds.add_parser(
        "nats",
        help="DIR/nats-auth.conf (a nats-server include) and DIR/<role>.env, fresh passwords each run",
        description="Write a nats-server authorization include with one user per role (client, worker, router, "
                    "orchestrator, workshop), each allowed only the subjects and JetStream calls it needs, and "
                    "each role's NATS_* variables. See docs/security.md.",
    )
    n.add_argument("--out", required=True, type=Path, help="directory to write into (created, mode 0700)")
    n.add_argument("--url", default=None, help="also write NATS_URL=URL into every <role>.env")
    n.add_argument("--nkeys", action="store_true",
                   help="nkeys instead of passwords: seeds in DIR/<role>.nk, public keys only in nats-auth.conf")


def run_auth_command(args: argparse.Namespace) -> int:
    """Run ``heddle auth nats``; print what was written, never a password."""
    written = write_nats_auth(args.out, url=args.url, use_nkeys=args.nkeys)
    print(f"wrote {written[0]} (include it in nats-server's config, then reload it) and:")
    login = "NATS_NKEY (its seed beside it, .nk)" if args.nkeys else "NATS_USER, NATS_PASSWORD"
    for path in written[1:]:
        print(f"  {path}  ({path.stem}: {login}, NATS_INBOX_PREFIX)")
    print("They hold secrets: keep them private, and delete them once stored in your secret store.")
    return 0
