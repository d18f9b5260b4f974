"""The operator API over a fake agent, served on 127.0.0.1: fields, filters, auth, errors, SSE,
metrics, readiness."""

from __future__ import annotations

import asyncio
import base64

import orjson
import pytest
from aiohttp.test_utils import TestClient

from meshd.core.messages import MemberState
from meshd.metrics import TransferStats
from tests.fakes import AUTH, TOKEN, FakeAgent, FakeEvent, member
from tests.metrics_text import sample

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def make_agent() -> FakeAgent:
    return FakeAgent(
        transfer=TransferStats(10, 20, 3),
        uptime_s=12.5,
        ring=[KEY_A],
        counters={"drops.auth": 4, "msgs.in.ping": 9},
        people=[
            member(
                "n1",
                MemberState.ALIVE,
                node_id="11" * 16,
                addr="127.0.0.1:7788",
                incarnation=3,
                meta={"site": "factory", "tag:role": "gw", "health": "passing"},
            ),
            member(
                "n2",
                MemberState.SUSPECT,
                node_id="22" * 16,
                addr="127.0.0.1:7790",
                meta={"site": "factory", "tag:role": "db"},
            ),
            member(
                "n3",
                MemberState.DEAD,
                node_id="33" * 16,
                addr="127.0.0.1:7792",
                incarnation=0,
                meta={"site": "shop", "tag:role": "gw", "health": "weird"},
            ),
            member("n4", MemberState.LEFT, node_id="44" * 16, addr="127.0.0.1:7794", incarnation=2),
        ],
    )


@pytest.fixture
def agent() -> FakeAgent:
    return make_agent()


async def test_status_fields(client: TestClient) -> None:
    r = await client.get("/v1/status")
    assert r.status == 200
    doc = await r.json()
    for k in ("name", "id", "cluster", "site", "addr", "version", "uptime_s", "members", "transfer"):
        assert k in doc
    assert doc["members"] == {"alive": 1, "suspect": 1, "dead": 1, "left": 1}
    assert doc["transfer"] == {"sent_bytes": 10, "received_bytes": 20, "origin_bytes": 3}
    assert doc["uptime_s"] == 12.5
    assert doc["name"] == "n1"
    assert doc["cluster"] == "test"
    assert doc["site"] == "factory"
    assert doc["clock_skew"] == {"peers": 0, "max_offset_s": 0.0}


async def test_members_fields_and_filters(client: TestClient) -> None:
    doc = await (await client.get("/v1/members")).json()
    assert [m["name"] for m in doc["members"]] == ["n1", "n2", "n3", "n4"]
    n1 = doc["members"][0]
    assert set(n1) == {"name", "id", "addr", "site", "tags", "state", "incarnation", "health"}
    assert n1 == {
        "name": "n1",
        "id": "11" * 16,
        "addr": "127.0.0.1:7788",
        "site": "factory",
        "tags": {"role": "gw"},
        "state": "alive",
        "incarnation": 3,
        "health": "passing",
    }
    by_name = {m["name"]: m for m in doc["members"]}
    assert by_name["n2"]["health"] == "unknown"  # no health gossiped yet
    assert by_name["n3"]["health"] == "unknown"  # junk value shown as unknown
    assert by_name["n4"]["site"] == "default"

    async def names(query: str) -> list[str]:
        r = await client.get("/v1/members" + query)
        assert r.status == 200, await r.text()
        return [m["name"] for m in (await r.json())["members"]]

    assert await names("?state=alive") == ["n1"]
    assert await names("?state=dead,left") == ["n3", "n4"]
    assert await names("?site=factory") == ["n1", "n2"]
    assert await names("?tag=role=gw") == ["n1", "n3"]
    assert await names("?tag=role=gw&site=shop") == ["n3"]
    assert await names("?tag=role=gw&tag=role=db") == []

    r = await client.get("/v1/members?state=sleepy")
    assert r.status == 400
    err = await r.json()
    assert err["error"] == "bad_filter"
    assert "sleepy" in err["detail"]
    assert (await client.get("/v1/members?tag=role")).status == 400


async def test_changes_need_the_token(client: TestClient, agent: FakeAgent) -> None:
    body = orjson.dumps({"addrs": ["127.0.0.1:7790"]})
    r = await client.post("/v1/join", data=body)
    assert r.status == 401
    assert (await r.json())["error"] == "unauthorized"
    r = await client.post("/v1/join", data=body, headers={"Authorization": "Bearer nope"})
    assert r.status == 403
    r = await client.post("/v1/join", data=body, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status == 403
    assert agent.joined_with == []
    r = await client.post("/v1/join", data=body, headers=AUTH)
    assert r.status == 200
    assert await r.json() == {"joined": 1}
    assert agent.joined_with == [["127.0.0.1:7790"]]


async def test_join_validation(client: TestClient, agent: FakeAgent) -> None:
    r = await client.post("/v1/join", data=b"{not json", headers=AUTH)
    assert r.status == 400
    assert (await r.json())["error"] == "bad_json"
    for body in (b"[]", b'{"addrs": []}', b'{"addrs": "127.0.0.1:1"}', b'{"addrs": [1]}', b""):
        r = await client.post("/v1/join", data=body, headers=AUTH)
        assert r.status == 400, body
    r = await client.post("/v1/join", data=b'{"addrs": ["h:99999"]}', headers=AUTH)
    assert r.status == 400
    assert (await r.json())["error"] == "bad_address"
    r = await client.post("/v1/join", data=b'{"addrs": ["seed.example"]}', headers=AUTH)
    assert r.status == 200
    assert agent.joined_with[-1] == ["seed.example:7788"]
    agent.join_result = 0
    r = await client.post("/v1/join", data=b'{"addrs": ["127.0.0.1:9"]}', headers=AUTH)
    assert r.status == 502
    assert (await r.json())["error"] == "join_failed"


async def test_body_is_bounded(client: TestClient) -> None:
    r = await client.post("/v1/join", data=b"x" * (1024 * 1024), headers=AUTH)
    assert r.status == 413
    doc = await r.json()
    assert "error" in doc
    assert "detail" in doc


async def test_leave(client: TestClient, agent: FakeAgent) -> None:
    assert (await client.post("/v1/leave")).status == 401
    r = await client.post("/v1/leave", headers=AUTH)
    assert r.status == 200
    assert agent.leave_requested == 1


async def test_reload_needs_the_token_and_answers_its_outcome(client: TestClient, agent: FakeAgent) -> None:
    assert (await client.post("/v1/reload")).status == 401
    assert agent.reloads == 0
    r = await client.post("/v1/reload", headers=AUTH)
    assert r.status == 200
    assert await r.json() == {"ok": True, "applied": ["tags"], "restart_needed": [], "error": None}
    agent.reload_outcome = {"ok": False, "applied": [], "restart_needed": [], "error": "meshd.toml: bad"}
    r = await client.post("/v1/reload", headers=AUTH)
    assert r.status == 409
    assert await r.json() == {"error": "reload_failed", "detail": "meshd.toml: bad"}
    assert agent.reloads == 2


async def test_keys(client: TestClient, agent: FakeAgent) -> None:
    doc = await (await client.get("/v1/keys")).json()
    assert doc == {
        "keys": [{"id": KEY_A[:4].hex(), "primary": True}],
        "primary": KEY_A[:4].hex(),
        "insecure": False,
    }
    b64 = base64.b64encode(KEY_B).decode()
    assert (await client.post("/v1/keys", json={"op": "install", "key": b64})).status == 401
    r = await client.post("/v1/keys", json={"op": "install", "key": b64}, headers=AUTH)
    assert r.status == 200
    assert len((await r.json())["keys"]) == 2
    r = await client.post("/v1/keys", json={"op": "use", "key": b64}, headers=AUTH)
    assert (await r.json())["primary"] == KEY_B[:4].hex()
    r = await client.post("/v1/keys", json={"op": "remove", "key": b64}, headers=AUTH)
    assert r.status == 409
    assert (await r.json())["error"] == "key_state"
    for body in (
        {"op": "rotate", "key": b64},
        {"op": "use"},
        {"op": "use", "key": "!!"},
        {"op": "use", "key": base64.b64encode(b"short").decode()},
    ):
        r = await client.post("/v1/keys", json=body, headers=AUTH)
        assert r.status == 400, body
    agent.ring = None
    assert (await (await client.get("/v1/keys")).json())["insecure"] is True
    r = await client.post("/v1/keys", json={"op": "install", "key": b64}, headers=AUTH)
    assert r.status == 409


async def test_health_and_readiness(client: TestClient, agent: FakeAgent) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    agent.ready = False
    r = await client.get("/readyz")
    assert r.status == 503
    assert (await r.json())["ready"] is False


async def test_metrics(client: TestClient) -> None:
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await r.text()
    assert "# TYPE meshd_members gauge" in text
    assert sample(text, "meshd_members", state="alive") == 1
    assert sample(text, "meshd_drops_auth_total") == 4
    assert sample(text, "meshd_msgs_in_ping_total") == 9


async def test_events_stream(client: TestClient, agent: FakeAgent) -> None:
    r = await client.get("/v1/events")
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/event-stream"
    for _ in range(100):
        if agent.subs:
            break
        await asyncio.sleep(0.01)
    agent.subs[0].queue.put_nowait(FakeEvent("dead", agent.people[2]))
    buf = b""
    while b"event: member" not in buf or b"\n\n" not in buf[buf.index(b"event: member") :]:
        buf += await asyncio.wait_for(r.content.readany(), 5)
    block = buf[buf.index(b"event: member") :].split(b"\n\n")[0]
    data = block.split(b"data: ", 1)[1]
    doc = orjson.loads(data)
    assert doc["kind"] == "dead"
    assert doc["member"]["name"] == "n3"
    assert doc["member"]["state"] == "dead"
    r.close()


async def test_errors_are_json(client: TestClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status == 404
    doc = await r.json()
    assert doc["error"] == "not_found"
    r = await client.put("/v1/status", headers=AUTH)
    assert r.status == 405
    assert "error" in await r.json()


async def test_dashboard(client: TestClient) -> None:
    r = await client.get("/")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert "Content-Security-Policy" in r.headers
    assert "meshd" in await r.text()


async def test_dashboard_files_are_served_from_a_fixed_list(client: TestClient) -> None:
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        r = await client.get(f"/static/{name}")
        assert r.status == 200, name
        assert r.headers["Content-Type"].startswith(kind)
        assert len(await r.read()) > 100
    for name in ("index.html", "..%2Fapp.py", "nope.js"):
        r = await client.get(f"/static/{name}")
        assert r.status == 404, name
        assert (await r.json())["error"] == "not_found"


async def test_rollout_per_site(client: TestClient, agent: FakeAgent) -> None:
    agent.people[0].meta["rel:fw"] = "1.0 aaaaaaaaaaaaaaaa 4/4 #1 current"
    agent.people[2].meta["rel:fw"] = "1.0 aaaaaaaaaaaaaaaa 1/4 #1"  # n3 is dead
    r = await client.get("/v1/rollout")
    assert r.status == 200
    (row,) = (await r.json())["releases"]
    assert (row["name"], row["version"], row["id"], row["percent"]) == ("fw", "1.0", "a" * 16, 100.0)
    assert row["sites"]["factory"]["complete"] == 1
    assert row["sites"]["factory"]["current"] == 1
    assert row["sites"]["shop"]["down"] == ["n3"]
    assert row["sites"]["shop"]["percent"] == 0.0
