"""QueryEngine: the rules table of meshd/core/query.py, driven with explicit `now`."""

from __future__ import annotations

import itertools
import math
import random

import msgspec
import pytest

from meshd.core.effects import QueryDone
from meshd.core.messages import Message, Query, QueryFilter, QueryResponse, Relay
from meshd.core.query import (
    ON_QUERY,
    LamportClock,
    QueryEngine,
    QueryLimits,
    QueryOutbound,
    QueryResult,
    ResponseVerdict,
    Verdict,
    default_timeout,
    expected_members,
    matches,
    split_meta,
)
from meshd.errors import ConfigError, StateError

ANY = QueryFilter()


_ports = itertools.count(20000)


def engine(name: str, seed: int = 1, **limits: int) -> QueryEngine:
    addr = f"127.0.0.1:{next(_ports)}"
    return QueryEngine(name, addr, random.Random(seed), QueryLimits(**limits))


def results(e: QueryEngine) -> list[QueryResult]:
    """The queries finished since the last look: QueryDone effects, the engine's only output."""
    effects = e.outbox.take()
    assert all(isinstance(x, QueryDone) for x in effects)
    return [x.result for x in effects if isinstance(x, QueryDone)]


def ask(
    origin: QueryEngine,
    expected: set[str] | None,
    *,
    filters: QueryFilter = ANY,
    timeout: float = 5.0,
    relay_factor: int = 0,
    now: float = 100.0,
    payload: bytes = b"",
) -> Query:
    qid = origin.originate("health", payload, filters, timeout, relay_factor, expected, now)
    query = origin.query_message(qid)
    assert query is not None
    assert query.id == qid
    return query


def answer(
    node: QueryEngine,
    query: Query,
    now: float,
    *,
    payload: bytes = b"ok",
    relays: list[tuple[str, str]] | None = None,
    site: str = "s1",
) -> list[QueryOutbound]:
    action = node.on_query(query, site, {}, now)
    assert action.respond
    return node.respond(action, payload, relays or [], now)


def deliver(out: list[QueryOutbound], origin: QueryEngine, now: float) -> None:
    for o in out:
        assert o.addr == origin.local_addr
        assert isinstance(o.message, QueryResponse)
        origin.on_response(o.message, now)


# --- completion ---------------------------------------------------------------------------------


def test_completes_as_soon_as_every_expected_node_answered() -> None:
    a, b, c = engine("a"), engine("b"), engine("c")
    q = ask(a, {"b", "c"}, now=100.0)
    assert a.get_timer() == 105.0
    deliver(answer(b, q, 100.1, payload=b"B"), a, 100.2)
    assert results(a) == []
    assert a.in_flight() == 1
    deliver(answer(c, q, 100.2, payload=b"C"), a, 100.3)
    [result] = results(a)
    assert result.id == q.id
    assert result.name == "health"
    assert not result.timed_out
    assert result.missing == ()
    assert [(r.name, r.payload) for r in result.responses] == [("b", b"B"), ("c", b"C")]
    assert result.elapsed_ms == pytest.approx(300.0)
    assert result.responses[0].elapsed_ms == pytest.approx(200.0)
    assert a.get_timer() == math.inf
    assert a.in_flight() == 0


def test_timeout_returns_what_it_has_and_names_the_missing() -> None:
    a, b = engine("a"), engine("b")
    q = ask(a, {"b", "dead1", "dead2"}, timeout=2.0, now=10.0)
    deliver(answer(b, q, 10.5), a, 10.5)
    a.handle_timer(11.99)
    assert results(a) == []
    a.handle_timer(a.get_timer())
    [result] = results(a)
    assert result.timed_out
    assert result.missing == ("dead1", "dead2")
    assert [r.name for r in result.responses] == ["b"]
    assert result.elapsed_ms == pytest.approx(2000.0)


def test_empty_expected_completes_at_once_and_none_waits_for_the_timeout() -> None:
    a = engine("a")
    qid = a.originate("health", b"", ANY, 5.0, 0, set(), 0.0)
    [result] = results(a)
    assert result.id == qid
    assert result.responses == ()
    assert result.missing == ()
    assert not result.timed_out
    assert a.query_message(qid) is None  # nothing to gossip

    b = engine("b")
    q = ask(b, None, timeout=1.0, now=0.0)
    deliver(answer(engine("c"), q, 0.1), b, 0.1)
    assert results(b) == []
    b.handle_timer(1.0)
    [result] = results(b)
    assert result.timed_out
    assert result.missing == ()
    assert len(result.responses) == 1


def test_member_down_stops_the_wait_but_is_named_missing() -> None:
    a, b = engine("a"), engine("b")
    q = ask(a, {"b", "c"})
    deliver(answer(b, q, 100.1), a, 100.1)
    a.member_down("zzz", 100.2)  # not expected: no effect
    assert results(a) == []
    a.member_down("c", 100.3)
    [result] = results(a)
    assert result.missing == ("c",)
    assert not result.timed_out


def test_origin_answers_itself_without_sending() -> None:
    a = engine("a")
    q = ask(a, {"a"})
    action = a.on_query(q, "s1", {}, 100.0)
    assert action.verdict is Verdict.MATCH
    assert action.rebroadcast
    assert a.respond(action, b"me", [("b", "127.0.0.1:1")], 100.0) == []
    [result] = results(a)
    assert [(r.name, r.payload) for r in result.responses] == [("a", b"me")]
    # its own query gossiped back to it is a duplicate
    assert a.on_query(q, "s1", {}, 100.1).verdict is Verdict.DUPLICATE


# --- responses ----------------------------------------------------------------------------------


def test_responses_deduplicated_by_sender() -> None:
    a = engine("a")
    q = ask(a, {"b", "c"})
    first = QueryResponse(q.ltime, q.id, "b", b"1")
    again = QueryResponse(q.ltime, q.id, "b", b"2")
    assert a.on_response(first, 100.1) is ResponseVerdict.ACCEPTED
    assert a.on_response(again, 100.2) is ResponseVerdict.DUPLICATE
    a.handle_timer(200.0)
    [result] = results(a)
    assert [(r.name, r.payload) for r in result.responses] == [("b", b"1")]
    assert a.counters["response.duplicate"] == 1


def test_unknown_late_and_too_big_responses_are_dropped() -> None:
    a = engine("a", max_response_size=10)
    q = ask(a, {"b", "c"}, timeout=1.0, now=0.0)
    assert a.on_response(QueryResponse(q.ltime, q.id + 1, "b", b""), 0.1) is ResponseVerdict.UNKNOWN
    assert a.on_response(QueryResponse(q.ltime + 1, q.id, "b", b""), 0.1) is ResponseVerdict.UNKNOWN
    too_big = QueryResponse(q.ltime, q.id, "b", b"x" * 11)
    assert a.on_response(too_big, 0.2) is ResponseVerdict.TOO_BIG
    # the deadline passed but no timer ran yet: the answer is late and the query finishes
    assert a.on_response(QueryResponse(q.ltime, q.id, "c", b""), 1.0) is ResponseVerdict.LATE
    [result] = results(a)
    assert result.timed_out
    assert result.missing == ("b", "c")
    assert a.on_response(QueryResponse(q.ltime, q.id, "c", b""), 1.1) is ResponseVerdict.UNKNOWN


def test_cancel_forgets_without_result() -> None:
    a = engine("a")
    q = ask(a, {"b"})
    a.cancel(q.id)
    assert a.get_timer() == math.inf
    assert a.query_message(q.id) is None
    a.handle_timer(1e9)
    assert results(a) == []


# --- received queries: the ON_QUERY table -------------------------------------------------------


def test_every_verdict_acts_as_the_table_says() -> None:
    origin = engine("a")
    good = ask(origin, None, filters=QueryFilter(site="s1"))
    cases: list[tuple[Verdict, Query, str]] = []
    b = engine("b")
    cases.append((Verdict.MATCH, good, "s1"))
    cases.append((Verdict.DUPLICATE, good, "s1"))
    other = ask(origin, None, filters=QueryFilter(site="s1"))
    cases.append((Verdict.NO_MATCH, other, "s2"))
    cases.append((Verdict.INVALID, msgspec.structs.replace(good, id=7, timeout=0.0), "s1"))
    cases.append((Verdict.BAD_LTIME, msgspec.structs.replace(good, id=9, ltime=(1 << 64) - 1), "s1"))
    # last: a query from far behind this node's clock
    cases.append((Verdict.TOO_OLD, msgspec.structs.replace(good, id=8), "s1"))
    seen = set()
    for verdict, query, site in cases:
        if verdict is Verdict.TOO_OLD:
            b.clock.witness(10_000)
        action = b.on_query(query, site, {}, 1.0)
        assert action.verdict is verdict
        assert (action.rebroadcast, action.respond) == ON_QUERY[verdict]
        seen.add(verdict)
    assert seen == set(Verdict)
    assert ON_QUERY[Verdict.NO_MATCH] == (True, False)  # non-matching nodes still relay
    assert ON_QUERY[Verdict.DUPLICATE] == (False, False)
    assert b.counters["query.match"] == 1
    assert b.counters["query.too_old"] == 1
    assert b.counters["query.bad_ltime"] == 1
    not_ours = b.on_query(ask(origin, None, filters=QueryFilter(site="s9")), "s1", {}, 1.0)
    with pytest.raises(ValueError, match="does not answer"):
        b.respond(not_ours, b"x", [], 1.0)


@pytest.mark.parametrize(
    "change",
    [
        {"timeout": -1.0},
        {"timeout": 301.0},
        {"timeout": float("nan")},
        {"relay_factor": 6},
        {"relay_factor": -1},
        {"filters": QueryFilter(site="re:(")},
        {"filters": QueryFilter(tags={"k": "re:" + "a" * 300})},
        {"payload": b"x" * 2000},
    ],
)
def test_invalid_received_queries_are_neither_answered_nor_relayed(change: dict) -> None:
    q = msgspec.structs.replace(ask(engine("a"), None), **change)
    b = engine("b")
    action = b.on_query(q, "s1", {}, 1.0)
    assert action.verdict is Verdict.INVALID
    assert not action.rebroadcast
    assert not action.respond
    assert b.clock.time() == 0  # not witnessed either


def test_deadline_of_received_query_is_local_now_plus_timeout() -> None:
    q = ask(engine("a"), None, timeout=3.0, now=500.0)
    action = engine("b").on_query(q, "s1", {}, 7.0)
    assert action.deadline == 10.0


def test_answer_after_the_deadline_is_not_sent() -> None:
    q = ask(engine("a"), {"b"}, timeout=1.0)
    b = engine("b")
    action = b.on_query(q, "s1", {}, 0.0)
    assert b.respond(action, b"x", [], 1.01) == []
    assert b.counters["respond.late"] == 1


# --- filters ------------------------------------------------------------------------------------


def test_filters_by_node_site_and_tags() -> None:
    tags = {"role": "edge", "rel": "4.2"}
    assert matches(ANY, "n1", "s1", {})
    assert matches(QueryFilter(nodes=["n1", "n2"]), "n1", "s1", {})
    assert not matches(QueryFilter(nodes=["n2"]), "n1", "s1", {})
    assert matches(QueryFilter(site="s1"), "n1", "s1", {})
    assert not matches(QueryFilter(site="s1"), "n1", "s10", {})
    assert matches(QueryFilter(site="re:s[1-3]"), "n1", "s2", {})
    assert not matches(QueryFilter(site="re:s[1-3]"), "n1", "s10", {})  # anchored, unlike Serf
    assert matches(QueryFilter(tags={"role": "edge"}), "n1", "s1", tags)
    assert not matches(QueryFilter(tags={"role": "core"}), "n1", "s1", tags)
    assert not matches(QueryFilter(tags={"zone": "a"}), "n1", "s1", tags)  # missing tag
    assert matches(QueryFilter(tags={"role": "edge", "rel": r"re:4\.\d+"}), "n1", "s1", tags)
    assert not matches(QueryFilter(tags={"role": "edge", "rel": "re:5.*"}), "n1", "s1", tags)
    assert matches(QueryFilter(tags={"x": "re:re:y"}), "n1", "s1", {"x": "re:y"})
    both = QueryFilter(nodes=["n1"], site="s1", tags={"role": "edge"})
    assert matches(both, "n1", "s1", tags)
    assert not matches(both, "n1", "s2", tags)


def test_split_meta_reads_site_and_tags_as_node_config_writes_them() -> None:
    meta = {"site": "s1", "tag:role": "edge", "tag:rel": "4.2", "health": "passing"}
    assert split_meta(meta) == ("s1", {"role": "edge", "rel": "4.2"})
    assert split_meta({}) == ("", {})


def test_expected_members_and_filtered_query_end_to_end() -> None:
    members = [("a", "s1", {}), ("b", "s1", {"role": "edge"}), ("c", "s2", {"role": "edge"})]
    filters = QueryFilter(site="s1", tags={"role": "edge"})
    assert expected_members(filters, members) == {"b"}
    a, b, c = engine("a"), engine("b"), engine("c")
    q = ask(a, expected_members(filters, members), filters=filters)
    act_a = a.on_query(q, "s1", {}, 100.0)
    act_b = b.on_query(q, "s1", {"role": "edge"}, 100.0)
    act_c = c.on_query(q, "s2", {"role": "edge"}, 100.0)
    assert [x.verdict for x in (act_a, act_b, act_c)] == [
        Verdict.NO_MATCH,
        Verdict.MATCH,
        Verdict.NO_MATCH,
    ]
    assert all(x.rebroadcast for x in (act_a, act_b, act_c))
    deliver(b.respond(act_b, b"hi", [], 100.1), a, 100.1)
    [result] = results(a)
    assert [r.name for r in result.responses] == ["b"]
    assert not result.timed_out


def test_originate_rejects_bad_arguments_naming_the_field() -> None:
    a = engine("a", max_pending=2)
    with pytest.raises(ConfigError, match=r"filters\.tags\.role"):
        a.originate("q", b"", QueryFilter(tags={"role": "re:[a-"}), 1.0, 0, None, 0.0)
    with pytest.raises(ConfigError, match=r"filters\.site"):
        a.originate("q", b"", QueryFilter(site="re:" + "x" * 257), 1.0, 0, None, 0.0)
    with pytest.raises(ConfigError, match="timeout"):
        a.originate("q", b"", ANY, 0.0, 0, None, 0.0)
    with pytest.raises(ConfigError, match="relay_factor"):
        a.originate("q", b"", ANY, 1.0, 9, None, 0.0)
    with pytest.raises(ConfigError, match="payload"):
        a.originate("q", b"x" * 1024, ANY, 1.0, 0, None, 0.0)
    with pytest.raises(ConfigError, match="name"):
        a.originate("", b"", ANY, 1.0, 0, None, 0.0)
    assert a.clock.time() == 0  # nothing was sent
    a.originate("q", b"", ANY, 1.0, 0, None, 0.0)
    a.originate("q", b"", ANY, 1.0, 0, None, 0.0)
    with pytest.raises(StateError):
        a.originate("q", b"", ANY, 1.0, 0, None, 0.0)


# --- relays and sizes ---------------------------------------------------------------------------


def test_relay_factor_sends_wrapped_answers_through_random_other_members() -> None:
    a, b = engine("a"), engine("b", seed=3)
    q = ask(a, {"b", "c"}, relay_factor=2)
    members = [("a", a.local_addr), ("b", b.local_addr)] + [(f"r{i}", f"127.0.0.2:{i}") for i in range(5)]
    out = answer(b, q, 100.1, relays=members)
    direct, *relayed = out
    assert direct.addr == a.local_addr
    assert isinstance(direct.message, QueryResponse)
    assert len(relayed) == 2
    assert len({o.addr for o in relayed}) == 2
    for o in relayed:
        assert o.addr.startswith("127.0.0.2:")  # never the answerer or the origin
        assert isinstance(o.message, Relay)
        assert o.message.dest == "a"
        assert o.message.dest_addr == a.local_addr
        assert o.message.response == direct.message
    assert b.counters["respond.relayed"] == 2

    # the direct answer is lost; a relay forwards the inner answer to the origin
    relay_node = engine("r0")
    first, second = (o.message for o in relayed)
    assert isinstance(first, Relay)
    assert isinstance(second, Relay)
    [forward] = relay_node.on_relay(first, 100.2)
    assert forward.addr == a.local_addr
    assert forward.message == direct.message
    assert a.on_response(forward.message, 100.3) is ResponseVerdict.ACCEPTED
    # the second copy arrives as a Relay addressed to the origin itself: a duplicate
    assert a.on_relay(second, 100.4) == []
    assert a.counters["response.duplicate"] == 1
    a.handle_timer(a.get_timer())
    [result] = results(a)
    assert [r.name for r in result.responses] == ["b"]
    assert result.missing == ("c",)


def test_relay_factor_bounded_by_available_members() -> None:
    q = ask(engine("a"), {"b"}, relay_factor=5)
    out = answer(engine("b"), q, 100.0, relays=[("a", "x"), ("b", "y"), ("c", "127.0.0.3:1")])
    assert [o.addr for o in out[1:]] == ["127.0.0.3:1"]


def test_large_answers_are_marked_for_tcp() -> None:
    q = ask(engine("a"), {"b"}, relay_factor=1)
    b = engine("b")
    action = b.on_query(q, "s1", {}, 100.0)
    small = b.respond(action, b"x" * 100, [("c", "127.0.0.3:1")], 100.0)
    assert [o.via_stream for o in small] == [False, False]
    c = engine("c")
    action = c.on_query(msgspec.structs.replace(q, id=q.id + 1), "s1", {}, 100.0)
    big = c.respond(action, b"x" * 5000, [("d", "127.0.0.3:2")], 100.0)
    assert [o.via_stream for o in big] == [True, True]
    assert engine("d").on_relay(big[1].message, 100.1)[0].via_stream  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than"):
        c.respond(action, b"x" * (256 * 1024 + 1), [], 100.0)


def test_mesh_with_loss_relays_bring_every_answer_that_has_a_path() -> None:
    """120 nodes, 10% loss per hop: an answer is missing exactly when every path was lost."""
    loss = random.Random(42)
    origin = engine("n0")
    nodes = [engine(f"n{i}", seed=i) for i in range(1, 121)]
    members = [(n.local_name, n.local_addr) for n in [origin, *nodes]]
    by_addr = {n.local_addr: n for n in [origin, *nodes]}
    q = ask(origin, {n.local_name for n in nodes}, relay_factor=3, timeout=5.0, now=0.0)
    lost_everything: set[str] = set()
    for i, node in enumerate(nodes):
        now = 0.01 * i
        arrived = False
        for out in answer(node, q, now, relays=members):
            if loss.random() < 0.1:
                continue
            if isinstance(out.message, Relay):
                [fwd] = by_addr[out.addr].on_relay(out.message, now)
                if loss.random() < 0.1:
                    continue
                origin.on_response(fwd.message, now)  # type: ignore[arg-type]
            else:
                assert isinstance(out.message, QueryResponse)
                origin.on_response(out.message, now)
            arrived = True
        if not arrived:
            lost_everything.add(node.local_name)
    if not lost_everything:
        [result] = results(origin)
        assert not result.timed_out
    else:
        origin.handle_timer(5.0)
        [result] = results(origin)
    assert set(result.missing) == lost_everything
    assert len(result.responses) == 120 - len(lost_everything)
    assert len(lost_everything) <= 2  # without relays about 12 of 120 would be lost


# --- clock and ring -----------------------------------------------------------------------------


def test_lamport_clock() -> None:
    clock = LamportClock()
    assert clock.time() == 0
    assert clock.increment() == 1
    clock.witness(0)
    assert clock.time() == 1
    clock.witness(1)
    assert clock.time() == 2
    clock.witness(10)
    assert clock.time() == 11


def test_query_ltimes_follow_the_lamport_clock() -> None:
    a, b = engine("a"), engine("b")
    q1 = ask(a, None)
    q2 = ask(a, None)
    assert (q1.ltime, q2.ltime) == (0, 1)
    assert a.clock.time() == 2
    a.on_query(q2, "s1", {}, 100.0)  # its own query does not move the clock
    assert a.clock.time() == 2
    b.clock.witness(40)
    b.on_query(q1, "s1", {}, 100.0)
    assert b.clock.time() == 41  # a lower ltime leaves it
    b.on_query(msgspec.structs.replace(q1, ltime=100), "s1", {}, 100.0)
    assert b.clock.time() == 101
    q3 = ask(b, None)
    assert q3.ltime == 101
    a.on_query(q3, "s1", {}, 100.0)
    assert ask(a, None).ltime == 102  # after witnessing, a's next query is newer


def test_ring_forgets_nothing_inside_the_window_and_drops_older() -> None:
    b = engine("b", ring_size=8, max_ids_per_slot=64)
    base = ask(engine("a"), None)
    for lt in range(0, 30):
        assert b.on_query(msgspec.structs.replace(base, ltime=lt), "s1", {}, 0.0).respond
    assert b.clock.time() == 30
    for lt in range(22, 30):  # the window is the last ring_size ltimes: all remembered
        q = msgspec.structs.replace(base, ltime=lt)
        assert b.on_query(q, "s1", {}, 0.0).verdict is Verdict.DUPLICATE
    for lt in (0, 5, 21):  # older than the window: dropped, never answered twice
        q = msgspec.structs.replace(base, ltime=lt)
        assert b.on_query(q, "s1", {}, 0.0).verdict is Verdict.TOO_OLD
    # a new id at an ltime inside the window is new
    q = msgspec.structs.replace(base, ltime=29, id=base.id + 1)
    assert b.on_query(q, "s1", {}, 0.0).verdict is Verdict.MATCH


def test_ring_slot_holds_a_bounded_number_of_ids() -> None:
    b = engine("b", ring_size=8, max_ids_per_slot=4)
    base = ask(engine("a"), None)
    for i in range(5):
        assert b.on_query(msgspec.structs.replace(base, id=i), "s1", {}, 0.0).respond
    # id 0 was pushed out of its slot (bounded memory); ids 1..4 are still known
    for i in range(1, 5):
        q = msgspec.structs.replace(base, id=i)
        assert b.on_query(q, "s1", {}, 0.0).verdict is Verdict.DUPLICATE
    assert b.on_query(msgspec.structs.replace(base, id=0), "s1", {}, 0.0).respond


def test_default_timeout_is_serfs() -> None:
    assert default_timeout(0.2, 9) == pytest.approx(3.2)
    assert default_timeout(0.2, 10) == pytest.approx(6.4)
    assert default_timeout(0.2, 999) == pytest.approx(9.6)
    assert default_timeout(0.2, 0) == pytest.approx(3.2)


def test_query_messages_round_trip_with_their_tags() -> None:
    q = ask(engine("a"), None, filters=QueryFilter(["n1"], "re:s.*", {"k": "v"}), payload=b"\x00")
    resp = QueryResponse(q.ltime, q.id, "b", b"\xff")
    relay = Relay("a", "127.0.0.1:1", resp)
    for msg, tag in ((q, 10), (resp, 11), (relay, 12)):
        data = msgspec.msgpack.encode(msg)
        assert msgspec.msgpack.decode(data)[0] == tag
        assert msgspec.msgpack.decode(data, type=Message) == msg


# --- a key holder's lies about the clock are bounded (issue 9) ----------------------------------


@pytest.mark.parametrize("ltime", [(1 << 64) - 1, 1 << 53, -1, 41 + 1_000_000 + 1])
def test_query_with_ltime_beyond_the_bounds_is_dropped_counted_and_never_witnessed(ltime: int) -> None:
    origin, b = engine("a"), engine("b")
    b.clock.witness(40)  # the jump is measured from 41: 41 + 1,000,000 is the furthest allowed
    forged = msgspec.structs.replace(ask(origin, None), ltime=ltime)
    action = b.on_query(forged, "s1", {}, 1.0)
    assert action.verdict is Verdict.BAD_LTIME
    assert not action.rebroadcast
    assert not action.respond
    assert b.clock.time() == 41
    assert b.counters["query.bad_ltime"] == 1
    # The clock still works: b's next query encodes and is answered.
    q = ask(b, {"a"})
    msgspec.msgpack.encode(q)
    deliver(answer(origin, q, 100.1), b, 100.1)
    [result] = results(b)
    assert [r.name for r in result.responses] == ["a"]


def test_the_largest_allowed_jump_is_witnessed() -> None:
    origin, b = engine("a"), engine("b")
    q = msgspec.structs.replace(ask(origin, None), ltime=1_000_000)
    assert b.on_query(q, "s1", {}, 1.0).verdict is Verdict.MATCH
    assert b.clock.time() == 1_000_001


def test_responses_and_relays_with_ltime_beyond_the_bounds_are_dropped_and_counted() -> None:
    a = engine("a")
    q = ask(a, {"b"})
    forged = QueryResponse((1 << 64) - 1, q.id, "b", b"x")
    assert a.on_response(forged, 100.1) is ResponseVerdict.BAD_LTIME
    assert a.counters["response.bad_ltime"] == 1
    assert a.on_relay(Relay("z", "127.0.0.1:1", forged), 100.1) == []
    assert a.counters["relay.bad_ltime"] == 1
    a.on_response(QueryResponse(q.ltime, q.id, "b", b"x"), 100.2)  # the real answer still counts
    [result] = results(a)
    assert not result.timed_out


def test_originate_refuses_at_the_clock_ceiling_instead_of_overflowing() -> None:
    a = engine("a", max_ltime=100)
    a.clock.witness(98)
    with pytest.raises(StateError, match="ceiling"):
        ask(a, None)


def test_push_pull_clock_caught_up_once_then_clamped_to_the_jump() -> None:
    fresh = engine("a")
    fresh.witness_push_pull(5_000_000)  # a new node joins a mesh that ran a long time
    assert fresh.clock.time() == 5_000_001
    fresh.witness_push_pull(10)  # behind: nothing changes
    assert fresh.clock.time() == 5_000_001
    fresh.witness_push_pull((1 << 53) - 1)  # a liar: one bounded step only
    assert fresh.clock.time() == 6_000_002
    assert fresh.counters["push_pull.clamped"] == 1
    for bad in (-1, 1 << 53, (1 << 64) - 1):
        fresh.witness_push_pull(bad)
    assert fresh.clock.time() == 6_000_002
    assert fresh.counters["push_pull.bad_ltime"] == 3


# --- filters in linear time (RE2) ---------------------------------------------------------------


@pytest.mark.timeout(5)  # Python's re takes minutes (exponential backtracking) on these
@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)+$", "(a|a?)+$", "(.*a){12}"])
def test_catastrophic_backtracking_patterns_match_in_linear_time(pattern: str) -> None:
    value = "a" * 5_000 + "!"
    filters = QueryFilter(site="re:" + pattern)
    for _ in range(3):  # a forged query reaches every matching node; each answers fast
        assert not matches(filters, "n1", value, {})
        assert not matches(QueryFilter(tags={"k": "re:" + pattern}), "n1", "s1", {"k": value})
    b = engine("b")
    q = msgspec.structs.replace(ask(engine("a"), None), filters=filters)
    assert b.on_query(q, value, {}, 1.0).verdict is Verdict.NO_MATCH


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", r"invalid escape sequence: \\1"),
        ("(?=a)a", r"invalid perl operator: \(\?="),
        ("(?<!a)b", r"invalid perl operator: \(\?<!"),
        (r"a\Z", r"invalid escape sequence: \\Z"),
        ("(", "missing \\)"),
        ("a{1001}", "invalid repetition size"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_with_a_clear_error(pattern: str, why: str) -> None:
    a = engine("a")
    with pytest.raises(ConfigError, match=r"^filters\.site: bad regular expression: " + why) as info:
        ask(a, None, filters=QueryFilter(site="re:" + pattern))
    assert "no backreferences, lookaround" in str(info.value)
    with pytest.raises(ConfigError, match=r"^filters\.tags\.k: bad regular expression: "):
        ask(a, None, filters=QueryFilter(tags={"k": "re:" + pattern}))
    # Received from a peer: invalid, never matched (and it never raises).
    q = msgspec.structs.replace(ask(engine("c"), None), filters=QueryFilter(site="re:" + pattern))
    assert engine("b").on_query(q, "s1", {}, 1.0).verdict is Verdict.INVALID


def test_patterns_keep_full_match_semantics_on_re2() -> None:
    assert matches(QueryFilter(site="re:s[1-3]"), "n", "s2", {})
    assert not matches(QueryFilter(site="re:s[1-3]"), "n", "s10", {})
    assert not matches(QueryFilter(site="re:s[1-3]"), "n", "xs1", {})
    assert matches(QueryFilter(site="re:re:x"), "n", "re:x", {})
    assert matches(QueryFilter(site="re:(?i)SHOP-(?P<n>\\d+)"), "n", "shop-12", {})
    assert matches(QueryFilter(site="re:caf\u00e9|.*\u00fc"), "n", "caf\u00e9", {})


def test_filters_name_a_bounded_number_of_nodes_and_tags() -> None:
    a = engine("a", max_filter_nodes=3, max_filter_tags=2)
    with pytest.raises(ConfigError, match=r"filters\.nodes: at most 3 node names"):
        ask(a, None, filters=QueryFilter(nodes=["a", "b", "c", "d"]))
    with pytest.raises(ConfigError, match=r"filters\.tags: at most 2 tags"):
        ask(a, None, filters=QueryFilter(tags={"a": "1", "b": "2", "c": "3"}))
    q = msgspec.structs.replace(ask(engine("c"), None), filters=QueryFilter(nodes=["a", "b", "c", "d"]))
    assert a.on_query(q, "s1", {}, 1.0).verdict is Verdict.INVALID


# --- clock and ring across a restart ------------------------------------------------------------


def test_restored_engine_keeps_its_clock_and_dedupes_queries_seen_before_the_restart() -> None:
    origin, b = engine("a"), engine("b")
    seen = [ask(origin, None) for _ in range(20)]
    for q in seen:
        b.on_query(q, "s1", {}, 1.0)
    saved = b.export_state()
    assert saved.ltime == 20
    assert [lt for lt, _ in saved.seen] == list(range(20))
    restarted = engine("b", seed=2)
    restarted.restore(saved)
    assert restarted.clock.time() >= 20
    for q in seen:  # a replay after the restart is still a duplicate
        assert restarted.on_query(q, "s1", {}, 2.0).verdict is Verdict.DUPLICATE
    assert ask(restarted, None).ltime >= 20
    # The restored clock counts as synced: a push-pull lie is clamped.
    restarted.witness_push_pull(50_000_000)
    assert restarted.clock.time() <= 21 + 1_000_001


def test_restore_skips_values_out_of_bounds_and_never_moves_the_clock_back() -> None:
    from meshd.core.query import QueryState

    b = engine("b", ring_size=8, max_ids_per_slot=2)
    b.clock.witness(100)
    b.restore(QueryState(5, ((1 << 60, (1,)), (-1, (2,)), (3, (3,)), (99, (4, 5, 6)))))
    assert b.clock.time() == 101  # not back to 5
    state = b.export_state()
    assert state.seen == ((99, (5, 6)),)  # ltime 3 is older than the ring; ids bounded per slot
    b.restore(QueryState((1 << 64) - 1))
    assert b.clock.time() == 101
