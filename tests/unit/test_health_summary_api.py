"""`GET /v1/health?summary=site`'s document (summary_json, over a QueryResult with sites) and
`meshctl health --summary` over a fake API client: table per site, failing and missing nodes,
exit 2 when a node is critical or missing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from meshd.api.queries import summary_json
from meshd.cli import meshctl, meshctl_health
from meshd.core.aggregate import SitePart, SiteResult
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.query import QueryResult
from meshd.health.summary import summarize
from tests.fakes import member

PEOPLE = [
    member("n1", site="factory"),
    member("n2", site="factory"),
    member("n3", site="shop"),
    member("n4", MemberState.DEAD, site="shop"),
    member("n5", MemberState.LEFT, site="shop"),
]


def health(status: str, *checks: str) -> bytes:
    return orjson.dumps({"status": status, "checks": [{"name": c, "status": status} for c in checks]})


def result(timed_out: bool = False) -> QueryResult:
    factory = SitePart(
        "n1",
        summarize("health", [("n1", health("passing")), ("n2", health("warning", "load"))]),
        ("n1", "n2"),
    )
    shop = SitePart("n3", summarize("health", [("n3", health("critical", "disk"))]), ("n3",))
    sites = (SiteResult("factory", (factory,), ()), SiteResult("shop", (shop,), ()))
    return QueryResult(7, "health", (), (), 12.5, timed_out, sites)


def test_summary_document_counts_per_site_and_names_what_the_node_knows_is_down() -> None:
    doc = summary_json(result(), QueryFilter(), PEOPLE)
    assert doc == {
        "sites": {
            "factory": {
                "nodes": 2,
                "passing": 1,
                "warning": 1,
                "critical": 0,
                "missing": [],
                "failing": [{"name": "n2", "status": "warning", "checks": ["load"]}],
            },
            "shop": {
                "nodes": 2,  # n3 answered, n4 is dead here; n5 left on purpose: not counted
                "passing": 0,
                "warning": 0,
                "critical": 1,
                "missing": ["n4"],
                "failing": [{"name": "n3", "status": "critical", "checks": ["disk"]}],
            },
        },
        "elapsed_ms": 12.5,
        "timed_out": False,
    }
    # filters apply to the nodes known to be down too
    assert (
        "shop"
        not in summary_json(
            QueryResult(7, "health", (), (), 1.0, False, result().sites[:1]),
            QueryFilter(site="factory"),
            PEOPLE,
        )["sites"]
    )


class FakeClient:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.timeout = 5.0
        self.asked: list[tuple[str, list[tuple[str, str]] | None]] = []

    def get(self, path: str, query: list[tuple[str, str]] | None = None) -> Any:
        self.asked.append((path, query))
        return self.doc

    def post(self, path: str, body: Any = None, timeout: float | None = None) -> Any:
        raise AssertionError("no POST here")


def run(doc: dict[str, Any], *argv: str) -> tuple[int, FakeClient]:
    client = FakeClient(doc)
    args = meshctl.build_parser().parse_args(["health", *argv])
    args.json = getattr(args, "json", False)  # as meshctl.main does
    return meshctl_health.cmd_health(client, args), client


def test_meshctl_health_summary_prints_a_row_per_site_then_the_bad_nodes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = summary_json(result(), QueryFilter(), PEOPLE)
    code, client = run(doc, "--summary", "--site", "shop")
    assert code == 2  # n3 is critical, n4 missing
    assert client.asked == [("/v1/health", [("site", "shop"), ("summary", "site")])]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SITE", "NODES", "PASSING", "WARNING", "CRITICAL", "MISSING"]
    assert lines[1].split() == ["factory", "2", "1", "1", "0", "0"]
    assert lines[2].split() == ["shop", "2", "0", "0", "1", "1"]
    assert ["shop", "n3", "critical", "disk"] in [ln.split() for ln in lines]
    assert ["shop", "n4", "missing", "did", "not", "answer"] in [ln.split() for ln in lines]
    assert (
        lines[-1]
        == "4 node(s) in 2 site(s): 1 passing, 1 warning, 1 critical, 1 missing (every site in 12 ms)"
    )


def test_meshctl_health_summary_exits_0_when_only_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    doc = summary_json(result(), QueryFilter(site="factory"), PEOPLE)
    doc["sites"].pop("shop")
    code, _ = run(doc, "--summary", "--json")
    assert code == 0
    assert orjson.loads(capsys.readouterr().out) == doc
