"""Helpers for tests: small clusters of core nodes over the in-memory network, and views of them."""

from __future__ import annotations

from collections.abc import Callable

from meshd.core.config import LAN, ProtocolConfig
from meshd.core.effects import MemberView
from meshd.core.messages import MemberState
from meshd.core.node import Node
from meshd.net.memory import Link, MemoryNetwork
from meshd.wire import Codec

ClusterFactory = Callable[..., tuple[MemoryNetwork, list[Node]]]


def alive_names(node: Node) -> set[str]:
    return {m.name for m in node.members() if m.state == MemberState.ALIVE}


def view(node: Node, name: str) -> MemberView:
    """What node knows about the member `name` (which it must know)."""
    m = node.member(name)
    assert m is not None, f"{node.name} does not know {name}"
    return m


def state_of(node: Node, name: str) -> MemberState | None:
    m = node.member(name)
    return m.state if m else None


def make_cluster(
    n: int,
    seed: int = 1,
    config: ProtocolConfig = LAN,
    link: Link | None = None,
    codec: Codec | None = None,
    converge: bool = True,
) -> tuple[MemoryNetwork, list[Node]]:
    """n nodes that joined through the first one and (by default) agree everyone is alive."""
    net = MemoryNetwork(seed=seed, link=link)
    codec = codec or Codec("test", None)
    nodes = [net.add_node(f"n{i}", config, codec) for i in range(n)]
    for node in nodes[1:]:
        node.join([nodes[0].addr], net.now)
        net.poke(node)
    if converge:
        names = {x.name for x in nodes}
        ok = net.run_until_true(lambda: all(alive_names(x) == names for x in nodes), 60.0)
        assert ok, "cluster did not converge"
    return net, nodes
