"""The gossip UDP endpoint: an asyncio DatagramProtocol (the fast path under uvloop).

uvloop does not implement loop.sock_sendto/sock_recvfrom, so the endpoint is built with
create_datagram_endpoint on a socket we configure ourselves (large buffers first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from meshd.errors import ConfigError
from meshd.metrics import Exposition
from meshd.units import parse_hostport

log = logging.getLogger("meshd.udp")

RECV_BUFFER = 4 * 1024 * 1024  # bursts of gossip must not overflow the kernel queue
SEND_BUFFER = 1024 * 1024
MAX_DATAGRAM = 65507

DatagramHandler = Callable[[bytes, str], None]
_SockAddr = tuple[str, int] | tuple[str, int, int, int]


class UDPStats:
    __slots__ = ("received", "received_bytes", "send_errors", "sent", "sent_bytes")

    def __init__(self) -> None:
        self.sent = 0
        self.sent_bytes = 0
        self.received = 0
        self.received_bytes = 0
        self.send_errors = 0


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: UDPEndpoint) -> None:
        self._endpoint = endpoint

    def datagram_received(self, data: bytes, addr: _SockAddr) -> None:
        self._endpoint._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the peer is gone; SWIM notices by itself.
        self._endpoint.stats.send_errors += 1
        log.debug("udp error: %s", exc)


class UDPEndpoint:
    """One bound UDP socket. `on_datagram(data, "host:port")` is called for every packet."""

    def __init__(self, on_datagram: DatagramHandler) -> None:
        self._on_datagram = on_datagram
        self._transport: asyncio.DatagramTransport | None = None
        self._addr_cache: dict[str, tuple[str, int]] = {}
        self.stats = UDPStats()
        self.local_addr: tuple[str, int] = ("", 0)

    async def open(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for opt, size in ((socket.SO_RCVBUF, RECV_BUFFER), (socket.SO_SNDBUF, SEND_BUFFER)):
                # Capped by net.core.rmem_max; the kernel keeps what it allows.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, size)
            sock.bind((host, port))
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport = transport
        self.local_addr = sock.getsockname()[:2]

    def _received(self, data: bytes, addr: _SockAddr) -> None:
        self.stats.received += 1
        self.stats.received_bytes += len(data)
        host, port = addr[0], addr[1]
        self._on_datagram(data, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    def sendto(self, data: bytes, addr: str) -> None:
        """Send one datagram to "host:port"; failures are counted, never raised."""
        transport = self._transport
        if transport is None or transport.is_closing():
            self.stats.send_errors += 1
            return
        target = self._addr_cache.get(addr)
        if target is None:
            try:
                target = parse_hostport(addr, "peer address")
            except (ConfigError, ValueError):
                self.stats.send_errors += 1
                log.debug("udp: bad address %r", addr)
                return
            if len(self._addr_cache) > 65536:
                self._addr_cache.clear()
            self._addr_cache[addr] = target
        try:
            transport.sendto(data, target)
        except (OSError, ValueError) as e:
            self.stats.send_errors += 1
            log.debug("udp send to %s failed: %s", addr, e)
            return
        self.stats.sent += 1
        self.stats.sent_bytes += len(data)

    def collect_metrics(self, out: Exposition) -> None:
        u = self.stats
        out.counter("meshd_udp_sent_packets_total", "UDP packets sent", u.sent)
        out.counter("meshd_udp_sent_bytes_total", "UDP bytes sent", u.sent_bytes)
        out.counter("meshd_udp_received_packets_total", "UDP packets received", u.received)
        out.counter("meshd_udp_received_bytes_total", "UDP bytes received", u.received_bytes)
        out.counter("meshd_udp_send_errors_total", "UDP send failures", u.send_errors)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
