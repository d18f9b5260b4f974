"""The peer HTTP side of the bind port (TCP): one sealed envelope in, one sealed envelope out.

The server is a plain aiohttp web.Application so later features (chunk transfer) add their
routes to the same app; PeerServer runs it behind a connection guard (meshd.net.guard) and every
route behind the app's PeerGate (meshd.net.peer_auth: the cluster key is checked from a sealed
header before the body is read). The client is one shared aiohttp ClientSession; it carries out
the core's StreamRequests, with a token for each, and reports the reply (or None on any failure).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from aiohttp import web

from meshd.metrics import Exposition
from meshd.net.body import BodyTooLarge, BodyTruncated, read_bounded
from meshd.net.guard import Guard, GuardLimits, GuardStats
from meshd.net.http_server import HttpServer
from meshd.net.peer_auth import AUTH_HEADER, PEER_GATE, GateStats, PeerGate, gated, make_token
from meshd.wire import Codec

log = logging.getLogger("meshd.peer")

STREAM_PATH = "/peer/v1/stream"
MAX_STREAM_BODY = 16 * 1024 * 1024  # a push-pull of a very large mesh still fits
_OCTETS = "application/octet-stream"


class StreamHandler(Protocol):
    def handle_stream(self, data: bytes, addr: str) -> bytes | None: ...


class TCPStats:
    __slots__ = ("accepted", "connect_errors", "connects", "received_bytes", "sent_bytes")

    def __init__(self) -> None:
        self.accepted = 0
        self.connects = 0
        self.connect_errors = 0
        self.sent_bytes = 0
        self.received_bytes = 0


@dataclass
class PeerTraffic:
    """Both sides of the peer TCP port: exchanges this node served and exchanges it started."""

    served: TCPStats = field(default_factory=TCPStats)
    started: TCPStats = field(default_factory=TCPStats)
    guard: GuardStats = field(default_factory=GuardStats)  # connections refused, timed out
    gate: GateStats = field(default_factory=GateStats)  # requests refused before their body

    def collect_metrics(self, out: Exposition) -> None:
        self.guard.collect_metrics(out)
        self.gate.collect_metrics(out)
        s, c = self.served, self.started
        out.counter("meshd_tcp_accepted_total", "peer exchanges served", s.accepted)
        out.counter(
            "meshd_tcp_received_bytes_total", "peer TCP bytes received", s.received_bytes + c.received_bytes
        )
        out.counter("meshd_tcp_sent_bytes_total", "peer TCP bytes sent", s.sent_bytes + c.sent_bytes)
        out.counter("meshd_tcp_connects_total", "peer exchanges started", c.connects)
        out.counter("meshd_tcp_connect_errors_total", "peer exchanges failed", c.connect_errors)


STREAM_HANDLER = web.AppKey("stream_handler", StreamHandler)
TCP_STATS = web.AppKey("tcp_stats", TCPStats)


def _peer_addr(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return "unknown:0"
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@gated(MAX_STREAM_BODY)
async def _stream(request: web.Request, data: bytes) -> web.StreamResponse:
    stats = request.app[TCP_STATS]
    stats.accepted += 1
    stats.received_bytes += len(data)
    reply = request.app[STREAM_HANDLER].handle_stream(data, _peer_addr(request))
    if reply is None:
        # The core refused it (bad key, other cluster, garbage): no detail for strangers.
        return web.Response(status=400, content_type=_OCTETS)
    stats.sent_bytes += len(reply)
    return web.Response(body=reply, content_type=_OCTETS)


def create_peer_app(
    handler: StreamHandler, gate: PeerGate | Codec, stats: TCPStats | None = None
) -> web.Application:
    """The peer HTTP application; other modules may add routes before it starts.

    `gate` authenticates every route (a Codec: a PeerGate with the default bounds).
    """
    # aiohttp's own cap only matters for a route that reads without the gate (none should).
    app = web.Application(client_max_size=MAX_STREAM_BODY)
    app[PEER_GATE] = gate if isinstance(gate, PeerGate) else PeerGate(gate)
    app[STREAM_HANDLER] = handler
    app[TCP_STATS] = stats or TCPStats()
    app.router.add_post(STREAM_PATH, _stream)
    return app


class PeerServer(HttpServer):
    """Runs a peer app on host:port (the TCP twin of the UDP gossip port), behind a guard."""

    def __init__(
        self, app: web.Application, limits: GuardLimits | None = None, stats: GuardStats | None = None
    ) -> None:
        super().__init__(app, backlog=512, guard=Guard(limits, stats))


class PeerClient:
    """One ClientSession for every exchange with peers."""

    def __init__(self, codec: Codec, stats: TCPStats | None = None, max_reply: int = MAX_STREAM_BODY) -> None:
        self.codec = codec  # seals the request tokens (the node's own codec)
        self.stats = stats or TCPStats()
        self._max_reply = max_reply
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=8, keepalive_timeout=15)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                headers={"User-Agent": "meshd-peer"},
            )
        return self._session

    async def exchange(self, addr: str, data: bytes, timeout: float, to: str = "") -> bytes | None:
        """POST one envelope to a peer (node id `to`, if known); its reply, or None on failure."""
        url = f"http://{addr}{STREAM_PATH}"
        self.stats.connects += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.05)
        for attempt in (1, 2):
            try:
                reply = await self._post(url, data, max(deadline - loop.time(), 0.01), to)
            except aiohttp.ServerDisconnectedError as e:
                # A kept-alive connection to a peer that restarted: try once on a fresh one.
                if attempt == 1 and loop.time() < deadline:
                    continue
                self._failed(addr, e)
                return None
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
                self._failed(addr, e)
                return None
            if reply is None:
                self.stats.connect_errors += 1
                return None
            self.stats.sent_bytes += len(data)
            self.stats.received_bytes += len(reply)
            return reply
        return None

    async def _post(self, url: str, data: bytes, timeout: float, to: str) -> bytes | None:
        headers = {
            "Content-Type": _OCTETS,
            AUTH_HEADER: make_token(self.codec, "POST", STREAM_PATH, len(data), to=to),
        }
        async with self.session().post(
            url,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if resp.status != 200:
                log.debug("peer %s answered %d", url, resp.status)
                return None
            try:
                return await read_bounded(resp.content, resp.content_length, self._max_reply)
            except (BodyTooLarge, BodyTruncated) as e:
                log.debug("peer %s: %s", url, e)
                return None

    def _failed(self, addr: str, e: BaseException) -> None:
        self.stats.connect_errors += 1
        log.debug("peer exchange with %s failed: %r", addr, e)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
