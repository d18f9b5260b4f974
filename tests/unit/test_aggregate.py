"""Aggregated queries at the engine level (meshd.core.aggregate, QueryEngine): the health
reducer and the exact merge, the aggregator and its backup, missing logic, and the bounds on
what a peer's SiteSummary may claim."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

import orjson
import pytest

from meshd import wire
from meshd.core.aggregate import (
    AGGREGATE_SITE,
    MAX_SUMMARY_NAMES,
    OriginSites,
    SiteMember,
    SitePart,
    SummaryVerdict,
    pick_aggregator,
    pick_aggregators,
)
from meshd.core.effects import QueryDone
from meshd.core.messages import MemberState, Query, QueryFilter, QueryResponse, Relay, SiteSummary
from meshd.core.query import QueryEngine, QueryOutbound, QueryResult
from meshd.errors import ConfigError
from meshd.health.summary import answer_status, site_doc, summarize

# site "a": a0..a3, site "b": b0..b2; the origin "o" is in site "b"
SITE_OF = {**{f"a{i}": "a" for i in range(4)}, **{f"b{i}": "b" for i in range(3)}, "o": "b"}


def addr(name: str) -> str:
    return f"198.18.0.{sorted(SITE_OF).index(name) + 1}:7788"


def engine(name: str) -> QueryEngine:
    return QueryEngine(name, addr(name), random.Random(7), reducer=summarize)


def health(status: str, *failing: str) -> bytes:
    checks = [{"name": c, "status": status} for c in failing]
    return orjson.dumps({"status": status, "checks": checks})


def results(e: QueryEngine) -> list[QueryResult]:
    return [eff.result for eff in e.outbox.take() if isinstance(eff, QueryDone)]


def site_members(site: str, down: Collection[str] = (), suspect: Collection[str] = ()) -> list[SiteMember]:
    def state(n: str) -> MemberState:
        if n in down:
            return MemberState.DEAD
        return MemberState.SUSPECT if n in suspect else MemberState.ALIVE

    return [SiteMember(n, addr(n), state(n), {}) for n in sorted(SITE_OF) if SITE_OF[n] == site]


def start(origin: QueryEngine, timeout: float = 4.0, expected: set[str] | None = None) -> int:
    expected = set(SITE_OF) if expected is None else expected
    return origin.originate("health", b"", QueryFilter(), timeout, 0, expected, 0.0, AGGREGATE_SITE, SITE_OF)


def summary(origin: QueryEngine, qid: int, **fields: Any) -> SiteSummary:
    query = origin.query_message(qid)
    assert query is not None
    base: dict[str, Any] = {
        "site": "a",
        "source": "a0",
        "payload": b'{"failing":[]}',
        "answered": [],
        "missing": [],
    }
    base.update(fields)
    return SiteSummary(query.ltime, query.id, **base)


# --- the health reducer and the merge --------------------------------------------------------


def test_health_reducer_keeps_only_the_nodes_that_are_not_passing() -> None:
    answers = [
        ("a0", health("passing")),
        ("a1", health("critical", "disk", "load")),
        ("a2", health("warning", "mem")),
        ("a3", b"not json"),
    ]
    doc = orjson.loads(summarize("health", answers))
    assert doc == {
        "failing": [
            {"name": "a1", "status": "critical", "checks": ["disk", "load"]},
            {"name": "a2", "status": "warning", "checks": ["mem"]},
            {"name": "a3", "status": "unknown", "checks": []},
        ]
    }
    assert answer_status(orjson.dumps({"error": "busy", "detail": "x"})) == ("unknown", ["busy"])


def test_site_doc_merges_two_aggregators_without_counting_a_node_twice() -> None:
    first = SitePart(
        "a0",
        summarize("health", [("a0", health("passing")), ("a1", health("critical", "disk"))]),
        ("a0", "a1"),
    )
    # a second aggregator (views differed) saw a1 too; the origin kept only its new name a2
    second = SitePart("a3", summarize("health", [("a2", health("warning", "mem"))]), ("a2",))
    doc = site_doc([first, second], ["a3", "a1"])  # a1 answered: not missing after all
    assert doc == {
        "nodes": 4,
        "passing": 1,
        "warning": 1,
        "critical": 1,
        "missing": ["a3"],
        "failing": [
            {"name": "a1", "status": "critical", "checks": ["disk"]},
            {"name": "a2", "status": "warning", "checks": ["mem"]},
        ],
    }


def test_a_damaged_summary_counts_its_nodes_critical_not_passing() -> None:
    doc = site_doc([SitePart("a0", b"garbage", ("a0", "a1"))], [])
    assert doc["passing"] == 0
    assert doc["critical"] == 2


# --- the aggregator ----------------------------------------------------------------------------


def test_rendezvous_choice_is_the_same_everywhere_and_moves_with_the_query() -> None:
    names = [f"a{i}" for i in range(4)]
    assert pick_aggregator(5, 9, names) == pick_aggregator(5, 9, list(reversed(names)))
    assert pick_aggregators(5, 9, names)[0] == pick_aggregator(5, 9, names)
    assert len({pick_aggregator(q, 1, names) for q in range(40)}) > 1  # load spreads over queries
    assert pick_aggregator(1, 1, []) is None


A_NAMES = ["a0", "a1", "a2", "a3"]


def run_site(
    silent: Collection[str] = (),
    down: Collection[str] = (),
    timeout: float = 4.0,
    suspect: Collection[str] = (),
):
    """Site "a" answers an aggregated query from "o" (answers at t=0.01); returns (origin,
    ranked aggregators, the site's engines, what they sent the origin). `suspect`: members
    every other member of the site holds suspect (they are up and answer unless silent)."""
    origin = engine("o")
    qid = start(origin, timeout)
    query = origin.query_message(qid)
    assert query is not None
    engines = {n: engine(n) for n in A_NAMES if n not in down}
    actions = {}
    asked: dict[str, list[str]] = {}
    for name, e in engines.items():
        actions[name] = e.on_query(query, "a", {}, 0.0)
        view = site_members("a", down, [n for n in suspect if n != name])
        asked[name] = [n for n, _ in e.on_aggregated(actions[name], "a", view, 0.0)]
    run_site.asked = asked  # type: ignore[attr-defined]
    by_addr = {addr(n): e for n, e in engines.items()}
    to_origin: list[QueryOutbound] = []
    pending: list[QueryOutbound] = []
    for name, e in engines.items():
        if name not in silent:
            pending += e.respond(actions[name], health("passing"), [], 0.01)
    while pending:
        out = pending.pop(0)
        if out.addr == origin.local_addr:
            to_origin.append(out)
            continue
        target = by_addr[out.addr]
        if isinstance(out.message, Relay):
            pending += target.on_relay(out.message, 0.02)
        elif isinstance(out.message, SiteSummary):
            target.on_site_summary(out.message, 0.02)
    alive = [n for n in A_NAMES if n not in down and n not in suspect]
    ranked = pick_aggregators(query.id, query.ltime, alive)
    return origin, ranked, engines, to_origin


def test_one_summary_from_the_site_once_every_member_answered() -> None:
    origin, ranked, engines, to_origin = run_site()
    [out] = to_origin
    msg = out.message
    assert isinstance(msg, SiteSummary)
    assert (msg.site, msg.source) == ("a", ranked[0])
    assert msg.answered == A_NAMES
    assert msg.missing == []
    assert origin.on_site_summary(msg, 0.05) is SummaryVerdict.ACCEPTED
    # The backup stood down (the primary's copy reached it): nothing from it at its deadline.
    backup = engines[ranked[1]]
    assert backup.handle_timer(3.0) == []
    assert backup.counters["gather.backup_stood_down"] == 1


def test_a_silent_member_is_missing_when_the_gather_window_ends() -> None:
    _, ranked, _, _ = run_site()  # the origin's seeded generator asks the same query each run
    silent = next(n for n in A_NAMES if n not in ranked)
    _, ranked, engines, to_origin = run_site(silent={silent})
    assert to_origin == []  # still waiting for the silent one
    primary = engines[ranked[0]]
    assert primary.get_timer() == pytest.approx(0.4 * 4.0)
    [out] = [o for o in primary.handle_timer(1.6) if o.addr == addr("o")]
    assert isinstance(out.message, SiteSummary)
    assert out.message.missing == [silent]
    assert out.message.answered == [n for n in A_NAMES if n != silent]


def test_a_silent_primary_costs_time_not_the_site_its_backup_speaks_up() -> None:
    _, ranked, _, _ = run_site()
    _, ranked, engines, to_origin = run_site(silent=set(ranked[:1]))
    assert to_origin == []  # the primary waits for its own answer; the backup for its window
    # the primary never answers nor sends (it died before anyone noticed): only the backup's
    # timer runs here
    backup = engines[ranked[1]]
    assert backup.get_timer() == pytest.approx(0.55 * 4.0)
    sent = [o for o in backup.handle_timer(2.2) if o.addr == addr("o")]
    assert len(sent) == 1
    msg = sent[0].message
    assert isinstance(msg, SiteSummary)
    assert msg.source == ranked[1]
    assert msg.missing == [ranked[0]]


def test_a_member_the_aggregator_knows_dead_is_missing_without_waiting() -> None:
    _, ranked, _, to_origin = run_site(down={"a3"})
    [out] = to_origin
    assert isinstance(out.message, SiteSummary)
    assert out.message.source == ranked[0]
    assert out.message.missing == ["a3"]


def test_a_suspect_member_is_asked_and_its_answer_counts() -> None:
    # Just restarted, or one lost ack: the site still holds it suspect, yet it is up.
    _, ranked, _, _ = run_site()
    suspect = next(n for n in A_NAMES if n not in ranked)
    _, ranked, _, to_origin = run_site(suspect={suspect})
    assert suspect in run_site.asked[ranked[0]]  # type: ignore[attr-defined]
    [out] = to_origin
    assert isinstance(out.message, SiteSummary)
    assert out.message.answered == A_NAMES
    assert out.message.missing == []


def test_a_silent_suspect_is_waited_for_then_missing() -> None:
    _, ranked, _, _ = run_site()
    suspect = next(n for n in A_NAMES if n not in ranked)
    _, ranked, engines, to_origin = run_site(suspect={suspect}, silent={suspect})
    assert to_origin == []  # a suspect may be up: it gets the gather window like anyone
    [out] = [o for o in engines[ranked[0]].handle_timer(1.6) if o.addr == addr("o")]
    assert isinstance(out.message, SiteSummary)
    assert out.message.missing == [suspect]


# --- the origin: merge, missing, bounds -----------------------------------------------------------


def test_a_member_the_origin_holds_dead_is_missing_though_no_site_names_it() -> None:
    # The site's aggregator joined after b2 died and never heard of it; the origin did.
    origin = engine("o")
    alive = set(SITE_OF) - {"b2"}
    qid = origin.originate(
        "health", b"", QueryFilter(), 4.0, 0, alive, 0.0, AGGREGATE_SITE, SITE_OF, down={"b2"}
    )
    ok = SummaryVerdict.ACCEPTED
    assert origin.on_site_summary(summary(origin, qid, answered=["a0", "a1", "a2", "a3"]), 0.1) is ok
    b = summary(origin, qid, site="b", source="b1", answered=["b0", "b1", "o"])
    assert origin.on_site_summary(b, 0.2) is ok
    [r] = results(origin)  # not waited for: complete as soon as every alive match is covered
    assert not r.timed_out
    assert r.missing == ("b2",)
    [site_b] = [s for s in r.sites if s.site == "b"]
    assert site_b.missing == ("b2",)


def test_a_down_member_that_answers_after_all_is_not_missing() -> None:
    origin = engine("o")
    qid = origin.originate(
        "health", b"", QueryFilter(), 4.0, 0, set(SITE_OF) - {"b2"}, 0.0, AGGREGATE_SITE, SITE_OF, down={"b2"}
    )
    origin.on_site_summary(summary(origin, qid, answered=["a0", "a1", "a2", "a3"]), 0.1)
    origin.on_site_summary(summary(origin, qid, site="b", source="b1", answered=["b0", "b1", "b2", "o"]), 0.2)
    [r] = results(origin)
    assert r.missing == ()


def test_the_origin_completes_when_every_site_reported_and_names_the_missing() -> None:
    origin = engine("o")
    qid = start(origin)
    ok = SummaryVerdict.ACCEPTED
    assert (
        origin.on_site_summary(summary(origin, qid, answered=["a0", "a1", "a2"], missing=["a3"]), 0.1) is ok
    )
    assert results(origin) == []  # site b has not reported
    b = summary(origin, qid, site="b", source="b1", answered=["b0", "b1", "b2", "o"])
    assert origin.on_site_summary(b, 0.2) is ok
    [r] = results(origin)
    assert not r.timed_out
    assert r.missing == ("a3",)
    assert [(s.site, s.answered(), s.missing) for s in r.sites] == [
        ("a", ["a0", "a1", "a2"], ("a3",)),
        ("b", ["b0", "b1", "b2", "o"], ()),
    ]


def test_a_site_that_never_reports_is_all_missing_at_the_timeout() -> None:
    origin = engine("o")
    qid = start(origin, timeout=2.0)
    origin.on_site_summary(summary(origin, qid, site="b", source="b0", answered=["b0", "b1", "b2", "o"]), 0.1)
    origin.handle_timer(2.0)
    [r] = results(origin)
    assert r.timed_out
    assert r.missing == ("a0", "a1", "a2", "a3")
    [site_a] = [s for s in r.sites if s.site == "a"]
    assert site_a.parts == ()


@pytest.mark.parametrize(
    ("fields", "verdict"),
    [
        ({"site": "elsewhere"}, SummaryVerdict.UNKNOWN_SITE),
        ({"source": "b0"}, SummaryVerdict.FOREIGN),  # b0 is not in site a
        ({"source": "stranger"}, SummaryVerdict.FOREIGN),
        ({"payload": b"x" * (256 * 1024 + 1)}, SummaryVerdict.TOO_BIG),
        ({"missing": [f"x{i}" for i in range(MAX_SUMMARY_NAMES + 1)]}, SummaryVerdict.TOO_BIG),
    ],
)
def test_summaries_that_claim_too_much_are_dropped_and_counted(
    fields: dict[str, Any], verdict: SummaryVerdict
) -> None:
    origin = engine("o")
    qid = start(origin)
    assert origin.on_site_summary(summary(origin, qid, answered=["a0"], **fields), 0.1) is verdict
    assert origin.counters[f"summary.{verdict.value}"] == 1


def test_unknown_queries_replays_and_bad_ltimes_are_dropped() -> None:
    origin = engine("o")
    qid = start(origin)
    msg = summary(origin, qid, answered=["a0"])
    assert origin.on_site_summary(msg, 0.1) is SummaryVerdict.ACCEPTED
    assert origin.on_site_summary(msg, 0.2) is SummaryVerdict.DUPLICATE  # a replay
    other = SiteSummary(msg.ltime, msg.id + 1, "a", "a0", b"", [], [])
    assert origin.on_site_summary(other, 0.2) is SummaryVerdict.UNKNOWN
    assert (
        origin.on_site_summary(SiteSummary(-1, msg.id, "a", "a1", b"", [], []), 0.2)
        is SummaryVerdict.BAD_LTIME
    )
    plain = origin.originate("health", b"", QueryFilter(), 4.0, 0, {"a0"}, 0.0)  # not aggregated
    q = origin.query_message(plain)
    assert q is not None
    assert (
        origin.on_site_summary(SiteSummary(q.ltime, q.id, "a", "a0", b"", [], []), 0.2)
        is SummaryVerdict.UNKNOWN
    )


def test_a_summary_cannot_claim_another_sites_nodes_or_count_a_node_twice() -> None:
    sites = OriginSites(SITE_OF, set(SITE_OF))
    first = SiteSummary(1, 1, "a", "a0", b"{}", ["a0", "a1", "b0", "ghost"], ["b1", "gone"])
    assert sites.accept(first, 1024) is SummaryVerdict.ACCEPTED
    assert sites.parts["a"][0].answered == ("a0", "a1")  # b0 is site b's, ghost unknown here
    assert sites.stripped == 3  # b0, ghost and b1; "gone" (unknown here) is taken as missing
    second = SiteSummary(1, 1, "a", "a2", b"{}", ["a1", "a2"], [])  # a second aggregator of site a
    assert sites.accept(second, 1024) is SummaryVerdict.ACCEPTED
    assert sites.parts["a"][1].answered == ("a2",)
    [site_a] = [s for s in sites.results({}, "health", summarize, "o") if s.site == "a"]
    assert site_a.missing == ("a3", "gone")
    assert "b1" not in sites.reported_missing.get("a", set())


def test_answers_that_came_straight_to_the_origin_are_reduced_there() -> None:
    origin = engine("o")
    qid = start(origin, expected={"a0", "a1"})
    query = origin.query_message(qid)
    assert query is not None
    origin.on_site_summary(summary(origin, qid, answered=["a0"]), 0.1)
    origin.on_response(QueryResponse(query.ltime, query.id, "a1", health("critical", "disk")), 0.2)
    [r] = results(origin)
    assert not r.timed_out
    [site_a] = r.sites
    assert [p.source for p in site_a.parts] == ["a0", "o"]
    assert site_doc(site_a.parts, site_a.missing)["failing"] == [
        {"name": "a1", "status": "critical", "checks": ["disk"]}
    ]


def test_an_aggregated_query_needs_the_sites_and_a_known_kind() -> None:
    origin = engine("o")
    with pytest.raises(ConfigError, match="aggregate"):
        origin.originate("health", b"", QueryFilter(), 4.0, 0, {"a0"}, 0.0, "planet", SITE_OF)
    with pytest.raises(ConfigError, match="aggregate"):
        origin.originate("health", b"", QueryFilter(), 4.0, 0, {"a0"}, 0.0, AGGREGATE_SITE, None)


def test_a_query_from_an_older_sender_decodes_as_not_aggregated() -> None:
    # the `query_defaults` vector as sent before `aggregate` was appended (10 fields, not 11)
    old = bytes.fromhex(
        "9a0a01cedeadbeefa66865616c7468c400a467772d61af3139382e31382e312e313a373738389390a08000cb0000000000000000"
    )
    [msg] = wire.decode_body(wire.compound([old]))
    assert isinstance(msg, Query)
    assert msg.aggregate == ""
    assert wire.encode_message(msg) == old[:1].replace(b"\x9a", b"\x9b") + old[1:] + b"\xa0"


def test_an_answer_that_beats_its_query_to_the_aggregator_waits_for_it() -> None:
    origin = engine("o")
    qid = start(origin)
    query = origin.query_message(qid)
    assert query is not None
    ranked = pick_aggregators(query.id, query.ltime, A_NAMES)
    member = next(n for n in A_NAMES if n not in ranked)
    answer = Relay("o", addr("o"), QueryResponse(query.ltime, query.id, member, health("passing")), "site")
    aggregator = engine(ranked[0])
    assert aggregator.on_relay(answer, 0.001) == []  # held: the query has not arrived here yet
    action = aggregator.on_query(query, "a", {}, 0.002)
    aggregator.on_aggregated(action, "a", site_members("a"), 0.002)
    assert aggregator.release_early(query, 0.002) == []  # gathered, not forwarded
    assert aggregator._routes[(query.ltime, query.id)].gather.answers.keys() == {member}  # type: ignore[union-attr]
    # a node that never hears of the query passes the answer on after the hold
    other = engine(ranked[1])
    assert other.on_relay(answer, 0.0) == []
    assert other.get_timer() == pytest.approx(0.25)
    [out] = other.handle_timer(0.25)
    assert (out.addr, out.message) == (addr("o"), answer.response)
    # an ordinary relay (not for an aggregator) is never held
    plain = Relay("o", addr("o"), answer.response)
    [out] = engine("a3").on_relay(plain, 0.0)
    assert out.message == answer.response
