"""The operator API over a fake agent: fields, filters, auth, errors, SSE, metrics, readiness."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshd.api.app import create_api_app
from meshd.core.messages import MemberState
from meshd.errors import StateError
from meshd.metrics import Exposition, TransferStats, counter_name

TOKEN = "s3cret-token-value-0123456789"
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


@dataclass(frozen=True)
class FakeMember:
    name: str
    node_id: str
    addr: str
    state: MemberState
    incarnation: int
    meta: dict[str, str]


@dataclass(frozen=True)
class FakeEvent:
    kind: str
    member: FakeMember


class FakeSubscription:
    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.queue: asyncio.Queue[FakeEvent] = asyncio.Queue()

    async def get(self) -> FakeEvent:
        return await self.queue.get()

    def close(self) -> None:
        self.agent.subs.remove(self)


@dataclass
class FakeAgent:
    name: str = "n1"
    node_id: str = "ab" * 16
    cluster: str = "test"
    site: str = "factory"
    addr: str = "127.0.0.1:7788"
    addr_source: str = "bind address"
    api_token: str = TOKEN
    transfer: TransferStats = field(default_factory=lambda: TransferStats(10, 20, 3))
    ready: bool = True
    joined_with: list[list[str]] = field(default_factory=list)
    join_result: int = 1
    leave_requested: int = 0
    ring: list[bytes] | None = field(default_factory=lambda: [KEY_A])
    subs: list[FakeSubscription] = field(default_factory=list)
    people: list[FakeMember] = field(
        default_factory=lambda: [
            FakeMember("n1", "11" * 16, "127.0.0.1:7788", MemberState.ALIVE, 3,
                       {"site": "factory", "tag:role": "gw", "health": "passing"}),
            FakeMember("n2", "22" * 16, "127.0.0.1:7790", MemberState.SUSPECT, 1,
                       {"site": "factory", "tag:role": "db"}),
            FakeMember("n3", "33" * 16, "127.0.0.1:7792", MemberState.DEAD, 0,
                       {"site": "shop", "tag:role": "gw", "health": "weird"}),
            FakeMember("n4", "44" * 16, "127.0.0.1:7794", MemberState.LEFT, 2, {}),
        ]
    )

    def uptime(self) -> float:
        return 12.5

    def is_ready(self) -> bool:
        return self.ready

    def readiness_detail(self) -> str:
        return "joined" if self.ready else "joining"

    def members(self) -> list[FakeMember]:
        return self.people

    def subscribe(self) -> FakeSubscription:
        sub = FakeSubscription(self)
        self.subs.append(sub)
        return sub

    async def join(self, addrs: list[str]) -> int:
        self.joined_with.append(addrs)
        return self.join_result

    def request_leave(self) -> None:
        self.leave_requested += 1

    def keys(self) -> tuple[list[str], str] | None:
        if self.ring is None:
            return None
        return [k[:4].hex() for k in self.ring], self.ring[0][:4].hex()

    def key_op(self, op: str, key: bytes) -> None:
        assert self.ring is not None
        if op == "install":
            self.ring.append(key)
        elif op == "use":
            if key not in self.ring:
                raise StateError("not installed")
            self.ring.remove(key)
            self.ring.insert(0, key)
        elif op == "remove":
            if key == self.ring[0]:
                raise StateError("primary")
            self.ring.remove(key)

    def collect_metrics(self, out: Exposition) -> None:
        out.labelled("meshd_members", "gauge", "members by state",
                     [({"state": "alive"}, 1), ({"state": "dead"}, 1)])
        out.core_counters({"drops.auth": 4, "msgs.in.ping": 9})


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
async def client(agent: FakeAgent) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_api_app(agent))) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_status_fields(client: TestClient) -> None:
    r = await client.get("/v1/status")
    assert r.status == 200
    doc = await r.json()
    for k in ("name", "id", "cluster", "site", "addr", "version", "uptime_s", "members",
              "transfer"):
        assert k in doc
    assert doc["members"] == {"alive": 1, "suspect": 1, "dead": 1, "left": 1}
    assert doc["transfer"] == {"sent_bytes": 10, "received_bytes": 20, "origin_bytes": 3}
    assert doc["uptime_s"] == 12.5
    assert doc["name"] == "n1" and doc["cluster"] == "test" and doc["site"] == "factory"


async def test_members_fields_and_filters(client: TestClient) -> None:
    doc = await (await client.get("/v1/members")).json()
    assert [m["name"] for m in doc["members"]] == ["n1", "n2", "n3", "n4"]
    n1 = doc["members"][0]
    assert set(n1) == {"name", "id", "addr", "site", "tags", "state", "incarnation", "health"}
    assert n1 == {"name": "n1", "id": "11" * 16, "addr": "127.0.0.1:7788", "site": "factory",
                  "tags": {"role": "gw"}, "state": "alive", "incarnation": 3,
                  "health": "passing"}
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
    assert err["error"] == "bad_filter" and "sleepy" in err["detail"]
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
    assert "error" in doc and "detail" in doc


async def test_leave(client: TestClient, agent: FakeAgent) -> None:
    assert (await client.post("/v1/leave")).status == 401
    r = await client.post("/v1/leave", headers=AUTH)
    assert r.status == 200
    assert agent.leave_requested == 1


async def test_keys(client: TestClient, agent: FakeAgent) -> None:
    doc = await (await client.get("/v1/keys")).json()
    assert doc == {"keys": [{"id": KEY_A[:4].hex(), "primary": True}],
                   "primary": KEY_A[:4].hex(), "insecure": False}
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
    for body in ({"op": "rotate", "key": b64}, {"op": "use"}, {"op": "use", "key": "!!"},
                 {"op": "use", "key": base64.b64encode(b"short").decode()}):
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
    assert '# TYPE meshd_members gauge' in text
    assert 'meshd_members{state="alive"} 1' in text
    assert "meshd_drops_auth_total 4" in text
    assert "meshd_msgs_in_ping_total 9" in text


def test_exposition_format() -> None:
    out = Exposition()
    out.gauge("meshd_x", "help", 1.5, label='a"b\\c')
    out.counter("meshd_y_total", "help", 3)
    out.counter("meshd_y_total", "dup is ignored", 4)
    text = out.render()
    assert 'meshd_x{label="a\\"b\\\\c"} 1.5' in text
    assert text.count("# TYPE meshd_y_total counter") == 1
    assert "meshd_y_total 3" in text and "meshd_y_total 4" not in text
    assert counter_name("streams.failed.tcp_ping") == "meshd_streams_failed_tcp_ping_total"


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
    while b"event: member" not in buf or b"\n\n" not in buf[buf.index(b"event: member"):]:
        buf += await asyncio.wait_for(r.content.readany(), 5)
    block = buf[buf.index(b"event: member"):].split(b"\n\n")[0]
    data = block.split(b"data: ", 1)[1]
    doc = orjson.loads(data)
    assert doc["kind"] == "dead"
    assert doc["member"]["name"] == "n3" and doc["member"]["state"] == "dead"
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
