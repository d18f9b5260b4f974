"""GET /v1/health and POST /v1/query over a fake agent: filters and durations parsed, answers
shaped as documented, missing nodes named, errors and limits, the token for /v1/query."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshd.api.app import create_api_app
from meshd.api.queries import IN_FLIGHT, MAX_API_QUERIES, MAX_CLIENT_QUERIES
from meshd.core.aggregate import SitePart, SiteResult
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.query import QueryAnswer
from meshd.errors import ConfigError, StateError
from meshd.health.summary import summarize
from tests.fakes import AUTH, FakeAgent, member
from tests.metrics_text import sample


def health(name: str, site: str, status: str) -> bytes:
    checks = [{"name": "disk", "kind": "disk", "status": status, "output": "x", "updated": 1.0}]
    return orjson.dumps({"name": name, "site": site, "status": status, "checks": checks})


def make_agent() -> FakeAgent:
    return FakeAgent(
        join_result=0,
        people=[
            member("n1", site="factory", role="gw"),
            member("n2", site="factory", role="db"),
            member("n3", site="shop", role="gw"),
            member("n4", MemberState.DEAD, site="shop", role="gw"),
            member("n5", MemberState.LEFT, site="shop", role="gw"),
        ],
    )


@pytest.fixture
def agent() -> FakeAgent:
    return make_agent()


async def test_health_answers_grouped_with_missing_nodes(client: TestClient, agent: FakeAgent) -> None:
    agent.answers = [
        QueryAnswer("n3", health("n3", "shop", "critical"), 3.0),
        QueryAnswer("n1", health("n1", "factory", "passing"), 1.5),
        QueryAnswer("n2", b"not json", 2.0),
    ]
    resp = await client.get("/v1/health")  # open: no token
    assert resp.status == 200
    doc = await resp.json()
    assert [r["name"] for r in doc["responses"]] == ["n1", "n2", "n3"]  # by site, then name
    _, n2, n3 = doc["responses"]
    assert n3 == {
        "name": "n3",
        "site": "shop",
        "status": "critical",
        "elapsed_ms": 3.0,
        "checks": [{"name": "disk", "kind": "disk", "status": "critical", "output": "x", "updated": 1.0}],
    }
    # An unreadable answer still names the node; its status is unknown, its site from members.
    assert n2["status"] == "unknown"
    assert n2["checks"] == []
    assert n2["site"] == "factory"
    assert n2["payload"] == "not json"
    # n4 is dead and matches (no filter): named missing; n5 left on purpose: not missing.
    assert doc["missing"] == ["n4"]
    assert doc["elapsed_ms"] == 42.2 or doc["elapsed_ms"] == 42.3
    assert doc["timed_out"] is False
    name, payload, filters, timeout, relay = agent.asked[0]
    assert (name, payload, filters, timeout, relay) == ("health", b"", QueryFilter(), None, 0)


async def test_health_filters_and_durations(client: TestClient, agent: FakeAgent) -> None:
    agent.missing = ("n3",)
    url = (
        "/v1/health?site=shop&node=n3,n4&node=ghost&tag=role=gw&tag=rack=re:r[0-9]&timeout=250ms"
        "&relay_factor=2"
    )
    resp = await client.get(url)
    # Every matching node runs a regular expression: only an operator with the token sends one.
    assert resp.status == 401
    assert agent.asked == []
    resp = await client.get(url, headers=AUTH)
    assert resp.status == 200
    doc = await resp.json()
    _, _, filters, timeout, relay = agent.asked[0]
    assert filters == QueryFilter(
        nodes=["n3", "n4", "ghost"], site="shop", tags={"role": "gw", "rack": "re:r[0-9]"}
    )
    assert timeout == 0.25
    assert relay == 2
    # n3 did not answer; n4 is dead (filter: role=gw lacks rack, so only named); ghost named.
    assert doc["missing"] == ["ghost", "n3", "n4"]
    assert doc["timed_out"] is True
    resp = await client.get("/v1/health?timeout=3")
    assert resp.status == 200
    assert agent.asked[-1][3] == 3.0


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("timeout=soon", "bad_timeout"),
        ("timeout=0s", "bad_timeout"),
        ("timeout=-1", "bad_timeout"),
        ("tag=role", "bad_filter"),
        ("tag==x", "bad_filter"),
        ("tag=a=1&tag=a=2", "bad_filter"),
        ("relay_factor=x", "bad_request"),
        ("relay_factor=%C2%B2", "bad_request"),  # "²": isdigit() but not int()
    ],
)
async def test_health_bad_requests(client: TestClient, agent: FakeAgent, query: str, error: str) -> None:
    resp = await client.get("/v1/health?" + query)
    assert resp.status == 400
    assert (await resp.json())["error"] == error
    assert agent.asked == []


async def test_core_refusals_map_to_400_and_503(client: TestClient, agent: FakeAgent) -> None:
    agent.raises = ConfigError("filters.site: bad regular expression: x")
    resp = await client.get("/v1/health?site=re:(", headers=AUTH)
    assert resp.status == 400
    assert await resp.json() == {"error": "bad_query", "detail": "filters.site: bad regular expression: x"}
    agent.raises = StateError("64 queries already in flight")
    resp = await client.get("/v1/health")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"] == "busy"


def _from(address: str) -> aiohttp.ClientSession:
    """A client session whose connections come from `address` (another loopback address)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(300):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_too_many_waiting_queries_get_429(client: TestClient, agent: FakeAgent) -> None:
    # MAX_API_QUERIES in all, from enough clients that none reaches its own limit.
    agent.gate = asyncio.Event()
    app = client.app
    assert app is not None
    url = str(client.make_url("/v1/health"))
    sessions = [_from(f"127.0.0.{i + 2}") for i in range(MAX_API_QUERIES // MAX_CLIENT_QUERIES)]
    try:
        waiting = [asyncio.ensure_future(s.get(url)) for s in sessions for _ in range(MAX_CLIENT_QUERIES)]
        await _until(lambda: app[IN_FLIGHT].count == MAX_API_QUERIES)
        resp = await client.get("/v1/health")  # 127.0.0.1: no query of its own yet
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert await resp.json() == {
            "error": "too_many_queries",
            "detail": f"{MAX_API_QUERIES} queries already waiting here",
        }
        agent.gate.set()
        for fut in waiting:
            assert (await fut).status == 200
    finally:
        for s in sessions:
            await s.close()
    assert app[IN_FLIGHT].count == 0
    metrics = await (await client.get("/metrics")).text()
    assert sample(metrics, "meshd_api_refused_total", reason="queries_total") == 1


async def test_one_client_holds_at_most_its_share_of_queries(client: TestClient, agent: FakeAgent) -> None:
    agent.gate = asyncio.Event()
    app = client.app
    assert app is not None
    waiting = [asyncio.ensure_future(client.get("/v1/health")) for _ in range(MAX_CLIENT_QUERIES)]
    await _until(lambda: app[IN_FLIGHT].count == MAX_CLIENT_QUERIES)
    resp = await asyncio.wait_for(client.get("/v1/health"), 5)  # refused at once, not queued
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"] == "too_many_queries"
    resp = await client.post("/v1/query", json={"name": "uptime"}, headers=AUTH)
    assert resp.status == 429  # the limit covers both long routes
    async with _from("127.0.0.2") as other:  # another client still gets its queries run
        fut = asyncio.ensure_future(other.get(str(client.make_url("/v1/health"))))
        await _until(lambda: app[IN_FLIGHT].count == MAX_CLIENT_QUERIES + 1)
        agent.gate.set()
        assert (await fut).status == 200
    for w in waiting:
        assert (await w).status == 200
    assert app[IN_FLIGHT].count == 0
    assert app[IN_FLIGHT].by_client == {}
    metrics = await (await client.get("/metrics")).text()
    assert sample(metrics, "meshd_api_refused_total", reason="queries_per_client") == 2


async def test_query_needs_the_token(client: TestClient, agent: FakeAgent) -> None:
    resp = await client.post("/v1/query", json={"name": "uptime"})
    assert resp.status == 401
    resp = await client.post("/v1/query", json={"name": "uptime"}, headers={"Authorization": "Bearer wrong"})
    assert resp.status == 403
    assert agent.asked == []


async def test_query_answers_and_body(client: TestClient, agent: FakeAgent) -> None:
    agent.answers = [
        QueryAnswer(
            "n1",
            orjson.dumps({"handler": "uptime", "exit_code": 0, "output": "up 3 days\n", "truncated": False}),
            4.0,
        ),
        QueryAnswer(
            "n3",
            orjson.dumps({"error": "no handler", "detail": "no handler for 'uptime'", "handlers": []}),
            5.0,
        ),
    ]
    body = {
        "name": "uptime",
        "payload": "-p",
        "site": "re:.*",
        "nodes": ["n1", "n3"],
        "tags": {"role": "gw"},
        "timeout": "2s",
        "relay_factor": 1,
    }
    resp = await client.post("/v1/query", json=body, headers=AUTH)
    assert resp.status == 200
    doc = await resp.json()
    assert agent.asked[0] == ("uptime", b"-p", QueryFilter(["n1", "n3"], "re:.*", {"role": "gw"}), 2.0, 1)
    assert doc["responses"] == [
        {
            "name": "n1",
            "site": "factory",
            "handler": "uptime",
            "exit_code": 0,
            "output": "up 3 days\n",
            "truncated": False,
            "elapsed_ms": 4.0,
        },
        {
            "name": "n3",
            "site": "shop",
            "error": "no handler",
            "detail": "no handler for 'uptime'",
            "handlers": [],
            "elapsed_ms": 5.0,
        },
    ]
    assert doc["missing"] == []
    # tags as a list of k=v, nodes as a comma string, payload absent
    resp = await client.post(
        "/v1/query", json={"name": "x", "nodes": "n1,n2", "tags": ["a=1", "b=2"]}, headers=AUTH
    )
    assert resp.status == 200
    assert agent.asked[-1] == ("x", b"", QueryFilter(["n1", "n2"], "", {"a": "1", "b": "2"}), None, 0)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": 3},
        {"name": "x", "payload": 5},
        {"name": "x", "nodes": {"a": 1}},
        {"name": "x", "tags": 7},
        {"name": "x", "tags": {"a": 1}},
        {"name": "x", "timeout": "forever"},
        {"name": "x", "relay_factor": -1},
        {"name": "x", "relay_factor": True},
        {"name": "x", "site": 5},
    ],
)
async def test_query_bad_bodies(client: TestClient, agent: FakeAgent, body: dict[str, Any]) -> None:
    resp = await client.post("/v1/query", json=body, headers=AUTH)
    assert resp.status == 400
    assert agent.asked == []


async def test_agent_without_queries_gets_501() -> None:
    @dataclass
    class NoQueries(FakeAgent):
        run_query = None  # type: ignore[assignment]

    async with TestClient(TestServer(create_api_app(NoQueries(people=make_agent().people)))) as c:
        resp = await c.get("/v1/health")
        assert resp.status == 501


async def test_health_summary_by_site(client: TestClient, agent: FakeAgent) -> None:
    shop = SitePart("n3", summarize("health", [("n3", health("n3", "shop", "critical"))]), ("n3",))
    agent.sites = (SiteResult("shop", (shop,), ()),)
    resp = await client.get("/v1/health?summary=site&site=shop")  # open: no token
    assert resp.status == 200
    doc = await resp.json()
    assert doc == {
        "sites": {
            "shop": {
                "nodes": 2,
                "passing": 0,
                "warning": 0,
                "critical": 1,
                "missing": ["n4"],  # dead in this node's view; n5 left on purpose
                "failing": [{"name": "n3", "status": "critical", "checks": ["disk"]}],
            }
        },
        "elapsed_ms": 42.2 if doc["elapsed_ms"] == 42.2 else 42.3,
        "timed_out": False,
    }
    assert agent.aggregates == ["site"]
    assert agent.asked[0][2] == QueryFilter(site="shop")
    resp = await client.get("/v1/health?summary=node")
    assert resp.status == 400
    assert "summary" in (await resp.json())["detail"]
