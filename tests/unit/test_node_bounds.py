"""Issue 9: what a key holder can make a node believe about membership is bounded."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from meshd import state
from meshd.core.config import LAN, LOCAL
from meshd.core.effects import SendDatagram
from meshd.core.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    KeyOp,
    MemberState,
    Message,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
)
from meshd.core.node import Node
from meshd.crypto import Keyring
from meshd.errors import StateError
from meshd.net.memory import MemoryNetwork
from meshd.wire import Codec, encode_message
from tests.cluster import make_cluster, state_of, view

U64_MAX = (1 << 64) - 1
JUMP = LAN.max_incarnation_jump
ADDR = "198.18.0.1:7788"


def inject(net: MemoryNetwork, node: Node, *msgs: Message) -> None:
    node.receive_datagram(node.codec.pack([encode_message(m) for m in msgs]), "198.18.9.9:1", net.now)
    net.poke(node)


def solo(config: object = LAN, codec: Codec | None = None, **kw: object) -> Node:
    node = Node("solo", "id-solo", ADDR, config, codec or Codec("c", None), random.Random(1), 0.0, **kw)  # type: ignore[arg-type]
    node.take_effects()
    return node


def feed(node: Node, msgs: list[Message], now: float) -> None:
    node.receive_datagram(node.codec.pack([encode_message(m) for m in msgs]), "198.18.9.9:1", now)


def api_view(node: Node) -> bytes:
    """What /v1/members serialises: must not raise (the issue's 500)."""
    return orjson.dumps([{"name": m.name, "incarnation": m.incarnation} for m in node.members()])


# --- incarnations -----------------------------------------------------------------------------


def test_a_u64_max_suspect_neither_kills_the_victim_nor_breaks_it() -> None:
    net, nodes = make_cluster(5, config=LOCAL)
    victim = nodes[2]
    before = victim.incarnation
    for n in nodes:  # the liar tells everyone, the victim included
        inject(net, n, Suspect(U64_MAX, victim.name, "n4"))
    net.run_for(30.0)
    assert all(state_of(n, victim.name) == MemberState.ALIVE for n in nodes)
    assert victim.incarnation < before + 10  # not adopted: its own refutation stays possible
    assert all(view(n, victim.name).incarnation < LOCAL.max_incarnation for n in nodes)
    assert victim.counters["drops.incarnation"] >= 1
    assert nodes[0].counters["drops.incarnation"] >= 1
    api_view(victim)
    # And it can still refute an ordinary suspicion.
    inject(net, nodes[0], Suspect(victim.incarnation, victim.name, "n3"))
    assert net.run_until_true(lambda: state_of(nodes[0], victim.name) == MemberState.ALIVE, 10.0)
    assert victim.incarnation == view(nodes[0], victim.name).incarnation


def test_incarnations_above_the_ceiling_or_jumping_too_far_are_dropped_and_counted() -> None:
    net, nodes = make_cluster(3, config=LOCAL)
    a, b = nodes[0], nodes[1]
    known = view(a, b.name).incarnation
    inject(net, a, Alive(known + JUMP + 1, b.name, b.node_id, b.addr, {"x": "1"}))
    inject(net, a, Suspect(known + JUMP + 1, b.name, "n2"))
    inject(net, a, Dead(known + JUMP + 1, b.name, "n2"))
    inject(net, a, Alive(LOCAL.max_incarnation + 1, "ghost", "id-g", "198.18.7.7:7788"))
    assert state_of(a, b.name) == MemberState.ALIVE
    assert view(a, b.name).incarnation == known
    assert "x" not in view(a, b.name).meta
    assert a.member("ghost") is None
    assert a.counters["drops.incarnation"] == 4
    # Within the jump still works (a real suspicion must go through).
    inject(net, a, Suspect(known + JUMP, b.name, "n2"))
    assert state_of(a, b.name) == MemberState.SUSPECT


def test_a_wild_claim_about_ourselves_is_ignored_not_adopted() -> None:
    node = solo()
    for msg in (
        Suspect(JUMP + 1, "solo", "liar"),
        Dead(JUMP + 1, "solo", "liar"),
        Alive(JUMP + 1, "solo", "id-solo", "198.18.9.9:1"),
        Suspect(U64_MAX, "solo", "liar"),
    ):
        feed(node, [msg], 1.0)
    assert node.incarnation == 0
    assert node.counters["drops.incarnation"] == 4
    assert node.counters["refutes"] == 0
    feed(node, [Suspect(JUMP, "solo", "peer")], 2.0)  # a big but legal one is refuted
    assert node.incarnation == JUMP + 1


def test_a_restarted_node_comes_back_alive_after_lies_pushed_its_record_up() -> None:
    net, nodes = make_cluster(4, config=LOCAL)
    victim, others = nodes[3], nodes[:3]
    own = victim.incarnation
    net.kill(victim)
    assert net.run_until_true(lambda: all(state_of(n, victim.name) == MemberState.DEAD for n in others), 60.0)
    # While it is down, a liar walks its record up a jump at a time (each step is legal)...
    inc = view(others[0], victim.name).incarnation
    for _ in range(5):
        inc += JUMP
        for n in others:
            inject(net, n, Alive(inc, victim.name, victim.node_id, victim.addr))
    for n in others:  # and the overflow: near u64 max, alive then dead
        inject(net, n, Alive(U64_MAX - 1, victim.name, victim.node_id, victim.addr))
        inject(net, n, Dead(U64_MAX - 1, victim.name, "n0"), Dead(inc, victim.name, "n0"))
    assert all(view(n, victim.name).incarnation == inc for n in others)
    assert net.run_until_true(lambda: all(state_of(n, victim.name) == MemberState.DEAD for n in others), 60.0)
    # ...then it restarts from its persisted incarnation and rejoins.
    back = net.add_node(victim.name, LOCAL, victim.codec, node_id=victim.node_id, incarnation=own + 1)
    back.join([others[0].addr], net.now)
    net.poke(back)
    ok = net.run_until_true(lambda: all(state_of(n, back.name) == MemberState.ALIVE for n in others), 60.0)
    assert ok, [state_of(n, back.name) for n in others]
    assert back.incarnation < own + JUMP  # it did not adopt the lie
    assert sum(n.counters["members.rebased"] for n in others) >= 1
    net.run_for(20.0)  # and it stays alive
    assert all(state_of(n, back.name) == MemberState.ALIVE for n in others)
    api_view(back)


# --- addresses, names, meta, sizes ------------------------------------------------------------


BAD_ADDRS = ["gw1.example:7788", "/run/meshd.sock:1", "198.18.0.9", "198.18.0.9:0", "[::1]", "x", ""]


@pytest.mark.parametrize("addr", BAD_ADDRS)
def test_an_alive_with_a_bad_address_is_dropped(addr: str) -> None:
    node = solo()
    feed(node, [Alive(1, "peer", "id-peer", addr)], 1.0)
    assert node.member("peer") is None
    assert node.counters["drops.addr"] == 1
    assert not [e for e in node.take_effects() if isinstance(e, SendDatagram)]


def test_pings_and_indirect_pings_with_bad_addresses_send_nothing() -> None:
    node = solo()
    feed(node, [Ping(1, "solo", "p", "gw1.example:7788")], 1.0)
    feed(node, [IndirectPing(2, "t", "evil.example:80", "p", "198.18.0.2:7788")], 1.0)
    feed(node, [IndirectPing(3, "t", "198.18.0.3:7788", "p", "/tmp/x:1")], 1.0)
    assert node.counters["drops.addr"] == 3
    assert not [e for e in node.take_effects() if isinstance(e, SendDatagram)]
    feed(node, [Ping(4, "solo", "p", "198.18.0.2:7788")], 1.0)  # a good one is answered
    [sent] = [e for e in node.take_effects() if isinstance(e, SendDatagram)]
    assert sent.addr == "198.18.0.2:7788"
    assert isinstance(node.codec.unpack(sent.data)[0], Ack)


def test_bad_states_in_a_push_pull_are_dropped_one_by_one() -> None:
    node = solo()
    states = [
        PushNodeState("good", "id-good", "198.18.0.5:7788", 1, MemberState.ALIVE),
        PushNodeState("named", "id-n", "gw.example:7788", 1, MemberState.ALIVE),
        PushNodeState("x" * (LAN.max_name_len + 1), "id-l", "198.18.0.6:7788", 1, MemberState.ALIVE),
        PushNodeState(
            "fat", "id-f", "198.18.0.7:7788", 1, MemberState.ALIVE, {str(i): "" for i in range(1100)}
        ),
        PushNodeState("huge", "id-h", "198.18.0.8:7788", U64_MAX, MemberState.ALIVE),
    ]
    reply = node.handle_stream(node.codec.pack([encode_message(PushPull(True, states))]), "198.18.0.5:1", 1.0)
    assert reply is not None
    assert {m.name for m in node.members()} == {"solo", "good"}
    c = node.counters
    assert (c["drops.addr"], c["drops.name"], c["drops.meta"], c["drops.incarnation"]) == (1, 1, 1, 1)


def test_a_push_pull_with_more_states_than_the_table_holds_is_dropped() -> None:
    node = solo(LAN.replace(max_members=10))
    states = [
        PushNodeState(f"p{i}", f"id{i}", f"198.18.1.{i + 1}:7788", 0, MemberState.ALIVE) for i in range(11)
    ]
    node.handle_stream(node.codec.pack([encode_message(PushPull(True, states))]), "198.18.0.5:1", 1.0)
    assert len(node.members()) == 1
    assert node.counters["drops.push_pull_size"] == 1


# --- a flood of new members -------------------------------------------------------------------


def fake_alives(start: int, n: int) -> list[Message]:
    return [
        Alive(0, f"f{i}", f"id-f{i}", f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}:7788")
        for i in range(start, start + n)
    ]


def test_a_flood_of_fake_members_is_held_to_the_rate_and_the_table_size() -> None:
    cfg = LAN.replace(new_member_rate=10.0, new_member_burst=50, max_members=300)
    node = solo(cfg)
    feed(node, [Alive(0, "real", "id-real", "198.18.200.1:7788")], 0.0)
    # 10,000 never-seen members over 10 s: the burst plus the rate get in.
    for k in range(100):
        feed(node, fake_alives(1 + k * 100, 100), k * 0.1)
    assert len(node.members()) <= 2 + 50 + 10 * 10 + 1
    assert node.counters["drops.new_member_rate"] > 9000
    # An existing member is always updated, flood or not.
    feed(node, [Alive(1, "real", "id-real", "198.18.200.1:7788", {"v": "2"})], 10.0)
    assert view(node, "real").meta == {"v": "2"}
    # Later, the table limit holds whatever the rate allows.
    for k in range(100):
        feed(node, fake_alives(20_000 + k * 100, 100), 100.0 + k * 10.0)
    assert len(node.members()) == cfg.max_members
    assert node.counters["drops.members_full"] > 0
    feed(node, [Alive(2, "real", "id-real", "198.18.200.1:7788", {"v": "3"})], 2000.0)
    assert view(node, "real").meta == {"v": "3"}


# --- persisted state across restarts ------------------------------------------------------------


K1, K2 = bytes([1]) * 32, bytes([2]) * 32


def test_a_keyop_replayed_after_a_restart_is_not_applied_again(tmp_path: Path) -> None:
    ring = Keyring([K1])
    node = solo(codec=Codec("c", ring))
    install, remove = KeyOp(11, "install", K2), KeyOp(12, "remove", K2)
    feed(node, [install], 1.0)
    feed(node, [remove], 2.0)
    assert K2 not in ring
    keeper = state.CoreStateKeeper(tmp_path, state.read_core_state(tmp_path))
    assert keeper.sync(node.incarnation, node.seen_keyops())
    # Restart: a new core from what is on disk, then the old install is replayed.
    loaded = state.read_core_state(tmp_path)
    again = solo(codec=Codec("c", ring), seen_keyops=loaded.keyops)
    feed(again, [install], 10.0)
    assert K2 not in ring
    assert again.counters["keyring.failed"] == 0
    fresh = KeyOp(13, "install", K2)  # a new operation still applies
    feed(again, [fresh], 11.0)
    assert K2 in ring


def test_own_incarnation_survives_a_restart_and_is_leased(tmp_path: Path) -> None:
    keeper = state.CoreStateKeeper(tmp_path, state.read_core_state(tmp_path))
    node = solo()
    for i in range(5):
        feed(node, [Suspect(node.incarnation, "solo", "peer")], float(i))  # refutations
        assert keeper.sync(node.incarnation, node.seen_keyops())
    assert node.incarnation == 5
    mtime = (tmp_path / state.CORE_STATE_FILE).stat().st_mtime_ns
    written = (tmp_path / state.CORE_STATE_FILE).read_bytes()
    assert not keeper.behind(6, None)  # inside the lease, no new KeyOp: nothing to copy or write
    assert keeper.behind(keeper.saved.incarnation_reserved + 1, None)
    assert keeper.behind(6, 99)
    keeper.sync(6, [])  # inside the lease: no write
    assert (tmp_path / state.CORE_STATE_FILE).read_bytes() == written
    assert (tmp_path / state.CORE_STATE_FILE).stat().st_mtime_ns == mtime
    start = state.read_core_state(tmp_path).start_incarnation
    assert start > 6
    assert start - 5 <= state.INCARNATION_LEASE + 1  # well inside one jump
    restarted = solo(incarnation=start)
    assert restarted.incarnation == start


def test_an_unreadable_core_state_starts_from_nothing(tmp_path: Path) -> None:
    (tmp_path / state.CORE_STATE_FILE).write_text('{"incarnation_reserved": "x"}')
    assert state.read_core_state(tmp_path) == state.CoreState()


def test_own_metadata_over_what_peers_accept_is_refused_not_gossiped() -> None:
    net, nodes = make_cluster(2, config=LOCAL)
    a = nodes[0]
    incarnation = a.incarnation
    with pytest.raises(StateError, match="over the limit"):
        a.set_meta({str(i): "" for i in range(LOCAL.max_meta_entries + 1)}, net.now)
    with pytest.raises(StateError, match="over the limit"):
        a.set_meta({"big": "x" * LOCAL.max_meta_bytes}, net.now)
    assert a.incarnation == incarnation
    a.set_meta({"site": "plant-2"}, net.now)
    assert a.incarnation == incarnation + 1


def test_ten_thousand_random_datagrams_are_counted_drops_and_the_node_carries_on() -> None:
    net, nodes = make_cluster(3, config=LOCAL)
    victim = nodes[0]
    rnd = random.Random(9)
    before = sum(v for k, v in victim.counters.items() if k.startswith("drops."))
    for i in range(10_000):
        junk = rnd.randbytes(rnd.randrange(0, 1500))
        if i % 2:  # half look like a current envelope from the outside
            junk = bytes((2,)) + junk[1:]
        victim.receive_datagram(junk, "198.18.66.6:7788", net.now)
    drops = sum(v for k, v in victim.counters.items() if k.startswith("drops.")) - before
    assert drops == 10_000
    net.run_for(10.0)
    assert all(state_of(n, victim.name) == MemberState.ALIVE for n in nodes)
