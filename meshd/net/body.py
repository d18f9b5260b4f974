"""Read a whole HTTP body (request or response) with a size bound.

aiohttp's `StreamReader.read(n)` returns what is buffered, not n bytes, so a bounded read of a
whole body has to loop; this is that loop, for every peer route and client.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from aiohttp import StreamReader

# A long body wakes its reader once per this many bytes at most, not once per few segments: at
# 32 hosts on 2 cores a piece's answer arrived in 41 KB steps, each a pass through the loop,
# the HTTP parser and the reader in a process whose caches the other 32 had emptied.
RECEIVE_LOW_WATER = 256 * 1024


class BodyTooLarge(Exception):
    """The body is (or announced itself to be) over the limit."""


class BodyTruncated(Exception):
    """The body ended before its announced Content-Length."""


async def read_bounded(
    content: StreamReader,
    content_length: int | None,
    limit: int,
    on_data: Callable[[], None] | None = None,
) -> bytes:
    """The whole body; BodyTooLarge over `limit`, BodyTruncated when cut short. `on_data`
    is called as bytes arrive (a caller's stall timer).

    aiohttp's own payload errors (a connection dropped mid-body) propagate unchanged.
    """
    if content_length is not None and content_length > limit:
        raise BodyTooLarge(f"body of {content_length} bytes, limit {limit}")
    parts: list[bytes] = []
    total = 0
    while data := await content.readany():
        total += len(data)
        if total > limit:
            raise BodyTooLarge(f"body over {limit} bytes")
        parts.append(data)
        if on_data is not None:
            on_data()
    if content_length is not None and total != content_length:
        raise BodyTruncated(f"body of {total} of {content_length} bytes")
    return b"".join(parts)


class ReceiveLowWater:
    """SO_RCVLOWAT on one connection while a body of known length is read: the kernel wakes
    the reader when this many bytes wait (or the window closes), never more than the body has
    left, so its tail is never held back. `reset()` gives the connection back as it was."""

    def __init__(self, sock: Any, most: int = RECEIVE_LOW_WATER) -> None:
        self._sock = sock
        self._most = most
        self._set = 1

    @classmethod
    def on(cls, transport: Any) -> ReceiveLowWater | None:
        """For a transport's TCP socket; None when it has none (a test's fake, a closed one)."""
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or getattr(sock, "type", None) != socket.SOCK_STREAM:
            return None
        return cls(sock)

    def expect(self, remaining: int) -> None:
        """`remaining` bytes of the body are still to come from the kernel."""
        want = max(1, min(self._most, remaining))
        if want == self._set or self._sock is None:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
        except OSError:
            self._sock = None  # closed under us: nothing left to tune
            return
        self._set = want

    def reset(self) -> None:
        self.expect(1)


async def read_bounded_into(
    content: StreamReader,
    content_length: int | None,
    limit: int,
    on_data: Callable[[], None] | None = None,
    low_water: ReceiveLowWater | None = None,
) -> bytearray:
    """read_bounded into one writable buffer (what a large sealed body is opened in place
    from). With a Content-Length it is allocated once and filled, no join; without one (never
    from meshd peers) the joined body is copied into one."""
    if content_length is None:
        return bytearray(await read_bounded(content, content_length, limit, on_data))
    if content_length > limit:
        raise BodyTooLarge(f"body of {content_length} bytes, limit {limit}")
    buf = bytearray(content_length)
    pos = 0
    while True:
        if low_water is not None:
            # What the kernel still has to hand over (the reader may hold some already).
            low_water.expect(content_length - content.total_bytes)
        data = await content.readany()
        if not data:
            break
        end = pos + len(data)
        if end > content_length:
            raise BodyTooLarge(f"body over its Content-Length of {content_length} bytes")
        buf[pos:end] = data
        pos = end
        if on_data is not None:
            on_data()
    if pos != content_length:
        raise BodyTruncated(f"body of {pos} of {content_length} bytes")
    return buf
