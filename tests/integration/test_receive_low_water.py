"""A long body read over a real TCP connection with its receive low-water mark
(meshd.net.body.ReceiveLowWater): woken per mark, its tail never held back, the connection
given back as it was. The mark's arithmetic without a socket: tests/unit/test_body_read.py."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from meshd.net.body import RECEIVE_LOW_WATER, ReceiveLowWater, read_bounded_into
from tests.local_http import serving

pytestmark = pytest.mark.integration


async def test_a_real_connection_gets_its_body_whole_and_its_tail_at_once() -> None:
    """Over TCP: the reader is woken per low-water mark, the tail (less than one mark) is not
    held back, and the connection is left as it was for the next answer on it."""
    body = bytes(range(256)) * 4000  # 1,024,000 bytes

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:900_000])
        await asyncio.sleep(0.3)  # the last 124,000 bytes come alone, under one mark
        await resp.write(body[900_000:])
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    seen: list[int] = []
    async with (
        serving(app) as port,
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/") as resp,
    ):
        transport = resp.connection.transport if resp.connection is not None else None
        assert transport is not None
        sock = transport.get_extra_info("socket")
        low = ReceiveLowWater.on(transport)
        assert low is not None

        def watch() -> None:
            seen.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))

        read = read_bounded_into(resp.content, resp.content_length, len(body), watch, low)
        got = await asyncio.wait_for(read, 10)  # a held-back tail would never come
        low.reset()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    assert got == body
    assert max(seen) == RECEIVE_LOW_WATER  # it was in force while the body came
