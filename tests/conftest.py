"""Shared fixtures: small clusters of core nodes over the in-memory network."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshd.core.config import LAN, ProtocolConfig
from meshd.core.messages import MemberState
from meshd.core.node import Node
from meshd.net.memory import Link, MemoryNetwork
from meshd.wire import Codec

ClusterFactory = Callable[..., tuple[MemoryNetwork, list[Node]]]


def alive_names(node: Node) -> set[str]:
    return {m.name for m in node.members() if m.state == MemberState.ALIVE}


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


@pytest.fixture
def cluster() -> ClusterFactory:
    return make_cluster
