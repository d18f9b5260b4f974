"""Every membership rule, driven by explicit virtual time over the in-memory network."""

from __future__ import annotations

import random

import pytest

from meshd.core.config import LAN, LOCAL
from meshd.core.effects import AnswerQuery, MemberEvent, OpenStream, QueryDone
from meshd.core.messages import (
    Alive,
    Dead,
    IndirectPing,
    MemberState,
    Message,
    Ping,
    PushNodeState,
    PushPull,
    QueryFilter,
    Suspect,
)
from meshd.core.node import Node
from meshd.crypto import Keyring
from meshd.net.memory import MemoryNetwork
from meshd.wire import Codec, encode_message
from tests.cluster import alive_names, make_cluster, state_of, view


def inject(net: MemoryNetwork, node: Node, *msgs: Message) -> None:
    """Deliver messages to a node as if a peer had sent them."""
    node.receive_datagram(node.codec.pack([encode_message(m) for m in msgs]), "peer:1", net.now)
    net.poke(node)


def test_join_converges_and_everyone_is_alive() -> None:
    _net, nodes = make_cluster(8)
    for n in nodes:
        assert alive_names(n) == {f"n{i}" for i in range(8)}
    assert all(m.incarnation == 0 for m in nodes[3].members())


def test_kill_is_detected_as_dead_by_everyone() -> None:
    net, nodes = make_cluster(10)
    victim = nodes[4]
    net.kill(victim)
    t0 = net.now
    ok = net.run_until_true(
        lambda: all(state_of(n, victim.name) == MemberState.DEAD for n in nodes if n is not victim),
        60.0,
    )
    assert ok
    # Never faster than the minimum suspicion timeout: 4 * log10(10) * 1 s.
    assert net.now - t0 >= 4.0
    suspects = [e for _, who, e in net.events if e.kind == "suspect" and e.member.name == victim.name]
    assert suspects, "a death must go through suspicion first"


def test_suspected_node_refutes_with_higher_incarnation() -> None:
    net, nodes = make_cluster(5)
    target = nodes[2]
    before = target.incarnation
    inject(net, nodes[0], Suspect(before, target.name, "n3"))
    assert state_of(nodes[0], target.name) == MemberState.SUSPECT
    ok = net.run_until_true(lambda: all(state_of(n, target.name) == MemberState.ALIVE for n in nodes), 10.0)
    assert ok
    assert target.incarnation == before + 1
    assert target.counters.get("refutes", 0) >= 1
    # Refuting means "maybe I am the slow one": awareness went up.
    assert target.awareness.score >= 1 or target.counters.get("probes", 0) > 0


def test_refutation_bumps_awareness() -> None:
    net, nodes = make_cluster(3)
    target = nodes[1]
    assert target.awareness.score == 0
    inject(net, target, Suspect(target.incarnation, target.name, "n0"))
    assert target.awareness.score == 1
    assert target.counters["refutes"] == 1


def test_older_incarnation_is_ignored() -> None:
    net, nodes = make_cluster(3)
    a, b = nodes[0], nodes[1]
    inject(net, b, Suspect(b.incarnation, b.name, "x"))  # b refutes to incarnation 1
    net.run_for(3.0)
    assert view(a, b.name).incarnation == 1
    inject(net, a, Suspect(0, b.name, "n2"))  # stale
    assert state_of(a, b.name) == MemberState.ALIVE
    inject(net, a, Dead(0, b.name, "n2"))  # stale
    assert state_of(a, b.name) == MemberState.ALIVE
    inject(net, a, Alive(1, b.name, b.node_id, "elsewhere:9"))  # not newer: no address change
    assert view(a, b.name).addr == b.addr


def test_confirmations_shorten_the_suspicion() -> None:
    net, nodes = make_cluster(8)
    obs, victim = nodes[0], nodes[7]
    net.kill(victim)
    inject(net, obs, Suspect(0, victim.name, "n1"))
    s = obs._suspicions[victim.name]
    lonely = s.deadline
    inject(net, obs, Suspect(0, victim.name, "n2"))
    inject(net, obs, Suspect(0, victim.name, "n2"))  # same accuser again: nothing new
    assert len(s.confirmations) == 2
    assert s.deadline < lonely
    inject(net, obs, Suspect(0, victim.name, "n3"))
    assert s.deadline == pytest.approx(s.start + s.min_timeout)


def test_suspicion_expires_to_dead_at_the_dynamic_timeout() -> None:
    net, nodes = make_cluster(6)
    obs, victim = nodes[0], nodes[5]
    net.kill(victim)
    for other in nodes[1:5]:
        net.kill(other)  # nobody left to confirm or to gossip a refutation
    inject(net, obs, Suspect(0, victim.name, "n1"))
    s = obs._suspicions[victim.name]
    assert s.deadline == pytest.approx(s.start + s.max_timeout)
    assert net.run_until_true(lambda: state_of(obs, victim.name) == MemberState.DEAD, 60.0, step=0.01)
    # obs's own failed probe may count as one more confirmation; the death still waits for
    # the deadline those confirmations give, never less than the minimum.
    assert s.deadline - 0.011 <= net.now <= s.deadline + 0.011
    assert net.now - s.start >= s.min_timeout


def test_buddy_system_lets_a_suspect_refute_at_once() -> None:
    net, nodes = make_cluster(4, config=LAN.replace(suspicion_mult=50))
    target = nodes[1]
    # Everyone but the target suspects it; the target itself heard nothing.
    for n in nodes:
        if n is not target:
            inject(net, n, Suspect(0, target.name, "n3"))
    # The broadcast queue would also carry the rumour; cut gossip so only a probe can.
    for n in nodes:
        n.broadcasts._items.clear()
    ok = net.run_until_true(lambda: target.incarnation > 0, 10.0, step=0.05)
    assert ok, "a probe of a suspect must carry the suspicion to it"
    assert any(n.counters.get("msgs.in.suspect", 0) for n in [target])


def test_indirect_probe_through_relays_keeps_member_alive() -> None:
    net, nodes = make_cluster(5, config=LAN.replace(suspicion_mult=2))
    a, b = nodes[0], nodes[1]
    net.block(a, b)  # a's UDP to b is lost; everyone else can reach b
    net.run_for(40.0)
    assert state_of(a, b.name) == MemberState.ALIVE
    assert not [e for _, _, e in net.events if e.kind == "dead"]
    assert any(n.counters.get("msgs.in.indirectping", 0) for n in nodes)


def test_relay_nacks_when_target_is_silent() -> None:
    net, nodes = make_cluster(3)
    relay, origin, target = nodes[0], nodes[1], nodes[2]
    net.kill(target)
    inject(net, relay, IndirectPing(777, target.name, target.addr, origin.name, origin.addr, True))
    assert relay._relays
    net.run_for(LAN.probe_timeout + 0.1)
    assert not relay._relays
    assert origin.counters.get("msgs.in.nack", 0) >= 1


def test_tcp_fallback_ping_avoids_suspicion_when_only_udp_fails() -> None:
    net, nodes = make_cluster(2)
    a, b = nodes
    net.block(a, b)
    net.block(b, a)
    net.run_for(20.0)
    assert state_of(a, b.name) == MemberState.ALIVE
    assert a.counters.get("probes.tcp_only", 0) >= 1


def test_missing_nacks_raise_awareness_and_stretch_the_probe_interval() -> None:
    net, nodes = make_cluster(5)
    slow = nodes[0]
    for other in nodes[1:]:
        net.block(other, slow)  # slow hears nothing: no acks, no nacks
    net.run_for(6.0)
    # slow hears nothing, so it never refutes: its score can only come from missed nacks.
    assert slow.awareness.score >= 2
    probes_before = {n.name: n.counters.get("probes", 0) for n in nodes}
    net.run_for(10.0)
    made = {n.name: n.counters.get("probes", 0) - probes_before[n.name] for n in nodes}
    # A stretched interval: far fewer probes than the unscaled one per second (10 here).
    assert made[slow.name] <= 5


def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    net, nodes = make_cluster(6)
    leaver = nodes[3]
    leaver.leave(net.now)
    net.poke(leaver)
    assert leaver.leave_pending()
    net.run_for(1.0)
    net.kill(leaver)
    ok = net.run_until_true(
        lambda: all(state_of(n, leaver.name) == MemberState.LEFT for n in nodes if n is not leaver), 10.0
    )
    assert ok
    net.run_for(60.0)
    assert all(state_of(n, leaver.name) == MemberState.LEFT for n in nodes if n is not leaver)


def test_leave_overrides_an_earlier_dead() -> None:
    net, nodes = make_cluster(3)
    a, b = nodes[0], nodes[1]
    inject(net, a, Dead(0, b.name, "n2"))
    assert state_of(a, b.name) == MemberState.DEAD
    inject(net, a, Dead(0, b.name, b.name))
    assert state_of(a, b.name) == MemberState.LEFT


def test_dead_members_are_reaped_after_the_reap_interval() -> None:
    net, nodes = make_cluster(4, config=LOCAL.replace(reap_interval=30.0))
    victim = nodes[2]
    net.kill(victim)
    net.run_until_true(lambda: state_of(nodes[0], victim.name) == MemberState.DEAD, 30.0)
    assert nodes[0].member(victim.name) is not None
    net.run_for(32.0)
    assert nodes[0].member(victim.name) is None
    assert any(e.kind == "reap" and e.member.name == victim.name for _, _, e in net.events)


def test_restarted_node_with_same_name_and_new_address_is_taken_back() -> None:
    net, nodes = make_cluster(5, config=LOCAL)
    old = nodes[2]
    net.kill(old)
    net.run_until_true(lambda: state_of(nodes[0], old.name) == MemberState.DEAD, 30.0)
    new = net.add_node(old.name, LOCAL, old.codec, addr="198.18.200.2:7788", node_id=old.node_id)
    new.join([nodes[0].addr], net.now)
    net.poke(new)
    others = [n for n in nodes if n is not old]
    ok = net.run_until_true(
        lambda: all(
            view(n, old.name).state == MemberState.ALIVE and view(n, old.name).addr == "198.18.200.2:7788"
            for n in others
        ),
        20.0,
    )
    assert ok
    assert new.incarnation > 0  # it refuted its own death to win back its name
    assert alive_names(new) == {n.name for n in others} | {new.name}


def test_same_name_with_another_identity_cannot_take_an_alive_member() -> None:
    net, nodes = make_cluster(3)
    a, b = nodes[0], nodes[1]
    inject(net, a, Alive(99, b.name, "impostor", "198.18.250.1:1"))
    assert view(a, b.name).addr == b.addr
    assert a.counters["conflicts"] == 1


def test_partition_heals_by_itself() -> None:
    net, nodes = make_cluster(10, config=LOCAL)
    left, right = nodes[:5], nodes[5:]
    net.partition(left, right)
    ok = net.run_until_true(lambda: all(state_of(n, right[0].name) == MemberState.DEAD for n in left), 60.0)
    assert ok
    net.run_for(20.0)
    net.heal()
    names = {n.name for n in nodes}
    ok = net.run_until_true(lambda: all(alive_names(n) == names for n in nodes), 60.0)
    assert ok
    assert sum(n.counters.get("reconnects", 0) for n in nodes) > 0


def test_metadata_larger_than_a_packet_still_spreads() -> None:
    net, nodes = make_cluster(4)
    big = {"site": "factory-7", **{f"tag:k{i}": "v" * 40 for i in range(60)}}
    nodes[1].set_meta(big, net.now)
    net.poke(nodes[1])
    ok = net.run_until_true(lambda: all(view(n, "n1").meta == big for n in nodes), 20.0)
    assert ok
    assert len(encode_message(Alive(1, "n1", "id-n1", "n1:7788", big))) > LAN.packet_budget


def test_bad_packets_are_counted_and_dropped() -> None:
    net, nodes = make_cluster(2)
    a = nodes[0]
    before = a.members()
    a.receive_datagram(b"\x01garbage", "x:1", net.now)
    a.receive_datagram(b"", "x:1", net.now)
    other = Codec("other-cluster", None)
    a.receive_datagram(other.pack([encode_message(Ping(1, "n0", "z", "z:1"))]), "z:1", net.now)
    assert a.counters["drops.decode"] + a.counters.get("drops.auth", 0) == 3
    assert a.members() == before


def test_wrong_key_is_kept_out() -> None:
    key_a, key_b = bytes(range(32)), bytes(range(1, 33))
    net, nodes = make_cluster(3, codec=Codec("c", Keyring([key_a])))
    intruder = net.add_node("intruder", LAN, Codec("c", Keyring([key_b])))
    intruder.join([nodes[0].addr], net.now)
    net.poke(intruder)
    net.run_for(10.0)
    assert all(n.member("intruder") is None for n in nodes)
    assert nodes[0].counters.get("drops.auth", 0) >= 1


def test_misdirected_ping_is_not_acked() -> None:
    net, nodes = make_cluster(2)
    a = nodes[0]
    inject(net, a, Ping(5, "someone-else", "n1", nodes[1].addr))
    assert a.counters["drops.misdirected"] == 1


def test_key_rotation_spreads_through_gossip() -> None:
    k1, k2 = bytes(range(32)), bytes(range(5, 37))
    rings = {}

    def codec_for(name: str) -> Codec:
        rings[name] = Keyring([k1])
        return Codec("c", rings[name])

    net = MemoryNetwork(seed=3)
    nodes = [net.add_node(f"n{i}", LAN, codec_for(f"n{i}")) for i in range(5)]
    for n in nodes[1:]:
        n.join([nodes[0].addr], net.now)
        net.poke(n)
    net.run_for(5.0)
    nodes[0].key_op("install", k2, net.now)
    net.poke(nodes[0])
    assert net.run_until_true(lambda: all(k2 in r.keys for r in rings.values()), 10.0)
    nodes[0].key_op("use", k2, net.now)
    net.poke(nodes[0])
    assert net.run_until_true(lambda: all(r.primary == k2 for r in rings.values()), 10.0)
    nodes[0].key_op("remove", k1, net.now)
    net.poke(nodes[0])
    assert net.run_until_true(lambda: all(k1 not in r.keys for r in rings.values()), 10.0)
    names = {n.name for n in nodes}
    net.run_for(10.0)
    assert all(alive_names(n) == names for n in nodes)


def test_node_runs_alone_without_peers() -> None:
    n = Node("solo", "id", "solo:1", LAN, Codec("c", None), random.Random(0), 0.0)
    for t in range(1, 50):
        n.handle_timer(float(t))
    assert alive_names(n) == {"solo"}
    assert n.get_timer() > 49.0


def test_a_true_failure_does_not_hurt_the_probers_health() -> None:
    # Relays nack a dead target after their probe timeout; those nacks must still count,
    # or every node that probes a crashed peer would stretch its own probe interval.
    net, nodes = make_cluster(8)
    victim = nodes[3]
    net.kill(victim)
    survivors = [n for n in nodes if n is not victim]
    assert net.run_until_true(
        lambda: all(state_of(n, victim.name) == MemberState.DEAD for n in survivors), 60.0
    )
    assert sum(n.counters.get("probes.failed", 0) for n in survivors) >= 2
    assert all(n.awareness.score == 0 for n in survivors)


def test_another_node_at_a_dead_members_address_does_not_keep_it_alive() -> None:
    net, nodes = make_cluster(4)
    x = nodes[2]
    net.kill(x)
    net.remove(x)
    # A different node takes x's old address (a DHCP lease, a restarted container).
    squatter = net.add_node("y", LAN, x.codec, addr=x.addr)
    assert squatter.addr == x.addr
    survivors = [n for n in nodes if n is not x]
    assert net.run_until_true(lambda: all(state_of(n, x.name) == MemberState.DEAD for n in survivors), 60.0)
    assert sum(n.counters.get("probes.tcp_only", 0) for n in survivors) == 0


def test_a_new_address_spreads_with_a_new_incarnation() -> None:
    net, nodes = make_cluster(5)
    mover = nodes[1]
    before = mover.incarnation
    del net.nodes[mover.addr]
    mover.set_addr("198.18.200.1:7788", net.now)  # DHCP gave the gateway another address
    net.nodes[mover.addr] = mover
    net.poke(mover)
    assert mover.incarnation == before + 1
    assert net.run_until_true(lambda: all(view(n, "n1").addr == "198.18.200.1:7788" for n in nodes), 10.0)
    net.run_for(20.0)
    assert all(state_of(n, "n1") == MemberState.ALIVE for n in nodes)  # reachable there


def test_effects_come_out_of_one_outbox_in_the_order_they_were_decided() -> None:
    node = Node("solo", "id-solo", "solo:1", LOCAL, Codec("c", None), random.Random(1), 0.0)
    assert node.take_effects() == []
    [sid] = node.join(["seed:1"], 0.0)
    node.set_meta({"site": "s1"}, 0.1)
    qid = node.ask("q", b"", QueryFilter(), 5.0, 0, 0.2)  # alone, it is the one to answer
    effects = node.take_effects()
    assert [type(e) for e in effects] == [OpenStream, MemberEvent, AnswerQuery]
    stream, event, answer = effects
    assert isinstance(stream, OpenStream)
    assert (stream.id, stream.addr, stream.kind) == (sid, "seed:1", "join")
    assert isinstance(event, MemberEvent)
    assert event.kind == "update"
    assert event.member.meta == {"site": "s1"}
    assert isinstance(answer, AnswerQuery)
    assert answer.action.query.id == qid
    assert node.take_effects() == []  # taken once
    node.respond_query(answer.action, b"here", 0.3)
    [done] = node.take_effects()  # the query engine's output comes out of the same outbox
    assert isinstance(done, QueryDone)
    assert done.result.id == qid
    assert [(r.name, r.payload) for r in done.result.responses] == [("solo", b"here")]


def test_the_memory_network_records_each_nodes_events_in_order() -> None:
    net, nodes = make_cluster(3)
    a, b = nodes[0], nodes[1]
    net.kill(b)
    net.run_until_true(lambda: state_of(a, b.name) == MemberState.DEAD, 30.0)
    kinds = [(ev.kind, ev.member.name) for _, name, ev in net.events if name == a.name]
    assert kinds.index(("suspect", b.name)) < kinds.index(("dead", b.name))


def test_streams_name_the_peer_they_are_for_once_it_is_known() -> None:
    # A join goes to an address (no receiver named); later exchanges name the member's node id,
    # so the envelope and the request token are good at that node only.
    a = Node(
        "a", "aa" * 16, "198.18.0.1:7788", LOCAL, Codec("c", None, node_id="aa" * 16), random.Random(1), 0.0
    )
    b_codec = Codec("c", None, node_id="bb" * 16)
    [sid] = a.join(["198.18.0.2:7788"], 0.0)
    [join] = [e for e in a.take_effects() if isinstance(e, OpenStream)]
    assert (join.kind, join.to) == ("join", "")
    assert a.codec.open_envelope(join.data).receiver == bytes(8)
    b_state = PushNodeState("b", "bb" * 16, "198.18.0.2:7788", 1, MemberState.ALIVE)
    a.stream_done(sid, b_codec.pack([encode_message(PushPull(True, [b_state], True))], "aa" * 16), 0.1)
    assert view(a, "b").state == MemberState.ALIVE
    now = 0.1
    streams: list[OpenStream] = []
    while now < 4 * LOCAL.push_pull_interval and len({s.kind for s in streams}) < 2:
        now = max(now + 0.01, a.get_timer())
        a.handle_timer(now)
        streams += [e for e in a.take_effects() if isinstance(e, OpenStream)]
    # b never answers: a TCP ping during its probe, then a push-pull to reconnect the dead.
    assert {s.kind for s in streams} == {"reconnect", "tcp_ping"}
    for s in streams:
        assert s.to == "bb" * 16
        assert b_codec.open_envelope(s.data).receiver == bytes.fromhex("bb" * 8)
