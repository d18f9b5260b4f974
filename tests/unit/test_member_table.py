"""The member table: shared records, bulk load, sampling from the probe ring, the reap heap."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshd.core.config import LAN
from meshd.core.effects import MemberEvent
from meshd.core.members import RecordPool
from meshd.core.messages import Alive, Dead, MemberState
from meshd.core.node import Node
from meshd.wire import Codec, encode_message


def node(pool: RecordPool | None = None, seed: int = 1, **cfg: object) -> Node:
    n = Node(
        "me",
        "id-me",
        "198.18.0.1:7788",
        LAN.replace(**cfg),
        Codec("c", None),
        random.Random(seed),
        0.0,
        pool=pool,
    )
    n.take_effects()
    return n


def recs(pool: RecordPool, n: int) -> list:
    return [
        pool.record(f"m{i}", f"id-m{i}", f"198.18.1.{i % 250 + 1}:{7000 + i}", 0, {"site": "a"})
        for i in range(n)
    ]


def test_pool_interns_equal_records_and_freezes_meta() -> None:
    pool = RecordPool()
    a = pool.record("x", "id-x", "198.18.0.9:1", 3, {"k": "v"})
    assert pool.record("x", "id-x", "198.18.0.9:1", 3, {"k": "v"}) is a
    assert pool.record("x", "id-x", "198.18.0.9:1", 4, {"k": "v"}) is not a
    assert pool.with_incarnation(a, 3) is a
    with pytest.raises(TypeError):
        a.meta["k"] = "w"
    assert pool.adopt(RecordPool().record("x", "id-x", "198.18.0.9:1", 3, {"k": "v"})) is a


def test_views_hand_out_copies_of_the_shared_meta() -> None:
    pool = RecordPool()
    n = node(pool)
    n.load_members(recs(pool, 3), 1.0)
    v = n.member("m1")
    assert v is not None
    assert v.meta == {"site": "a"}
    v.meta["site"] = "changed"
    assert n.member("m1").meta == {"site": "a"}  # type: ignore[union-attr]


def test_load_members_adds_without_events_or_news() -> None:
    pool = RecordPool()
    n = node(pool)
    queued = len(n.broadcasts)
    rs = recs(pool, 100)
    assert n.load_members([*rs, pool.record("me", "id-me", "198.18.0.1:7788", 0, {})], 1.0) == 100
    assert n.load_members(rs[:10], 2.0) == 0  # known already
    assert n.num_active() == 101
    assert not [e for e in n.take_effects() if isinstance(e, MemberEvent)]
    assert len(n.broadcasts) == queued
    assert n._members["m5"].rec is rs[5]  # the pool's object, not a copy
    # Every loaded member is probed once per round.
    probed = set()
    for _ in range(100):
        t = n._next_target()
        assert t is not None
        probed.add(t.name)
    assert probed == {f"m{i}" for i in range(100)}


def test_load_members_stops_at_max_members() -> None:
    pool = RecordPool()
    n = node(pool, max_members=50)
    assert n.load_members(recs(pool, 100), 1.0) == 49
    assert len(n.members()) == 50


def test_sample_is_distinct_uniform_and_honours_the_predicate() -> None:
    pool = RecordPool()
    n = node(pool)
    n.load_members(recs(pool, 200), 1.0)
    seen: Counter[str] = Counter()
    for _ in range(3000):
        got = n._sample(3, lambda m: m.name != "m0")
        assert len(got) == 3
        assert len({m.name for m in got}) == 3
        seen.update(m.name for m in got)
    assert "m0" not in seen
    assert len(seen) == 199
    mean = 9000 / 199
    assert min(seen.values()) > 0.5 * mean
    assert max(seen.values()) < 1.6 * mean


def test_sample_finds_the_few_that_qualify() -> None:
    pool = RecordPool()
    n = node(pool)
    n.load_members(recs(pool, 500), 1.0)
    few = {"m17", "m400"}
    got = n._sample(3, lambda m: m.name in few)
    assert {m.name for m in got} == few
    assert n._sample(3, lambda m: False) == []


def test_active_count_and_dead_index_follow_state_changes() -> None:
    pool = RecordPool()
    n = node(pool)
    n.load_members(recs(pool, 10), 1.0)
    n.receive_datagram(n.codec.pack([encode_message(Dead(0, "m3", "m1"))]), "198.18.9.9:1", 2.0)
    assert n.num_active() == 10
    assert set(n._down) == {"m3"}
    alive = Alive(1, "m3", "id-m3", "198.18.1.4:7003", {"site": "a"})
    n.receive_datagram(n.codec.pack([encode_message(alive)]), "198.18.9.9:1", 3.0)
    assert n.num_active() == 11
    assert not n._down
    assert n.member("m3").state == MemberState.ALIVE  # type: ignore[union-attr]


def test_reap_heap_reaps_the_dead_once_and_skips_the_revived() -> None:
    pool = RecordPool()
    n = node(pool, reap_interval=10.0)
    n.load_members(recs(pool, 10), 0.0)
    for name, t in (("m1", 1.0), ("m2", 2.0)):
        n.receive_datagram(n.codec.pack([encode_message(Dead(0, name, "m5"))]), "198.18.9.9:1", t)
    # m2 comes back: its heap entry goes stale.
    alive = Alive(1, "m2", "id-m2", "198.18.1.3:7002", {"site": "a"})
    n.receive_datagram(n.codec.pack([encode_message(alive)]), "198.18.9.9:1", 3.0)
    n.take_effects()
    n._reap(20.0)
    reaped = [e.member.name for e in n.take_effects() if isinstance(e, MemberEvent) and e.kind == "reap"]
    assert reaped == ["m1"]
    assert n.member("m1") is None
    assert n.member("m2") is not None
    assert len(n._ring) == 9
    assert "m1" not in n._down


def test_a_flapping_member_does_not_grow_the_reap_heap() -> None:
    pool = RecordPool()
    n = node(pool, reap_interval=10.0)
    n.load_members(recs(pool, 10), 0.0)
    t = 1.0
    for inc in range(0, 1000, 2):  # m4 dies and comes back 500 times: a stale entry each time
        n.receive_datagram(n.codec.pack([encode_message(Dead(inc, "m4", "m1"))]), "198.18.9.9:1", t)
        alive = Alive(inc + 1, "m4", "id-m4", "198.18.1.5:7004", {"site": "a"})
        n.receive_datagram(n.codec.pack([encode_message(alive)]), "198.18.9.9:1", t + 0.001)
        t += 0.002
    n.receive_datagram(n.codec.pack([encode_message(Dead(0, "m7", "m1"))]), "198.18.9.9:1", t)
    assert len(n._reap_heap) <= 2 * len(n._down) + 64
    n.take_effects()
    n._reap(t + 20.0)
    reaped = [e.member.name for e in n.take_effects() if isinstance(e, MemberEvent) and e.kind == "reap"]
    assert reaped == ["m7"]  # the compaction kept who is down now, and only them
    assert n.member("m4") is not None


def test_load_members_paces_push_pull_for_the_loaded_table() -> None:
    pool = RecordPool()
    n = node(pool)
    n.load_members(recs(pool, 999), 0.0)
    # 1,000 members: memberlist's scale gives 30 s * (ceil(log2(1000) - 5) + 1) = 180 s.
    assert 90.0 <= n._timers.push_pull <= 180.0
