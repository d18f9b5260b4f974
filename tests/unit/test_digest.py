"""Digest anti-entropy: per-bucket table digests and the exchange that sends only what differs."""

from __future__ import annotations

import random
from array import array

import pytest

from meshd import PROTOCOL_VERSION, wire
from meshd.core import digest
from meshd.core.config import LAN
from meshd.core.effects import OpenStream
from meshd.core.members import FrozenMeta, MemberRecord, RecordPool
from meshd.core.messages import (
    Ack,
    Alive,
    Dead,
    MemberState,
    Message,
    Ping,
    PushNodeState,
    PushPull,
    PushPullDigest,
    Suspect,
)
from meshd.core.node import FULL_PUSH_PULL_EVERY, FULL_PUSH_PULL_MEMBERS, Node

CODEC = wire.Codec("test", None)
# No probes in these tests (a probe of a member that is not there would change the tables).
CFG = LAN.replace(probe_interval=1e9, new_member_rate=1e6, new_member_burst=1_000_000)


def nid(name: str) -> str:
    return digest.name_hash(name).to_bytes(8, "big").hex() * 2


def addr(i: int) -> str:
    return f"198.18.{i // 250}.{i % 250 + 1}:7788"


def recs(pool: RecordPool, names: list[str], protocol: int = 2) -> list[MemberRecord]:
    return [pool.record(n, nid(n), addr(i), 0, {"site": "s"}, protocol) for i, n in enumerate(names)]


def node(name: str, records: list[MemberRecord], pool: RecordPool, seed: int = 1, **cfg: object) -> Node:
    mine = next(r for r in records if r.name == name)
    n = Node(
        name,
        mine.node_id,
        mine.addr,
        CFG.replace(**cfg),
        CODEC,
        random.Random(seed),
        0.0,
        {"site": "s"},
        pool=pool,
    )
    n.load_members(records, 0.0)
    n.take_effects()
    return n


def deliver(n: Node, *msgs: Message, now: float = 0.0) -> None:
    n.receive_datagram(CODEC.pack([wire.encode_message(m) for m in msgs]), "198.18.9.9:1", now)
    n.take_effects()


def table(n: Node) -> dict[str, tuple[int, MemberState]]:
    return {v.name: (v.incarnation, v.state) for v in n.members()}


def from_scratch(n: Node) -> bytes:
    """The digest recomputed from the node's member views, at its current resolution."""
    d = digest.TableDigest(len(n.table_digest()).bit_length() - 4)
    for v in n.members():
        h = digest.name_hash(v.name)
        d.add(h, digest.entry(h, v.incarnation, v.state))
    return digest.to_bytes(d.values)


def values(n: Node) -> array[int]:
    v = digest.from_bytes(n.table_digest())
    assert v is not None
    return v


def body(data: bytes) -> list[Message]:
    return CODEC.unpack(data)


class Exchange:
    """One periodic anti-entropy round of `a`, every stream it opens delivered to `b`."""

    def __init__(self, a: Node, b: Node, now: float) -> None:
        a.take_effects()
        a.handle_timer(now)
        opened = [e for e in a.take_effects() if isinstance(e, OpenStream)]
        assert len(opened) == 1, opened
        self.kinds: list[str] = []
        self.requests: list[list[Message]] = []
        self.replies: list[list[Message]] = []
        while opened:
            req = opened.pop(0)
            self.kinds.append(req.kind)
            self.requests.append(body(req.data))
            reply = b.handle_stream(req.data, a.addr, now)
            assert reply is not None
            self.replies.append(body(reply))
            a.stream_done(req.id, reply, now)
            opened += [e for e in a.take_effects() if isinstance(e, OpenStream)]
        b.take_effects()

    def records_sent(self) -> list[PushNodeState]:
        return [
            s
            for msgs in self.requests + self.replies
            for m in msgs
            if isinstance(m, PushPull)
            for s in m.states
        ]


# --- the digest itself -----------------------------------------------------------------------


def test_name_hash_is_stable_across_processes() -> None:
    # A fixed value (BLAKE2b-64 of the UTF-8 name): Python's salted hash() differs run to run.
    assert digest.name_hash("gw-a") == 0xBA053863FC5BA2A4
    assert MemberRecord("gw-a", "", "", 0, FrozenMeta()).name_hash == 0xBA053863FC5BA2A4


def test_bucket_count_follows_the_table_size() -> None:
    assert [digest.bits_for(n) for n in (0, 1, 15, 16, 100, 1000, 10_000, 10**6)] == [
        0,
        0,
        0,
        1,
        3,
        6,
        10,
        12,
    ]
    assert digest.bits_of(8) == 3
    assert digest.bits_of(0) is None
    assert digest.bits_of(6) is None
    assert digest.bits_of(8192) is None


def test_equal_tables_built_in_different_orders_have_equal_digests() -> None:
    pool = RecordPool()
    names = [f"m{i}" for i in range(300)]
    rs = recs(pool, names)
    shuffled = rs[:]
    random.Random(7).shuffle(shuffled)
    a = node("m0", rs, pool)
    b = node("m1", shuffled[::-1], pool)
    assert len(a.table_digest()) == 8 * 32
    assert a.table_digest() == b.table_digest()
    assert a.table_digest() == from_scratch(a)


def test_one_state_change_flips_exactly_one_bucket() -> None:
    pool = RecordPool()
    names = [f"m{i}" for i in range(300)]
    a = node("m0", recs(pool, names), pool)
    before = values(a)
    deliver(a, Suspect(0, "m42", "m7"))
    after = values(a)
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert changed == [digest.bucket(digest.name_hash("m42"), 5)]
    assert a.table_digest() == from_scratch(a)


def test_a_finer_digest_folds_into_a_coarser_one() -> None:
    rng = random.Random(3)
    entries = [(rng.getrandbits(64), rng.getrandbits(64)) for _ in range(500)]
    fine, coarse = digest.TableDigest(5), digest.TableDigest(2)
    for h, v in entries:
        fine.add(h, v)
        coarse.add(h, v)
    assert digest.fold(fine.values, 2) == list(coarse.values)
    assert digest.differing(fine.values, coarse.values) == []
    h, v = entries[10]
    fine.remove(h, v)
    assert digest.differing(fine.values, coarse.values) == [digest.bucket(h, 2)]
    assert digest.differing(coarse.values, fine.values) == [digest.bucket(h, 2)]


def test_incremental_digest_equals_recomputed_after_random_changes() -> None:
    rng = random.Random(11)
    pool = RecordPool()
    names = [f"m{i}" for i in range(40)]
    a = node("m0", recs(pool, names), pool, reap_interval=5.0)
    incarnations = dict.fromkeys(names, 0)
    resolutions = set()
    now = 0.0
    for step in range(3000):
        now += 0.01
        if step == 1500:  # most members leave: the table shrinks, so does the digest (once reaped)
            for name in [v.name for v in a.members() if int(v.name[1:]) >= 40]:
                deliver(a, Dead(incarnations[name], name, name), now=now)
        i = rng.randrange(400) if step < 1500 else rng.randrange(40)  # grow, then churn
        name = f"m{i}"
        inc = incarnations.setdefault(name, 0)
        op = rng.random()
        if name == "m0":
            continue
        if op < 0.5:
            incarnations[name] = inc = inc + rng.randrange(2)
            deliver(a, Alive(inc, name, nid(name), addr(i), {"site": "s"}, 2), now=now)
        elif op < 0.7:
            deliver(a, Suspect(inc, name, "m1"), now=now)
        elif op < 0.85:
            deliver(a, Dead(inc, name, "m1"), now=now)
        else:
            deliver(a, Dead(inc, name, name), now=now)  # left
        if step % 50 == 0:
            now += 6.0  # reap what went down more than reap_interval ago
            a.handle_timer(now)
            a.take_effects()
            assert a.table_digest() == from_scratch(a)
        resolutions.add(len(a.table_digest()))
    assert a.table_digest() == from_scratch(a)
    assert len(resolutions) >= 3, resolutions  # it grew and shrank through rebuilds
    assert len(a.table_digest()) <= 8 * 8 < max(resolutions)
    assert a.counters.get("drops.new_member_rate", 0) == 0


# --- the exchange ----------------------------------------------------------------------------


def two_nodes(n: int = 400, protocol: int = 2) -> tuple[Node, Node, list[str]]:
    pool = RecordPool()
    names = [f"m{i}" for i in range(n)]
    rs = recs(pool, names, protocol)
    return node("m0", rs, pool, seed=1), node("m1", rs, pool, seed=2), names


def test_equal_tables_exchange_one_digest_each_way_and_no_records() -> None:
    a, b, _ = two_nodes()
    ex = Exchange(a, b, 1000.0)
    assert ex.kinds == ["digest"]
    (req,) = ex.requests[0]
    assert isinstance(req, PushPullDigest)
    assert req.buckets == a.table_digest()
    (reply,) = ex.replies[0]
    assert isinstance(reply, PushPull)
    assert reply.reply
    assert (reply.states, reply.buckets, reply.bucket_count) == ([], [], 32)
    assert b.counters["push_pull.digest.in"] == 1
    assert a.counters["push_pull.digest.out"] == 1


def test_digest_exchange_repairs_both_ways_sending_only_differing_buckets() -> None:
    a, b, names = two_nodes()
    # a knows news b does not, and the other way round.
    deliver(a, Alive(1, "m5", nid("m5"), addr(5), {"site": "s"}, 2))
    deliver(a, Alive(0, "x1", nid("x1"), addr(901), {}, 2))
    deliver(b, Dead(0, "m300", "m300"))  # m300 left
    deliver(b, Alive(0, "y1", nid("y1"), addr(902), {}, 2))
    assert a.table_digest() != b.table_digest()

    ex = Exchange(a, b, 1000.0)
    assert ex.kinds == ["digest", "repair"]
    assert table(a) == table(b)
    assert a.table_digest() == b.table_digest()
    assert table(a)["m300"] == (0, MemberState.LEFT)
    assert table(b)["x1"] == (0, MemberState.ALIVE)
    assert table(b)["m5"] == (1, MemberState.ALIVE)
    assert "y1" in table(a)

    (reply,) = ex.replies[0]
    assert isinstance(reply, PushPull)
    count = reply.bucket_count
    assert 1 <= len(reply.buckets) <= 4
    shift = 64 - (count.bit_length() - 1)
    sent = ex.records_sent()
    assert all(digest.name_hash(s.name) >> shift in reply.buckets for s in sent)
    assert 2 <= len(sent) < len(names) // 4  # the differing buckets' records, not the table
    (repair,) = ex.requests[1]
    assert isinstance(repair, PushPull)
    assert not repair.reply
    assert repair.bucket_count == count
    assert {s.name for s in repair.states} == {"m5", "x1"}  # what b already sent is not echoed
    (ack,) = ex.replies[1]
    assert ack == Ack(0, "m1")

    again = Exchange(a, b, 2000.0)
    assert again.kinds == ["digest"]
    assert again.records_sent() == []


def test_peers_with_different_bucket_counts_compare_at_the_coarser() -> None:
    a, _, _ = two_nodes(400)  # 32 buckets
    pool = RecordPool()
    small = recs(pool, [f"m{i}" for i in range(100)])
    b = node("m1", small, pool, seed=2)  # 8 buckets, members m0..m99 only
    assert len(b.table_digest()) == 8 * 8
    ex = Exchange(a, b, 1000.0)
    assert ex.kinds == ["digest", "repair"]
    assert ex.replies[0][0].bucket_count == 8  # type: ignore[union-attr]
    assert table(a).keys() == table(b).keys()
    assert a.table_digest() == b.table_digest()  # b grew to a's resolution on the way


def test_an_old_peer_gets_the_full_push_pull() -> None:
    a, b, names = two_nodes(protocol=1)
    ex = Exchange(a, b, 1000.0)
    assert ex.kinds == ["push_pull"]
    (req,) = ex.requests[0]
    assert isinstance(req, PushPull)
    assert len(req.states) == len(names)
    assert not any(isinstance(m, PushPullDigest) for msgs in ex.requests for m in msgs)


def test_protocol_is_learned_from_alive_and_push_pull() -> None:
    a, b, _ = two_nodes(protocol=1)
    deliver(a, Alive(1, "m3", nid("m3"), addr(3), {"site": "s"}, 2))
    a.join([addr(7)], 1.0)
    (req,) = [e for e in a.take_effects() if isinstance(e, OpenStream)]
    (push,) = body(req.data)
    assert isinstance(push, PushPull)
    states = {s.name: s for s in push.states}
    assert states["m3"].protocol == 2
    assert states["m4"].protocol == 1
    assert states["m0"].protocol == PROTOCOL_VERSION == 2  # ourselves: this version
    # b learns m3's protocol from the push-pull: its own push-pull now says so.
    b.handle_stream(req.data, a.addr, 1.0)
    b.take_effects()
    b.join([addr(8)], 2.0)
    (breq,) = [e for e in b.take_effects() if isinstance(e, OpenStream)]
    (bpush,) = body(breq.data)
    assert isinstance(bpush, PushPull)
    bstates = {s.name: s for s in bpush.states}
    assert (bstates["m3"].incarnation, bstates["m3"].protocol) == (1, 2)
    assert bstates["m4"].protocol == 1


def test_every_so_often_the_exchange_is_full_anyway() -> None:
    a, b, _ = two_nodes()
    kinds = [Exchange(a, b, 1000.0 * (k + 1)).kinds[0] for k in range(2 * FULL_PUSH_PULL_EVERY)]
    assert kinds.count("push_pull") == 2
    assert kinds.count("digest") == 2 * FULL_PUSH_PULL_EVERY - 2
    assert kinds[FULL_PUSH_PULL_EVERY - 1] == "push_pull"


def test_the_full_safety_net_gets_rarer_as_the_table_grows() -> None:
    # Its cost per round amortized stays ~FULL_PUSH_PULL_MEMBERS records, not a share of N.
    a, b, _ = two_nodes(3000)
    every = 3000 // FULL_PUSH_PULL_MEMBERS
    kinds = [Exchange(a, b, 1000.0 * (k + 1)).kinds[0] for k in range(FULL_PUSH_PULL_EVERY + every)]
    fulls = [i for i, k in enumerate(kinds) if k == "push_pull"]
    assert fulls == [FULL_PUSH_PULL_EVERY - 1, FULL_PUSH_PULL_EVERY + every - 1]


def test_a_failed_digest_falls_back_to_a_full_push_pull_with_that_peer() -> None:
    a, _b, _ = two_nodes()
    a.take_effects()
    a.handle_timer(1000.0)
    (req,) = [e for e in a.take_effects() if isinstance(e, OpenStream)]
    assert req.kind == "digest"
    a.stream_done(req.id, None, 1000.0)
    assert a.counters["push_pull.digest.failed"] == 1
    a.handle_timer(2000.0)
    (again,) = [e for e in a.take_effects() if isinstance(e, OpenStream)]
    assert again.kind == "push_pull"
    assert again.addr == req.addr
    assert a.counters["push_pull.fallback"] == 1
    # An Ack where the bucket reply was due counts as a failure too.
    a.handle_timer(3000.0)
    (third,) = [e for e in a.take_effects() if isinstance(e, OpenStream)]
    assert third.kind == "digest"
    a.stream_done(third.id, CODEC.pack([wire.encode_message(Ack(0, "m1"))]), 3000.0)
    assert a.counters["push_pull.digest.failed"] == 2


@pytest.mark.parametrize("size", [0, 8 * 3, 12, 8 * 8192])
def test_malformed_digests_are_counted_drops(size: int) -> None:
    _, b, _ = two_nodes(100)
    data = CODEC.pack([wire.encode_message(PushPullDigest(bytes(size), 0))])
    reply = b.handle_stream(data, "198.18.9.9:1", 1.0)
    assert reply is not None
    assert body(reply) == [Ack(0, "m1")]
    assert b.counters["drops.digest"] == 1


@pytest.mark.parametrize(
    ("buckets", "count"), [([1], 0), ([0], 3), ([8], 8), ([-1], 8), (list(range(9)), 8), ([0], 8192)]
)
def test_malformed_bucket_lists_are_counted_drops(buckets: list[int], count: int) -> None:
    _, b, _ = two_nodes(100)
    state = PushNodeState("zz", nid("zz"), addr(999), 0, MemberState.ALIVE)
    msg = PushPull(False, [state], False, 0, buckets, count)
    b.handle_stream(CODEC.pack([wire.encode_message(msg)]), "198.18.9.9:1", 1.0)
    assert b.counters["drops.push_pull_buckets"] == 1
    assert "zz" not in table(b)


def test_old_push_pull_bytes_still_decode_with_the_new_defaults() -> None:
    # proto/vectors/messages.json "push_pull" before PushNodeState.protocol and the bucket fields.
    old = bytes.fromhex(
        "9508c29296a467772d62d9203030313132323333343435353636373738383939616162626363646465656666"
        "af3139382e31382e312e323a37373838070181a473697465a7706c616e742d3296a467772d63d92030663066"
        "30663066306630663066306630663066306630663066306630663066af3139382e31382e312e333a37373838"
        "000380c300"
    )
    (msg,) = wire.decode_body(wire.compound([old]))
    assert isinstance(msg, PushPull)
    assert [s.protocol for s in msg.states] == [1, 1]
    assert (msg.buckets, msg.bucket_count) == ([], 0)


# --- reconnect: the sim's bytes were full tables sent to dead members --------------------------


def test_reconnect_pings_a_dead_member_first_and_pushes_the_table_only_when_it_answers() -> None:
    a, _, names = two_nodes(100)
    deliver(a, Dead(0, "m7", "m1"))

    def reconnect_streams(now: float) -> list[OpenStream]:
        a.handle_timer(now)
        return [e for e in a.take_effects() if isinstance(e, OpenStream) and e.kind == "reconnect"]

    (first,) = reconnect_streams(1000.0)
    (ping,) = body(first.data)
    assert isinstance(ping, Ping)
    assert ping.target == "m7"
    assert len(first.data) < 200  # not the table (~100 records)
    a.stream_done(first.id, None, 1000.0)  # dead indeed: nothing more
    assert reconnect_streams(1000.5) == []

    (second,) = reconnect_streams(2000.0)
    (ping,) = body(second.data)
    assert isinstance(ping, Ping)
    a.stream_done(second.id, CODEC.pack([wire.encode_message(Ack(ping.seq, "m7"))]), 2000.0)
    (push,) = [e for e in a.take_effects() if isinstance(e, OpenStream)]
    assert push.kind == "reconnect"
    assert push.addr == second.addr
    (pp,) = body(push.data)
    assert isinstance(pp, PushPull)
    assert len(pp.states) == len(names)
    assert a.counters["reconnects.answered"] == 1
    # An ack from someone else at that address does not count.
    (third,) = reconnect_streams(3000.0)
    (ping,) = body(third.data)
    assert isinstance(ping, Ping)
    a.stream_done(third.id, CODEC.pack([wire.encode_message(Ack(ping.seq, "m8"))]), 3000.0)
    assert [e for e in a.take_effects() if isinstance(e, OpenStream)] == []
