"""What a join takes in and passes on."""

from __future__ import annotations

from meshd.core.config import LAN
from meshd.net.memory import MemoryNetwork
from meshd.wire import Codec


def mesh(n: int, prefix: str) -> tuple[MemoryNetwork, list]:
    net = MemoryNetwork(seed=5)
    codec = Codec("test", None)
    nodes = [net.add_node(f"{prefix}{i}", LAN, codec) for i in range(n)]
    for nd in nodes[1:]:
        nd.join([nodes[0].addr], net.now)
        net.poke(nd)
    names = {nd.name for nd in nodes}
    assert net.run_until_true(lambda: all({m.name for m in x.members()} == names for x in nodes), 60.0)
    net.run_for(30.0)  # every join's gossip has run out
    return net, nodes


def test_a_node_that_knew_others_passes_on_what_a_merge_taught_it() -> None:
    # Two meshes joined by one node (serf join): the other side is news to its own mesh.
    net, left = mesh(6, "a")
    codec = Codec("test", None)
    right = [net.add_node(f"b{i}", LAN, codec) for i in range(6)]
    for nd in right[1:]:
        nd.join([right[0].addr], net.now)
        net.poke(nd)
    assert net.run_until_true(lambda: len(right[0].members()) == 6, 60.0)
    left[1].join([right[0].addr], net.now)
    net.poke(left[1])
    net.run_for(0.05)
    assert all(left[1].broadcasts.pending("m:" + nd.name) for nd in right)


def test_a_fresh_node_takes_its_seeds_whole_table_past_the_new_member_rate() -> None:
    # At 10,000 members the rate's burst kept most of the mesh out of a restarted node's table
    # until its next push-pull, minutes later (its site summary then missed members).
    net, nodes = mesh(12, "n")
    cfg = LAN.replace(new_member_rate=0.01, new_member_burst=3)
    fresh = net.add_node("fresh", cfg, Codec("test", None))
    fresh.join([nodes[3].addr], net.now)
    net.poke(fresh)
    net.run_for(0.05)
    assert len(fresh.members()) == 13
    assert fresh.counters.get("drops.new_member_rate", 0) == 0
    # The table limit still holds: a table larger than it is refused whole.
    small = net.add_node("small", cfg.replace(max_members=8), Codec("test", None))
    small.join([nodes[3].addr], net.now)
    net.poke(small)
    net.run_for(0.05)
    assert len(small.members()) <= 8
    assert small.counters["drops.push_pull_size"] > 0
