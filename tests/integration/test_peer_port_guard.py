"""The peer TCP port under a hostile site network (issue 9, points 1 and 6), over loopback.

A real PeerServer runs in this process with small caps and short deadlines; attackers are plain
sockets bound to other loopback addresses (127.0.0.2, ...), so the per-source cap sees many
hosts and the legitimate client (127.0.0.1) is a host of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from meshd.core.counters import Counters
from meshd.crypto import Keyring
from meshd.net.guard import GuardLimits
from meshd.net.peer_auth import AUTH_HEADER, PeerGate, make_token
from meshd.net.peer_http import STREAM_PATH, PeerClient, PeerServer, PeerTraffic, create_peer_app
from meshd.release import peer as release_peer
from meshd.release.peer import PeerProtocolError, add_peer_routes
from meshd.release.peer_client import PeerFetcher
from meshd.release.serve import UploadSlots
from meshd.wire import Codec
from tests.fakes import FakeReleases

pytestmark = pytest.mark.integration

KEY = bytes(range(32))
LIMITS = GuardLimits(max_conns=48, max_per_source=6, header_timeout=0.6, idle_timeout=0.6)


class Echo:
    def __init__(self) -> None:
        self.calls = 0

    def handle_stream(self, data: bytes, addr: str) -> bytes | None:
        self.calls += 1
        return b"re:" + data


class Peer:
    def __init__(self, server: PeerServer, gate: PeerGate, traffic: PeerTraffic, echo: Echo) -> None:
        self.server, self.gate, self.traffic, self.echo = server, gate, traffic, echo
        assert server.bound is not None
        self.port = int(server.bound[1])
        self.addr = f"127.0.0.1:{self.port}"


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    codec = Codec("t", Keyring([KEY]))
    traffic = PeerTraffic()
    gate = PeerGate(codec, body_timeout=1.0, stats=traffic.gate)
    echo = Echo()
    server = PeerServer(create_peer_app(echo, gate, traffic.served), limits=LIMITS, stats=traffic.guard)
    await server.start("127.0.0.1", 0)
    try:
        yield Peer(server, gate, traffic, echo)
    finally:
        await server.stop()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def connect(port: int, source: str) -> socket.socket:
    """A non-blocking client socket from `source` (a loopback address)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    return s


def push(s: socket.socket, data: bytes) -> int:
    """Send what the kernel takes now (nothing is buffered in this process)."""
    try:
        return s.send(data)
    except (BlockingIOError, ConnectionError):
        return 0


async def wait_closed(s: socket.socket, within: float) -> tuple[bool, bytes]:
    """(closed by the server within `within` seconds, what it sent before)."""
    loop = asyncio.get_running_loop()
    got = b""
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            data = await asyncio.wait_for(loop.sock_recv(s, 65536), deadline - loop.time())
        except TimeoutError:
            break
        except ConnectionError:
            return True, got
        if not data:
            return True, got
        got += data
    return False, got


def sources(n: int) -> list[str]:
    return [f"127.0.0.{2 + i}" for i in range(n)]


async def test_slow_uploads_without_the_key_are_refused_before_the_body(peer: Peer) -> None:
    head = (
        f"POST {STREAM_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        "Content-Length: 16000000\r\n\r\n"
    ).encode()
    rss0 = rss_bytes()
    socks = [await connect(peer.port, src) for src in sources(8) for _ in range(4)]
    try:
        for s in socks:
            push(s, head)
        for _ in range(20):  # keep trickling body bytes, as the attacker in the issue did
            for s in socks:
                push(s, b"\0" * 65536)
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*(wait_closed(s, 3.0) for s in socks))
    finally:
        for s in socks:
            s.close()
    assert all(closed for closed, _ in results)
    assert all(got.startswith(b"HTTP/1.1 401") for _, got in results)
    assert peer.echo.calls == 0
    assert peer.traffic.gate.auth == len(socks)
    assert peer.gate.budget.in_flight == 0
    # 32 x 16 MB announced, about 40 MB pushed: the server kept (nearly) none of it.
    assert rss_bytes() - rss0 < 24 * 1024 * 1024


async def test_idle_connections_beyond_the_caps_are_closed_and_fds_stay_bounded(peer: Peer) -> None:
    fds0 = open_fds()
    n_sources, per_source = 20, 15  # 300 connections: 6 per source and 48 in all are kept
    socks = [await connect(peer.port, src) for src in sources(n_sources) for _ in range(per_source)]
    try:
        await asyncio.sleep(0.2)
        g = peer.traffic.guard
        assert g.open <= LIMITS.max_conns
        assert g.refused_per_source + g.refused_global + g.evicted >= len(socks) - LIMITS.max_conns
        # Our own 300 client sockets, plus at most the global cap on the server side.
        assert open_fds() - fds0 <= len(socks) + LIMITS.max_conns + 4
        # A legitimate peer still gets in (an idle connection of a big holder makes room).
        client = PeerClient(Codec("t", Keyring([KEY])))
        t0 = time.monotonic()
        try:
            assert await client.exchange(peer.addr, b"ping", 2.0) == b"re:ping"
        finally:
            await client.close()
        assert time.monotonic() - t0 < 1.0
        # The kept ones are cut at the header deadline: nothing stays open.
        await asyncio.sleep(LIMITS.header_timeout + 0.4)
        assert g.open == 0
        assert g.header_timeouts >= 1
    finally:
        for s in socks:
            s.close()


async def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(peer: Peer) -> None:
    codec = Codec("t", Keyring([KEY]))
    body = b"hello"
    req = (
        f"POST {STREAM_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"{AUTH_HEADER}: {make_token(codec, 'POST', STREAM_PATH, len(body))}\r\n\r\n"
    ).encode() + body
    s = await connect(peer.port, "127.0.0.1")
    try:
        assert push(s, req) == len(req)
        loop = asyncio.get_running_loop()
        reply = await asyncio.wait_for(loop.sock_recv(s, 65536), 2.0)
        assert reply.startswith(b"HTTP/1.1 200")
        assert reply.endswith(b"re:hello")
        t0 = time.monotonic()
        closed, _ = await wait_closed(s, 3.0)
        assert closed
        assert LIMITS.idle_timeout - 0.05 <= time.monotonic() - t0 < LIMITS.idle_timeout + 0.6
        assert peer.traffic.guard.idle_timeouts == 1
    finally:
        s.close()


async def test_a_slow_header_client_is_cut_at_the_header_deadline(peer: Peer) -> None:
    s = await connect(peer.port, "127.0.0.2")
    t0 = time.monotonic()
    try:
        push(s, f"POST {STREAM_PATH} HTTP/1.1\r\n".encode())
        closed = False
        for i in range(40):  # one header byte every 50 ms, for up to 2 s
            if not push(s, b"X-Slow-%d: 1\r\n" % i):
                closed = True
                break
            closed, _ = await wait_closed(s, 0.05)
            if closed:
                break
        assert closed
        assert time.monotonic() - t0 < LIMITS.header_timeout + 0.5
        assert peer.traffic.guard.header_timeouts == 1
    finally:
        s.close()


async def test_a_stream_exchange_succeeds_promptly_under_attack(peer: Peer) -> None:
    """Idle floods from many sources and slow keyless uploads; the real peer is answered."""
    head = f"POST {STREAM_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 16000000\r\n\r\n".encode()
    socks: list[socket.socket] = []
    stop = asyncio.Event()

    async def attack() -> None:
        srcs = sources(30)
        while not stop.is_set():  # keep reconnecting, as a flood would
            for src in srcs:
                with contextlib.suppress(OSError):
                    s = await connect(peer.port, src)
                    socks.append(s)
                    push(s, head if len(socks) % 2 else b"GET / HTTP/1.1\r\n")
            while len(socks) > 400:
                socks.pop(0).close()
            await asyncio.sleep(0.02)

    fds0 = open_fds()
    attacker = asyncio.create_task(attack())
    client = PeerClient(Codec("t", Keyring([KEY])))
    try:
        await asyncio.sleep(0.3)
        for i in range(5):
            t0 = time.monotonic()
            data = b"x" * (1000 * (i + 1))
            assert await client.exchange(peer.addr, data, 2.0) == b"re:" + data
            assert time.monotonic() - t0 < 0.5
        assert peer.traffic.guard.open <= LIMITS.max_conns
        # The attacker's sockets are ours too; the server side holds at most the global cap.
        assert open_fds() - fds0 <= len(socks) + LIMITS.max_conns + 8
    finally:
        stop.set()
        await attacker
        await client.close()
        for s in socks:
            s.close()


def test_the_guard_works_on_uvloop_as_the_daemon_runs_it() -> None:
    """uvloop's transports are not asyncio.Transport subclasses; the guard must not care."""
    import uvloop

    async def scenario() -> None:
        codec = Codec("t", Keyring([KEY]))
        traffic = PeerTraffic()
        server = PeerServer(
            create_peer_app(Echo(), PeerGate(codec, stats=traffic.gate), traffic.served),
            limits=LIMITS,
            stats=traffic.guard,
        )
        await server.start("127.0.0.1", 0)
        assert server.bound is not None
        addr = f"127.0.0.1:{server.bound[1]}"
        client = PeerClient(codec)
        try:
            assert await client.exchange(addr, b"ping", 2.0) == b"re:ping"
            stranger = PeerClient(Codec("t", Keyring([bytes(32)])))
            assert await stranger.exchange(addr, b"x", 2.0) is None
            await stranger.close()
            socks = [
                await connect(int(server.bound[1]), "127.0.0.2") for _ in range(LIMITS.max_per_source + 2)
            ]
            await asyncio.sleep(LIMITS.idle_timeout + 0.4)
            assert traffic.guard.refused_per_source == 2
            assert traffic.gate.auth == 1
            assert traffic.guard.idle_timeouts == 1  # the client's kept-alive connection
            assert traffic.guard.open == 0
            for s in socks:
                s.close()
        finally:
            await client.close()
            await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


@contextlib.asynccontextmanager
async def serving(backend: FakeReleases) -> AsyncIterator[str]:
    """The peer routes over `backend` on a loopback port; yields host:port."""
    app = create_peer_app(Echo(), PeerGate(backend.codec))
    add_peer_routes(app, backend)
    server = PeerServer(app)
    await server.start("127.0.0.1", 0)
    assert server.bound is not None
    try:
        yield f"127.0.0.1:{server.bound[1]}"
    finally:
        await server.stop()


async def test_uploads_beyond_a_sources_slots_get_503() -> None:
    """With an upload rate, one peer's queued uploads are bounded: the excess is a counted 503."""
    codec = Codec("t", Keyring([KEY]))
    paced = asyncio.Event()

    class Paced(FakeReleases):
        def manifest_document(self, rid: str) -> bytes | None:
            return b"{}"

        async def upload_permit(self, nbytes: int) -> None:
            await paced.wait()  # the upload cap holds every answer back

    slots = UploadSlots(running=1, waiting=1)
    backend = Paced(codec, slots)
    fetcher = PeerFetcher(codec, Counters())
    async with serving(backend) as addr:
        try:
            rid = "ab" * 32
            running = [asyncio.create_task(fetcher.manifest(addr, rid, timeout=5.0)) for _ in range(2)]
            await asyncio.sleep(0.2)
            with pytest.raises(PeerProtocolError, match="503"):
                await fetcher.manifest(addr, rid, timeout=5.0)
            assert backend.counters["serve.drops.busy"] == 1
            paced.set()
            assert await asyncio.gather(*running) == [b"{}", b"{}"]
            assert slots.held("127.0.0.1") == 0
        finally:
            await fetcher.close()


async def test_an_answer_its_requester_stops_reading_is_dropped_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A requester that asks for a piece and stops reading would hold an upload slot for good:
    at the send deadline its connection goes, the slot is free and the drop counted."""
    monkeypatch.setattr(release_peer, "SEND_MIN_S", 0.5)
    monkeypatch.setattr(release_peer, "SEND_FLOOR_RATE", 1e12)
    codec = Codec("t", Keyring([KEY]))

    class Big(FakeReleases):
        async def read_piece(self, ids: list[str], room: int, tail: int = 0) -> bytearray:
            return bytearray(room + 64 * 1024 * 1024 + tail)  # more than the socket buffers hold

    slots = UploadSlots(running=1, waiting=1)
    backend = Big(codec, slots)
    body = codec.seal(b'{"ids": ["' + b"ab" * 32 + b'"]}')
    headers = {AUTH_HEADER: make_token(codec, "POST", release_peer.CHUNKS_PATH, len(body))}
    async with serving(backend) as addr:
        url = f"http://{addr}{release_peer.CHUNKS_PATH}"
        async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200
            await asyncio.sleep(2.0)  # not reading: aiohttp pauses the socket when its buffer fills
            assert backend.counters["serve.drops.send_timeout"] == 1
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # the connection was cut: the answer never completes
        assert slots.held("127.0.0.1") == 0
