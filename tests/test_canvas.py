"""Task graphs end to end: chain, group, chord, map, error callbacks, against real servers.

One app, worker (with its router) and orchestrator serve the whole module; each
test submits its own goals.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import msgspec
import pytest

import heddle
from heddle.graphs.canvas import GraphResult, chain, chord, group
from heddle.graphs.model import (
    ChainNode,
    GoalMessage,
    GroupNode,
    MapNode,
    TaskNode,
    goal_decoder,
    node_task_id,
)
from heddle.messages import encoder
from heddle.testing import EmbeddedServers, running_worker
from heddle.testing.orchestrators import running_orchestrator
from tests.apps.graphs import define
from tests.conftest import wait_for

T = 15  # seconds any one graph may take here


@pytest.fixture(scope="module")
def g(heddle_servers: EmbeddedServers) -> Iterator[SimpleNamespace]:
    """The graph test tasks on a fresh app, with a worker, a router and an orchestrator running."""
    app = heddle.Heddle(
        f"g{uuid.uuid4().hex[:10]}", nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url
    )
    tasks = define(app)
    with running_worker(app, concurrency=32), running_orchestrator(app) as orch:
        yield SimpleNamespace(app=app, orch=orch, **vars(tasks))
    app.close()


# -- chains ------------------------------------------------------------------------------


def test_a_chain_passes_each_result_as_the_first_argument_of_the_next(g):
    r = chain(g.add.s(1, 1), g.mul.s(10), g.add.s(5)).delay()
    assert isinstance(r, GraphResult)
    assert r.get(timeout=T) == 25
    assert [c.get(timeout=1) for c in r.children] == [2, 20, 25]
    assert [c.id for c in r.children] == [node_task_id(r.id, str(i)) for i in range(3)]
    assert r.state == heddle.SUCCESS


def test_the_pipe_operator_builds_the_same_chain_and_delay_args_go_to_the_first_step(g):
    graph = g.add.s(1) | g.mul.s(3) | g.add.s(1)
    assert isinstance(graph, chain) and len(graph.tasks) == 3
    assert graph.delay(4).get(timeout=T) == 16  # (4 + 1) * 3 + 1


def test_an_immutable_signature_ignores_the_previous_result(g):
    r = (g.add.s(1, 1) | g.add.si(10, 10) | g.mul.s(2)).delay()
    assert r.get(timeout=T) == 40
    assert r.children[0].get(timeout=1) == 2


def test_a_handle_made_from_the_goal_id_reads_the_same_result(g):
    r = (g.add.s(2, 2) | g.mul.s(2)).apply_async(task_id=f"order-{uuid.uuid4().hex[:8]}")
    assert r.get(timeout=T) == 8
    assert g.app.AsyncResult(r.id).get(timeout=1) == 8
    record = g.app.AsyncResult(r.id).record
    assert record.worker == g.orch.name
    assert [row["name"] for row in record.meta["timeline"]] == ["graphs.add", "graphs.mul"]


async def test_a_full_handle_can_be_loaded_from_the_goal_id(g):
    r = (g.add.s(2, 2) | g.mul.s(3)).apply_async()
    assert await r.aget(timeout=T) == 12
    loaded = await GraphResult.aload(g.app, r.id)
    assert [await c.aget(timeout=1) for c in loaded.children] == [4, 12]
    assert set(await loaded.anodes()) == {"0", "1"}
    await g.app.aclose()


async def test_an_async_caller_awaits_a_graph(g):
    r = g.add.s(20, 1) | g.mul.s(2)
    result = await r.aapply_async()
    assert await result.aget(timeout=T) == 42
    await g.app.aclose()


# -- groups and chords --------------------------------------------------------------------


def test_a_group_returns_its_results_in_member_order_not_finishing_order(g):
    # The first member finishes last.
    r = group(g.slow.s(0, 0.4), g.slow.s(1, 0.0), g.slow.s(2, 0.2)).delay()
    assert r.get(timeout=T) == [0, 1, 2]
    nodes = r.nodes()
    assert nodes["0"].ended_at > nodes["1"].ended_at  # it really did finish out of order
    assert [c.get(timeout=1) for c in r.children] == [0, 1, 2]


def test_an_empty_group_gives_an_empty_list(g):
    assert group([]).apply_async(app=g.app).get(timeout=T) == []


def test_a_chord_calls_its_body_with_the_list_of_header_results(g):
    r = chord(group(g.add.s(i, i) for i in range(5)), g.tsum.s()).delay()
    assert r.get(timeout=T) == 20
    header, body = r.children
    assert isinstance(header, GraphResult)
    assert header.get(timeout=1) == [0, 2, 4, 6, 8]
    assert [c.get(timeout=1) for c in header.children] == [0, 2, 4, 6, 8]
    assert body.get(timeout=1) == 20


def test_a_group_piped_into_a_task_is_a_chord_and_chord_header_body_call_works(g):
    piped = group(g.add.s(1, 1), g.add.s(2, 2)) | g.tsum.s()
    assert isinstance(piped, chord)
    assert piped.delay().get(timeout=T) == 6
    assert chord([g.add.s(3, 3), g.add.s(4, 4)])(g.tsum.s()).get(timeout=T) == 14


def test_a_task_piped_into_a_group_passes_its_result_to_every_member(g):
    r = (g.add.s(1, 2) | group(g.mul.s(2), g.mul.s(3), g.add.s(100)) | g.tsum.s()).delay()
    assert r.get(timeout=T) == 3 * 2 + 3 * 3 + 103


def test_groups_of_chains_nest(g):
    r = group(chain(g.add.s(1, 1), g.mul.s(5)), chain(g.add.s(2, 2), g.mul.s(5))).delay()
    assert r.get(timeout=T) == [10, 20]
    first, _ = r.children
    assert isinstance(first, GraphResult)
    assert [c.get(timeout=1) for c in first.children] == [2, 10]
    assert r.node("1.1").get(timeout=1) == 20


# -- map ----------------------------------------------------------------------------------


def test_map_and_starmap_call_the_task_once_per_element_in_order(g):
    r = g.double.map([3, 1, 2]).delay()
    assert r.get(timeout=T) == [6, 2, 4]
    assert [c.get(timeout=1) for c in r.children] == [6, 2, 4]
    s = g.add.starmap([(1, 2), (3, 4), (5, 6)]).delay()
    assert s.get(timeout=T) == [3, 7, 11]
    assert g.double.map([]).apply_async(app=g.app).get(timeout=T) == []


def test_a_map_without_items_maps_over_the_previous_result(g):
    r = (g.split.s(4) | g.double.map() | g.tsum.s()).delay()
    assert r.get(timeout=T) == 0 + 2 + 4 + 6
    mapped = r.children[1]
    assert isinstance(mapped, GraphResult)
    assert [c.get(timeout=1) for c in mapped.children] == [0, 2, 4, 6]


def test_a_map_over_something_that_is_not_a_list_fails_naming_the_map(g):
    r = (g.add.s(1, 1) | g.double.map()).delay()
    with pytest.raises(heddle.TaskError, match=r"map\(graphs\.double\).*must be a list; got int"):
        r.get(timeout=T)


# -- failures ------------------------------------------------------------------------------


def test_a_failing_node_fails_the_graph_with_the_node_name(g):
    r = (g.add.s(1, 1) | g.fail.s() | g.mul.s(2)).delay()
    with pytest.raises(heddle.TaskError) as info:
        r.get(timeout=T)
    err = info.value
    assert "graphs.fail" in str(err)
    assert "node 'graphs.fail' at 1" in err.remote_message
    assert err.type_name == "builtins.ValueError"
    assert "fail was given [2]" in err.remote_message
    assert "raise ValueError" in err.remote_traceback
    assert r.state == heddle.FAILURE
    assert r.record.meta["failed_node"] == "1"
    # The step after the failure never ran.
    assert "2" not in r.nodes()
    assert r.children[2].state == heddle.PENDING


def test_a_failing_group_member_fails_the_chord_and_its_body_never_runs(g):
    r = chord(group(g.add.s(1, 1), g.fail.s(7), g.slow.s(3, 5.0)), g.tsum.s()).delay()
    with pytest.raises(heddle.TaskError, match=r"graphs\.fail"):
        r.get(timeout=T)
    nodes = r.nodes()
    assert nodes["0.1"].state == "failed"
    # The slow sibling was revoked rather than left running for nobody.
    assert nodes["0.2"].state == "revoked"
    assert "1" not in nodes


def test_an_error_callback_stands_in_for_the_failed_node_and_the_graph_goes_on(g):
    r = (g.add.s(1, 1) | g.fail.s().on_error(g.fallback.s("plan b")) | g.pair.s("next")).delay()
    value = r.get(timeout=T)
    recovered, nxt = value
    assert nxt == "next"
    assert recovered["value"] == "plan b"
    assert recovered["failed"] == "graphs.fail"
    assert recovered["type"] == "builtins.ValueError"
    assert "fail was given [2]" in recovered["message"]
    nodes = r.nodes()
    assert nodes["1"].state == "recovered"
    assert nodes["1.e"].state == "succeeded"
    assert r.state == heddle.SUCCESS


def test_link_error_on_a_group_recovers_the_whole_group(g):
    grp = group(g.add.s(1, 1), g.fail.s())
    handler = g.fallback.s()
    assert grp.link_error(handler) is handler
    r = (grp | g.pair.s("after")).delay()
    assert r.get(timeout=T)[0]["failed"] == "graphs.fail"


def test_a_single_signature_with_an_error_callback_runs_as_a_graph(g):
    r = g.fail.s(1).apply_async(link_error=g.fallback.s("saved"))
    assert isinstance(r, GraphResult)
    assert r.get(timeout=T)["value"] == "saved"


def test_a_failing_error_callback_fails_the_graph_naming_the_callback(g):
    r = g.fail.s(1).on_error(g.fail.s()).delay()
    with pytest.raises(heddle.TaskError, match=r"graphs\.fail' at 0\.e"):
        r.get(timeout=T)


def test_revoking_a_graph_stops_it_and_revokes_its_running_node(g):
    r = (g.slow.s(1, 30.0) | g.add.s(1)).delay()
    wait_for(lambda: "0" in r.nodes(), T, "the first node to be dispatched")
    r.revoke()
    with pytest.raises(heddle.TaskRevoked):
        r.get(timeout=T)
    wait_for(lambda: r.nodes()["0"].state == "revoked", T, "the running node to be revoked")
    assert r.children[0].state == heddle.REVOKED
    assert "1" not in r.nodes()


def test_a_lost_result_notice_is_caught_by_reading_valkey_again(g):
    from heddle.messages import ResultRecord
    from heddle.store import StoreRequest, encode_record

    r = (g.slow.s(1, 30.0) | g.add.s(1)).delay()
    wait_for(lambda: "0" in r.nodes(), T, "the first node to be dispatched")
    tid = node_task_id(r.id, "0")

    async def store_without_notice() -> None:
        # What a worker does, minus the notice (as if it was published while NATS reconnected).
        conns = await g.app.connections()
        record = ResultRecord(id=tid, state=heddle.SUCCESS, result=41)
        await conns.backend.store(StoreRequest(tid, heddle.SUCCESS, encode_record(record)))

    g.app.run_sync(store_without_notice(), 10)
    assert r.get(timeout=T) == 42
    g.app.AsyncResult(tid).revoke()  # stop the real, 30 s task


# -- building graphs: errors at the call site, and the wire form ---------------------------


def test_bad_graphs_fail_at_the_call_site_with_the_fix(g):
    with pytest.raises(TypeError, match=r"call add\.s\(\.\.\.\)"):
        chain(g.add, g.mul.s(2))
    with pytest.raises(heddle.HeddleError, match="at least one step"):
        chain()
    with pytest.raises(heddle.EncodeError, match=r"argument 0 of task 'graphs\.add'"):
        chain(g.add.s(object(), 1), g.mul.s(2)).delay()
    with pytest.raises(heddle.HeddleError, match="task_id"):
        chain(g.add.s(1, 1).set(task_id="mine")).delay()
    with pytest.raises(heddle.HeddleError, match="chord has no body"):
        chord([g.add.s(1, 1)]).delay()
    with pytest.raises(TypeError, match="starmap element 0"):
        g.add.starmap([1, 2])
    with pytest.raises(TypeError, match="graph's task_id"):
        chain(g.add.s(1, 1)).apply_async(task_id="has space")
    with pytest.raises(heddle.HeddleError, match="already has the error callback"):
        g.fail.s().on_error(g.fallback.s()).on_error(g.fallback.s("x"))


def test_a_graph_is_plain_msgpack_on_the_wire(g):
    graph = (g.add.s(1, 2) | group(g.mul.s(2), g.mul.map([1, 2])) | g.tsum.s()).on_error(g.fallback.s())
    node = graph.to_node()
    msg = GoalMessage(id="x", graph=node, args=[1])
    data = encoder.encode(msg)
    assert goal_decoder.decode(data) == msg
    plain = msgspec.msgpack.decode(data)  # no Python types needed to read it
    assert plain["graph"]["type"] == "chain"
    steps = node.steps
    assert isinstance(node, ChainNode) and isinstance(steps[0], TaskNode)
    assert steps[0].worker_type == g.app.worker_type
    assert isinstance(node.steps[1], GroupNode) and isinstance(node.steps[1].members[1], MapNode)

