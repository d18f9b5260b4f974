"""The aggregated health query in the simulator: `run_site_summary` for `python -m meshd.sim`.

    run = run_site_summary(net, asker, timeout=4.0)
    run.summary_s            virtual seconds from asking until every site's summary is in
                             (the timeout when some never came: run.result.timed_out)
    run.messages_to_asker    query answers the asker received meanwhile: site summaries, plus
                             direct answers and relays (when views differed); about one per site
    run.result               the QueryResult, with .sites

Every node in the network gets the health reducer (meshd.health.summary.summarize), and nodes
answer with a passing health document unless the network already has a query handler.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from meshd.core.aggregate import AGGREGATE_SITE
from meshd.core.messages import QueryFilter
from meshd.core.node import Node
from meshd.core.query import QueryAction, QueryResult
from meshd.health.spec import HEALTH_QUERY
from meshd.health.summary import summarize
from meshd.net.memory import MemoryNetwork

# Messages that carry answers to the asker (counted by the node as msgs.in.<type>).
ANSWER_COUNTERS = ("msgs.in.sitesummary", "msgs.in.queryresponse", "msgs.in.relay")
PASSING = orjson.dumps({"status": "passing", "checks": []})


@dataclass(frozen=True)
class SummaryRun:
    summary_s: float
    messages_to_asker: int
    result: QueryResult


def passing_health(node: Node, action: QueryAction) -> bytes:
    """A node whose every check passes (the simulator's default answer)."""
    return PASSING


def _answers_in(node: Node) -> int:
    counters = node.stats().counters
    return sum(counters.get(k, 0) for k in ANSWER_COUNTERS)


def run_site_summary(
    net: MemoryNetwork, asker: Node, timeout: float, filters: QueryFilter | None = None
) -> SummaryRun:
    """Ask `GET /v1/health?summary=site`'s query at `asker` and run the network until it ends."""
    for node in net.nodes.values():
        node.queries.reducer = summarize
    net.reducer = summarize
    if net.query_handler is None:
        net.query_handler = passing_health
    before = _answers_in(asker)
    t0 = net.now
    qid = asker.ask(
        HEALTH_QUERY, b"", filters or QueryFilter(), timeout, 0, net.now, aggregate=AGGREGATE_SITE
    )
    net.poke(asker)

    def result() -> QueryResult | None:
        for name, r in reversed(net.query_results):
            if name == asker.name and r.id == qid:
                return r
        return None

    if not net.run_until_true(lambda: result() is not None, timeout + 1.0, step=0.01):
        raise RuntimeError("the aggregated query never finished (the asker is down?)")
    done = result()
    assert done is not None
    return SummaryRun(
        done.elapsed_ms / 1000.0 if done.elapsed_ms else net.now - t0, _answers_in(asker) - before, done
    )
