"""100+ simulated nodes over the lossy in-memory network: the issue's three scenarios."""

from __future__ import annotations

import pytest

from meshd.core.config import LAN
from meshd.core.messages import MemberState
from tests.cluster import alive_names, make_cluster, state_of

pytestmark = pytest.mark.sim
N = 120


def test_one_kill_is_detected_by_all() -> None:
    net, nodes = make_cluster(N, seed=11)
    victim = nodes[37]
    net.kill(victim)
    others = [n for n in nodes if n is not victim]
    ok = net.run_until_true(
        lambda: all(state_of(n, victim.name) == MemberState.DEAD for n in others), 120.0, step=0.5
    )
    assert ok
    # Nobody else was declared dead on the way.
    wrongly = {e.member.name for _, _, e in net.events if e.kind == "dead"} - {victim.name}
    assert not wrongly


def test_ten_percent_loss_gives_no_false_dead() -> None:
    net, nodes = make_cluster(N, seed=12)
    net.link.loss = 0.10
    start = len(net.events)
    net.run_for(90.0)
    dead = [e for _, _, e in net.events[start:] if e.kind == "dead"]
    assert dead == []
    names = {n.name for n in nodes}
    assert all(alive_names(n) == names for n in nodes)


def test_thirty_second_partition_heals_by_itself() -> None:
    net, nodes = make_cluster(N, seed=13, config=LAN)
    a, b = nodes[: N // 2], nodes[N // 2 :]
    net.partition(a, b)
    t0 = net.now
    assert net.run_until_true(
        lambda: all(state_of(n, b[0].name) == MemberState.DEAD for n in a), 120.0, step=0.5
    )
    net.run_until(t0 + 30.0)
    net.heal()
    names = {n.name for n in nodes}
    assert net.run_until_true(lambda: all(alive_names(n) == names for n in nodes), 120.0, step=1.0)
