"""The aggregated health query over 300 simulated nodes in 30 sites: one summary per site reaches
the asker within 2 s of virtual time, dead and silent nodes named missing in their own site."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from meshd.core.aggregate import AGGREGATE_SITE, pick_aggregators
from meshd.core.config import LAN
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.node import Node
from meshd.core.query import QueryAction, QueryResult
from meshd.health.spec import HEALTH_QUERY
from meshd.health.summary import site_doc, summarize
from meshd.net.memory import MemoryNetwork
from meshd.sim_summary import run_site_summary
from meshd.wire import Codec
from tests.cluster import alive_names, state_of

pytestmark = pytest.mark.sim
N = 300
SITES = 30


def site_of(i: int) -> str:
    return f"s{i % SITES}"


def sited_cluster(seed: int) -> tuple[MemoryNetwork, list[Node]]:
    net = MemoryNetwork(seed=seed)
    net.record_events = False
    net.reducer = summarize
    codec = Codec("test", None)
    nodes = [net.add_node(f"n{i}", LAN, codec, meta={"site": site_of(i)}) for i in range(N)]
    for node in nodes[1:]:
        node.join([nodes[0].addr], net.now)
        net.poke(node)
    names = {x.name for x in nodes}
    assert net.run_until_true(lambda: all(alive_names(x) == names for x in nodes), 120.0, step=0.5)
    return net, nodes


def health(node: Node, action: QueryAction) -> bytes:
    # every 7th node has a failing disk check, the rest pass
    bad = int(node.name[1:]) % 7 == 0
    status = "critical" if bad else "passing"
    return orjson.dumps({"status": status, "checks": [{"name": "disk", "status": status}]})


def by_site(result: QueryResult) -> dict[str, dict[str, Any]]:
    return {s.site: site_doc(s.parts, s.missing) for s in result.sites}


def test_one_summary_per_site_within_two_seconds_with_dead_and_slow_nodes() -> None:
    net, nodes = sited_cluster(seed=31)
    net.query_handler = health
    dead = [nodes[11], nodes[42], nodes[250]]
    for n in dead:
        net.kill(n)
    alive = [n for n in nodes if n not in dead]
    gone = {n.name for n in dead}
    assert net.run_until_true(
        lambda: all(state_of(x, d) == MemberState.DEAD for x in alive for d in gone), 60.0, step=0.5
    )
    slow = {nodes[5].name, nodes[77].name, nodes[123].name}
    net.answer_delay = lambda node: 0.5 if node.name in slow else 0.0
    run = run_site_summary(net, nodes[3], timeout=4.0)
    r = run.result
    assert not r.timed_out
    assert run.summary_s < 2.0
    assert len(r.sites) == SITES
    assert all(p.elapsed_ms < 2000 for s in r.sites for p in s.parts)
    # about one message per site: the summaries, and a few more where views differed
    assert run.messages_to_asker <= SITES + 3
    docs = by_site(r)
    for i, node in enumerate(nodes):
        doc = docs[site_of(i)]
        if node.name in gone:
            assert node.name in doc["missing"]
    for site, doc in docs.items():
        members = [i for i in range(N) if site_of(i) == site]
        want_bad = {f"n{i}" for i in members if i % 7 == 0} - gone
        assert {f["name"] for f in doc["failing"]} == want_bad
        assert doc["critical"] == len(want_bad)
        assert doc["passing"] == len(members) - len(want_bad) - len(gone & {f"n{i}" for i in members})
        assert doc["nodes"] == len(members)
    assert set(r.missing) == gone  # the slow ones answered inside the gather window


def test_fresh_kills_are_missing_and_a_dead_aggregator_costs_time_not_its_site() -> None:
    net, nodes = sited_cluster(seed=32)
    net.query_handler = health
    origin = nodes[0]
    qid = origin.ask(HEALTH_QUERY, b"", QueryFilter(), 4.0, 0, net.now, aggregate=AGGREGATE_SITE)
    query = origin.queries.query_message(qid)
    assert query is not None
    sites: dict[str, list[Node]] = {}
    for i, n in enumerate(nodes):
        sites.setdefault(site_of(i), []).append(n)
    ranked = {
        s: pick_aggregators(qid, query.ltime, [m.name for m in members]) for s, members in sites.items()
    }
    # Killed before anything is delivered: nobody knows yet, they are silent.
    victims = [next(m for m in sites[s] if m.name not in ranked[s] and m is not origin) for s in ("s1", "s2")]
    no_primary, no_aggregators = "s5", "s6"  # the primary dies; both the primary and its backup die
    primary = next(m for m in sites[no_primary] if m.name == ranked[no_primary][0])
    pair = [m for m in sites[no_aggregators] if m.name in ranked[no_aggregators]]
    for n in [*victims, primary, *pair]:
        net.kill(n)
    net.poke(origin)
    assert net.run_until_true(
        lambda: any(name == origin.name and r.id == qid for name, r in net.query_results), 6.0, step=0.05
    )
    r = next(r for name, r in net.query_results if name == origin.name and r.id == qid)
    assert r.timed_out  # one site never sent a summary
    docs = by_site(r)
    for v, s in zip(victims, ("s1", "s2"), strict=True):
        assert docs[s]["missing"] == [v.name]
        assert docs[s]["nodes"] == N // SITES
    # The backup spoke up after 55% of the timeout: only the dead primary is missing.
    assert docs[no_primary]["missing"] == [primary.name]
    assert docs[no_primary]["nodes"] == N // SITES
    [part] = next(s for s in r.sites if s.site == no_primary).parts
    assert part.source == ranked[no_primary][1]
    assert 2200 <= part.elapsed_ms < 2600
    # Both died: the whole site shows missing, none of it as passing.
    assert docs[no_aggregators]["passing"] == 0
    assert set(docs[no_aggregators]["missing"]) == {m.name for m in sites[no_aggregators]}
    # Every other site's summary arrived inside its gather window (40% of 4 s), and then some.
    on_time = [p.elapsed_ms for s in r.sites if s.site not in (no_primary, no_aggregators) for p in s.parts]
    assert len(on_time) >= SITES - 2
    assert max(on_time) < 2000


def test_a_node_that_joined_after_a_death_still_sees_the_dead_node_missing() -> None:
    # Push-pull does not hand a newcomer the dead members (memberlist ignores a dead record for
    # a name it does not know), so only the dead node's site can still name it.
    net, nodes = sited_cluster(seed=33)
    victim = nodes[40]
    net.kill(victim)
    alive = [n for n in nodes if n is not victim]
    assert net.run_until_true(
        lambda: all(state_of(x, victim.name) == MemberState.DEAD for x in alive), 60.0, step=0.5
    )
    late = net.add_node("late", LAN, Codec("test", None), meta={"site": site_of(7)})
    late.join([nodes[1].addr], net.now)
    net.poke(late)
    names = {x.name for x in alive} | {"late"}
    assert net.run_until_true(lambda: alive_names(late) == names, 30.0, step=0.5)
    assert late.member(victim.name) is None  # the case under test: the asker never heard of it
    run = run_site_summary(net, late, timeout=4.0)
    assert not run.result.timed_out
    [site] = [s for s in run.result.sites if s.site == site_of(40)]
    assert site.missing == (victim.name,)
    assert run.result.missing == (victim.name,)
