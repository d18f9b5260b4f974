"""The operator API answers only its own origin (DNS rebinding, cross-site pages) and limits event
streams per client: a real ApiServer on 127.0.0.1 over a fake agent, raw sockets where a client
must misbehave (no Host, never reading)."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from meshd.api import app as api_app
from meshd.api.app import EVENT_HUB, MAX_CLIENT_SSE, SSE_CLIENTS, ApiServer, create_api_app
from meshd.api.guard import AllowedHost
from meshd.core.messages import MemberState
from tests.fakes import AUTH, FakeAgent, FakeEvent, member
from tests.metrics_text import sample

ROUTES = ["/", "/v1/status", "/v1/members", "/v1/health", "/v1/events", "/metrics", "/healthz", "/nope"]


@dataclass
class Server:
    api: ApiServer
    agent: FakeAgent
    port: int
    session: aiohttp.ClientSession = field(default_factory=aiohttp.ClientSession)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def get(self, path: str, host: str | None = None, **headers: str) -> aiohttp.ClientResponse:
        if host is not None:
            headers["Host"] = host
        resp = await self.session.get(self.url(path), headers=headers)
        if path != "/v1/events" or resp.status != 200:
            await resp.read()
        return resp

    async def metrics(self) -> str:
        return await (await self.get("/metrics")).text()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    agent = FakeAgent(people=[member("n1", MemberState.ALIVE, site="factory")])
    api = ApiServer(
        create_api_app(agent, [AllowedHost("gw1.example"), AllowedHost("tunnel.localhost", 8000)])
    )
    await api.start("127.0.0.1", 0)
    assert api.bound is not None
    s = Server(api, agent, int(api.bound[1]))
    try:
        yield s
    finally:
        await s.session.close()
        await api.stop()


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}"])
async def test_foreign_host_is_refused_on_every_route(server: Server, path: str, host: str) -> None:
    resp = await server.get(path, host.format(port=server.port))
    assert resp.status == 421
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"] == "misdirected_request"
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert server.agent.subs == []
    assert server.agent.asked == []


async def test_foreign_host_is_refused_on_posts_before_the_token(server: Server) -> None:
    resp = await server.session.post(
        server.url("/v1/leave"), headers={**AUTH, "Host": f"evil.example:{server.port}"}
    )
    assert resp.status == 421
    assert server.agent.leave_requested == 0


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "127.0.0.1",
        "127.9.8.7:{port}",
        "localhost:{port}",
        "LOCALHOST.:{port}",
        "dash.localhost:{port}",
        "[::1]:{port}",
        "[::1]",
        "gw1.example:{port}",
        "gw1.example",
        "tunnel.localhost:8000",
    ],
)
async def test_names_of_this_api_pass(server: Server, host: str) -> None:
    resp = await server.get("/v1/status", host.format(port=server.port))
    assert resp.status == 200
    assert (await resp.json())["name"] == "n1"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{other}",
        "localhost:{other}",
        "gw1.example:{other}",
        "other.example:8000",
        "[::1]:{other}",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "127.0.0.1:{port}:{port}",
        "user@127.0.0.1:{port}",
        "::1",
        "",
    ],
)
async def test_wrong_port_or_malformed_host_is_refused(server: Server, host: str) -> None:
    resp = await server.get("/v1/status", host.format(port=server.port, other=server.port + 1))
    assert resp.status == 421


async def test_missing_or_repeated_host_is_refused(server: Server) -> None:
    answer = await _raw(server.port, b"GET /v1/status HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 421") or answer.startswith(b"HTTP/1.1 421")
    assert b"misdirected_request" in answer
    assert b'"n1"' not in answer
    host = f"127.0.0.1:{server.port}".encode()
    answer = await _raw(
        server.port,
        b"GET /v1/status HTTP/1.1\r\nHost: " + host + b"\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    assert b'"n1"' not in answer
    assert answer.split(b" ", 2)[1] in (b"400", b"421")


async def test_refusals_are_counted_on_metrics(server: Server) -> None:
    await server.get("/v1/status", "evil.example")
    await server.get("/v1/status", Origin="http://evil.example")
    await server.get("/v1/status", Origin="http://evil.example")
    text = await server.metrics()
    assert sample(text, "meshd_api_refused_total", reason="host") == 1
    assert sample(text, "meshd_api_refused_total", reason="origin") == 2
    assert sample(text, "meshd_api_refused_total", reason="events_per_client") == 0


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://evil.example:{port}",
        "https://evil.example",
        "http://127.0.0.1:{other}",
        "http://localhost:{other}",
        "null",
        "file://",
        "http://127.0.0.1:{port}/x",
        "http://127.0.0.1:{port}, http://evil.example",
    ],
)
async def test_cross_origin_requests_are_refused(server: Server, origin: str) -> None:
    value = origin.format(port=server.port, other=server.port + 1)
    for path in ("/v1/status", "/v1/events", "/metrics"):
        resp = await server.get(path, Origin=value)
        assert resp.status == 403, path
        assert (await resp.json())["error"] == "cross_origin"
        assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await server.session.post(server.url("/v1/leave"), headers={**AUTH, "Origin": value})
    assert resp.status == 403
    assert server.agent.leave_requested == 0


@pytest.mark.parametrize(
    "origin",
    ["http://127.0.0.1:{port}", "http://localhost:{port}", "http://[::1]:{port}", "http://gw1.example"],
)
async def test_same_origin_passes(server: Server, origin: str) -> None:
    # The dashboard's own fetches: GETs (browsers may add Origin) and POSTs (they always do).
    value = origin.format(port=server.port)
    resp = await server.get("/v1/members", Origin=value)
    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await server.session.post(server.url("/v1/leave"), headers={**AUTH, "Origin": value})
    assert resp.status == 200
    assert server.agent.leave_requested == 1


async def test_dashboard_page_fetches_only_same_origin_paths(server: Server) -> None:
    html = await (await server.get("/", f"localhost:{server.port}")).text()
    assert '<script src="/static/dashboard.js">' in html
    assert "http://" not in html
    assert "https://" not in html
    js = await (await server.get("/static/dashboard.js", f"localhost:{server.port}")).text()
    assert 'getJSON("/v1/status")' in js
    assert 'new EventSource("/v1/events")' in js
    # No absolute (cross-origin) URL in the script; the SVG namespace is a name, not a fetch.
    assert re.findall(r"https?://[^\s\"'`]*", js) == ["http://www.w3.org/2000/svg"]


async def _first_frame(resp: aiohttp.ClientResponse) -> bytes:
    return await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)


async def _frame_with(resp: aiohttp.ClientResponse, needle: bytes) -> bytes:
    while True:
        frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        if needle in frame:
            return frame


async def test_fifth_event_stream_of_one_client_gets_429(server: Server) -> None:
    streams = [await server.get("/v1/events") for _ in range(MAX_CLIENT_SSE)]
    for s in streams:
        assert s.status == 200
        assert b"retry:" in await _first_frame(s)
    extra = await server.get("/v1/events")
    assert extra.status == 429
    assert extra.headers["Retry-After"].isdigit()
    assert (await extra.json())["error"] == "too_many_streams"
    # The first four keep working: each gets the next event.
    for sub in server.agent.subs:
        sub.queue.put_nowait(FakeEvent("join", member("n9")))
    for s in streams:
        assert b'"name":"n9"' in await _frame_with(s, b"n9")
    # Another client address has its own share.
    other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    async with other, other.get(server.url("/v1/events")) as resp:
        assert resp.status == 200
    assert sample(await server.metrics(), "meshd_api_refused_total", reason="events_per_client") == 1
    for s in streams:
        s.close()
    slots = server.api.app[SSE_CLIENTS]
    for _ in range(200):
        if slots.count == 0:
            break
        await asyncio.sleep(0.01)
    assert slots.count == 0
    assert slots.by_client == {}
    assert (await server.get("/v1/events")).status == 200  # slots come back when streams end


async def test_event_streams_end_when_the_server_stops(server: Server) -> None:
    streams = [await server.get("/v1/events") for _ in range(3)]
    for s in streams:
        await _first_frame(s)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.api.stop()
    for s in streams:
        rest = await asyncio.wait_for(s.content.read(), 5)  # EOF, not a hang
        assert b"n9" not in rest
    assert loop.time() - started < 5
    assert server.agent.subs == []


@dataclass
class BigEvent:
    kind: str
    member: Any = None
    payload: dict[str, str] = field(default_factory=dict)


async def test_a_reader_that_never_reads_is_dropped(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_app, "SSE_WRITE_TIMEOUT", 0.3)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    host = f"127.0.0.1:{server.port}".encode()
    await loop.sock_sendall(sock, b"GET /v1/events HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    try:
        for _ in range(200):
            if server.agent.subs:
                break
            await asyncio.sleep(0.01)
        sub = server.agent.subs[0]
        big = "x" * 65536
        for i in range(400):  # 26 MB: far more than the socket buffers hold
            sub.queue.put_nowait(BigEvent("release", payload={"i": str(i), "blob": big}))  # type: ignore[arg-type]
        hub = server.api.app[EVENT_HUB]
        for _ in range(500):
            if not hub.readers:
                break
            await asyncio.sleep(0.02)
        assert hub.readers == set()  # the stream ended (the API's one subscription stays)
        assert server.api.app[SSE_CLIENTS].count == 0
        assert sample(await server.metrics(), "meshd_api_events_slow_reader_total") == 1
    finally:
        sock.close()
