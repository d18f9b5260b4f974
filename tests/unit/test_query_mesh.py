"""Queries across a mesh of core nodes (tests/cluster.py): the query clock cannot be broken by a
key holder, survives a restart (meshd/state.py) and travels in push-pull (issues 9 and 10)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from meshd import state
from meshd.core.config import LAN
from meshd.core.messages import Query, QueryFilter
from meshd.core.node import Node
from meshd.core.query import QueryAction, QueryResult, QueryState
from meshd.net.memory import MemoryNetwork
from meshd.wire import encode_message
from tests.cluster import alive_names, make_cluster


def answer_ok(node: Node, action: QueryAction) -> bytes:
    return node.name.encode()


def run_query(net: MemoryNetwork, asker: Node, timeout: float = 5.0) -> QueryResult:
    """Ask from `asker`, run the network until the answer is in; the result."""
    before = len(net.query_results)
    asker.ask("health", b"", QueryFilter(), timeout, 0, net.now)
    net.poke(asker)
    assert net.run_until_true(lambda: len(net.query_results) > before, timeout + 1.0, step=0.01)
    name, result = net.query_results[-1]
    assert name == asker.name
    return result


def answered(result: QueryResult) -> set[str]:
    return {a.name for a in result.responses}


def mesh(n: int, seed: int = 3) -> tuple[MemoryNetwork, list[Node]]:
    net, nodes = make_cluster(n, seed=seed)
    net.query_handler = answer_ok
    net.record_events = False
    return net, nodes


def forge(net: MemoryNetwork, node: Node, query: Query) -> None:
    """A key holder sends `query` to `node` (sealed with the cluster key, as a member would)."""
    node.receive_datagram(node.codec.pack([encode_message(query)]), "198.18.0.66:7788", net.now)
    net.poke(node)


def test_forged_ltimes_are_dropped_and_every_later_query_is_answered_by_everyone() -> None:
    net, nodes = mesh(4)
    everyone = {n.name for n in nodes}
    template = Query(0, 7, "health", b"", "evil", "198.18.0.66:7788", QueryFilter(), 0, 5.0)
    for bad in ((1 << 64) - 1, 5_000_000):  # the ceiling of u64, and a huge jump
        for n in nodes:
            forge(net, n, msgspec.structs.replace(template, ltime=bad))
    net.run_for(1.0)
    for n in nodes:
        assert n.stats().counters["queries.query.bad_ltime"] == 2
        assert n.queries.clock.time() < 1000
    for asker in nodes:  # before: OverflowError on every node's next query (API 500)
        result = run_query(net, asker)
        assert answered(result) == everyone
        assert result.missing == ()


def test_restarted_node_restored_from_its_state_is_answered_at_once(tmp_path: Path) -> None:
    net, nodes = mesh(4)
    everyone = {n.name for n in nodes}
    for i in range(600):  # the mesh runs ~600 queries; everybody's clock passes 600
        run_query(net, nodes[i % 3])
    old = nodes[3]
    assert old.queries.clock.time() >= 600
    replay = Query(599, 12345, "health", b"", "n0", nodes[0].addr, QueryFilter(), 0, 5.0)
    forge(net, old, replay)
    state.write_query_state(tmp_path, old.queries.export_state())  # the shell's shutdown write

    net.kill(old)
    net.remove(old)
    net.run_for(2.0)
    new = net.add_node(old.name, LAN, old.codec, addr=old.addr, incarnation=old.incarnation + 1)
    saved = state.read_query_state(tmp_path)
    assert saved is not None
    new.queries.restore(saved)
    assert new.queries.clock.time() >= old.queries.clock.time()

    # The replay (seen before the restart) is still a duplicate: not answered twice.
    forge(net, new, replay)
    assert new.stats().counters["queries.query.duplicate"] == 1

    new.join([nodes[0].addr], net.now)
    net.poke(new)
    assert net.run_until_true(lambda: alive_names(new) == everyone, 30.0)
    result = run_query(net, new)
    assert answered(result) == everyone
    assert result.missing == ()


def test_push_pull_carries_the_query_clock_both_ways() -> None:
    net, nodes = mesh(3)
    everyone = {n.name for n in nodes}
    for i in range(600):
        run_query(net, nodes[i % 3])
    mesh_time = max(n.queries.clock.time() for n in nodes)
    assert mesh_time >= 600

    # A fresh node learns the mesh's clock from its join push-pull, before any query.
    fresh = net.add_node("n9", LAN, nodes[0].codec)
    assert fresh.queries.clock.time() == 0
    fresh.join([nodes[0].addr], net.now)
    net.poke(fresh)
    assert net.run_until_true(lambda: fresh.stats().counters.get("join.ok", 0) == 1, 10.0, step=0.01)
    assert fresh.queries.clock.time() >= mesh_time
    assert net.run_until_true(lambda: alive_names(fresh) == everyone | {"n9"}, 30.0)
    assert answered(run_query(net, fresh)) == everyone | {"n9"}

    # The other way: a node whose clock is ahead moves the seed it joins forward.
    ahead = net.add_node("n8", LAN, nodes[0].codec)
    ahead.queries.restore(QueryState(mesh_time + 50_000))
    ahead.join([nodes[1].addr], net.now)
    net.poke(ahead)
    assert net.run_until_true(lambda: ahead.stats().counters.get("join.ok", 0) == 1, 10.0, step=0.01)
    assert nodes[1].queries.clock.time() >= mesh_time + 50_000
