"""Read a whole HTTP body (request or response) with a size bound.

aiohttp's `StreamReader.read(n)` returns what is buffered, not n bytes, so a bounded read of a
whole body has to loop; this is that loop, for every peer route and client.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import StreamReader


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


async def read_bounded_into(
    content: StreamReader,
    content_length: int | None,
    limit: int,
    on_data: Callable[[], None] | None = None,
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
    while data := await content.readany():
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
