"""The query routes' pure pieces: answers shaped as documented and missing nodes named.

The routes themselves (GET /v1/health, POST /v1/query over a fake agent) are in
tests/integration/test_api_queries_http.py (they need a socket).
"""

from __future__ import annotations

import orjson

from meshd.api.queries import missing_nodes, response_json, result_json
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.query import QueryAnswer, QueryResult
from tests.fakes import member

PEOPLE = [
    member("n1", site="factory", role="gw"),
    member("n2", site="factory", role="db"),
    member("n4", MemberState.DEAD, site="shop", role="gw"),
    member("n5", MemberState.LEFT, site="shop", role="gw"),
]


def result(*answers: QueryAnswer, missing: tuple[str, ...] = ()) -> QueryResult:
    return QueryResult(7, "health", answers, missing, 42.25, bool(missing))


def test_missing_names_dead_matches_and_named_nodes_but_not_those_that_left() -> None:
    answered = result(QueryAnswer("n1", b"{}", 1.0), missing=("n2",))
    assert missing_nodes(answered, QueryFilter(), PEOPLE) == ["n2", "n4"]
    named = QueryFilter(nodes=["n1", "ghost", "n5"])
    assert missing_nodes(answered, named, PEOPLE) == ["ghost", "n2"]  # n4 is not named
    assert missing_nodes(answered, QueryFilter(site="factory"), PEOPLE) == ["n2"]


def test_answers_keep_their_fields_and_gain_name_site_and_time() -> None:
    doc = response_json("n1", orjson.dumps({"name": "spoof", "status": "passing"}), "factory", 1.26)
    assert doc == {"name": "n1", "site": "factory", "status": "passing", "elapsed_ms": 1.3}
    assert response_json("n2", b"\xffnot json", None, 2.0)["payload"] == "\ufffdnot json"


def test_health_results_sorted_by_site_then_name_with_unknown_status() -> None:
    doc = result_json(
        result(
            QueryAnswer("n2", b"not json", 2.0),
            QueryAnswer("n1", orjson.dumps({"status": "passing", "checks": []}), 1.0),
        ),
        QueryFilter(),
        PEOPLE,
        health=True,
    )
    assert [r["name"] for r in doc["responses"]] == ["n1", "n2"]
    assert doc["responses"][1]["status"] == "unknown"
    assert doc["responses"][1]["checks"] == []
    assert doc["missing"] == ["n4"]
    assert doc["elapsed_ms"] in (42.2, 42.3)
    assert doc["timed_out"] is False
