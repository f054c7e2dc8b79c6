"""Goal checkpoints in Valkey, behind the result backend's seam.

One hash per goal, ``heddle:goal:{id}``: a field per node path holding its
msgpack :class:`~heddle.graphs.model.NodeState`, plus ``@goal`` (the
:class:`~heddle.graphs.model.GoalState`) and ``@graph`` (the goal message, so a
handle made from an id can show the graph). Writes go through a Lua script
registered with :class:`~heddle.results.ResultBackend`, so a write and its
expiry are one atomic step and valkey errors are translated in one place.

Node *values* are not copied here: a task node's result is its task result
(``heddle:result:{goal}:{path}``), stored by the worker that ran it. A resumed
goal walks its graph again; nodes whose results are stored return at once,
nodes marked dispatched are waited on (their messages are in JetStream), and
only nodes never dispatched are sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from heddle import names
from heddle.errors import DecodeError
from heddle.graphs.model import GoalMessage, GoalState, NodeState, goal_decoder, goal_state_decoder, node_state_decoder
from heddle.messages import encoder
from heddle.redact import redact
from heddle.store import ResultBackend

log = logging.getLogger("heddle.orchestrator")

GOAL_FIELD: Final = "@goal"
GRAPH_FIELD: Final = "@graph"

PUT_LUA = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

LOAD_LUA = """
return redis.call('HGETALL', KEYS[1])
"""


@dataclass
class Checkpoint:
    """What a goal's hash holds: its own state, its nodes' states, its message."""

    goal: GoalState | None = None
    nodes: dict[str, NodeState] = field(default_factory=dict)
    goal_message: GoalMessage | None = None


class GoalStore:
    """Reads and writes goal checkpoints.

    Args:
        backend: A connected result backend (its connection and error translation are used).
        ttl_s: How long a checkpoint lives after its last write (the result TTL).
    """

    def __init__(self, backend: ResultBackend, ttl_s: float) -> None:
        self.backend = backend
        self._ttl = str(int(ttl_s))
        backend.register_script("goal_put", PUT_LUA)
        backend.register_script("goal_load", LOAD_LUA)

    async def put(
        self,
        goal_id: str,
        nodes: Sequence[NodeState] = (),
        goal: GoalState | None = None,
        message: bytes | None = None,
    ) -> None:
        """Write node states (and the goal's state and message) in one atomic step."""
        args: list[Any] = [self._ttl]
        for n in nodes:
            args += [n.path, encoder.encode(n)]
        if goal is not None:
            args += [GOAL_FIELD, encoder.encode(goal)]
        if message is not None:
            args += [GRAPH_FIELD, message]
        if len(args) == 1:
            return
        await self.backend.run_script_many("goal_put", [((names.goal_key(goal_id),), args)])

    async def load(self, goal_id: str) -> Checkpoint:
        """Read a goal's checkpoint; empty if the goal never started (or expired)."""
        (flat,) = await self.backend.run_script_many("goal_load", [((names.goal_key(goal_id),), ())])
        cp = Checkpoint()
        try:
            for k, v in zip(flat[::2], flat[1::2], strict=True):
                key = k.decode()
                if key == GOAL_FIELD:
                    cp.goal = goal_state_decoder.decode(v)
                elif key == GRAPH_FIELD:
                    cp.goal_message = goal_decoder.decode(v)
                else:
                    cp.nodes[key] = node_state_decoder.decode(v)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"checkpoint of goal {goal_id} is not valid: {exc}") from exc
        return cp


async def check_durability(backend: ResultBackend) -> str | None:
    """Return a warning if Valkey would lose checkpoints on a restart, else None.

    Checkpoints are only as durable as Valkey: without the append-only file, a
    restarted valkey-server forgets every checkpoint and result written since
    its last snapshot, and resumed goals would re-run nodes that had finished.
    """
    try:
        values = await backend.config_values("appendonly")
        # In a Cluster every primary holds some checkpoints: the weakest one decides.
        value = next((v for v in values if v != "yes"), "yes") if values else ""
    except Exception as exc:  # managed services often disable CONFIG: say so, do not fail
        return (
            f"could not check that valkey-server at {redact(backend.url)} has AOF persistence on "
            f"(CONFIG GET appendonly failed: {exc}); goal checkpoints need `appendonly yes` "
            f"to survive a valkey-server restart"
        )
    if value != "yes":
        return (
            f"valkey-server at {redact(backend.url)} has appendonly={value}: goal checkpoints and task "
            f"results are LOST if it restarts, and resumed goals may run finished nodes again. "
            f"Turn on AOF persistence: `appendonly yes` and `appendfsync everysec` in valkey.conf "
            f"(or CONFIG SET appendonly yes)"
        )
    return None
