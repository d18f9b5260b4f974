"""read_bounded: a whole body within its bound, with a callback as its bytes arrive; and the
receive low-water mark a long body is read with."""

from __future__ import annotations

import asyncio
import socket
from unittest import mock

import pytest
from aiohttp import StreamReader

from meshd.net.body import (
    BodyTooLarge,
    BodyTruncated,
    ReceiveLowWater,
    read_bounded,
    read_bounded_into,
)


def reader(parts: list[bytes], *, eof: bool = True) -> StreamReader:
    loop = asyncio.get_running_loop()
    s = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
    for p in parts:
        s.feed_data(p)
    if eof:
        s.feed_eof()
    return s


async def test_on_data_is_called_for_every_part_that_arrives() -> None:
    calls: list[int] = []
    s = reader([], eof=False)  # parts arrive one by one below
    task = asyncio.create_task(read_bounded(s, 5, 10, lambda: calls.append(1)))
    for part in (b"ab", b"cd", b"e"):
        await asyncio.sleep(0)
        s.feed_data(part)
        await asyncio.sleep(0)
    s.feed_eof()
    assert await task == b"abcde"
    assert len(calls) == 3


async def test_bounds_still_hold() -> None:
    with pytest.raises(BodyTooLarge):
        await read_bounded(reader([b"x" * 11]), None, 10)
    with pytest.raises(BodyTruncated):
        await read_bounded(reader([b"abc"]), 5, 10)
    with pytest.raises(BodyTooLarge):
        await read_bounded(reader([]), 11, 10)


async def test_read_into_fills_one_buffer_of_the_announced_length() -> None:
    got = await read_bounded_into(reader([b"ab", b"cd", b"e"]), 5, 10)
    assert isinstance(got, bytearray)
    assert got == b"abcde"
    assert await read_bounded_into(reader([b"ab", b"c"]), None, 10) == b"abc"  # no length: joined


async def test_read_into_refuses_like_read_bounded() -> None:
    with pytest.raises(BodyTooLarge):
        await read_bounded_into(reader([b"x" * 11]), 11, 10)  # announced over the limit
    with pytest.raises(BodyTooLarge):
        await read_bounded_into(reader([b"abc", b"def"]), 5, 10)  # more than it announced
    with pytest.raises(BodyTruncated):
        await read_bounded_into(reader([b"abc"]), 5, 10)
    with pytest.raises(BodyTooLarge):
        await read_bounded_into(reader([b"x" * 11]), None, 10)


class FakeSock:
    type = socket.SOCK_STREAM

    def __init__(self, fail: bool = False) -> None:
        self.set: list[int] = []
        self.fail = fail

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        assert (level, opt) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        if self.fail:
            raise OSError(9, "Bad file descriptor")
        self.set.append(value)


async def test_low_water_never_asks_for_more_than_the_body_has_left() -> None:
    sock = FakeSock()
    low = ReceiveLowWater(sock, most=100)
    s = reader([], eof=False)
    task = asyncio.create_task(read_bounded_into(s, 250, 1000, low_water=low))
    for part in (b"a" * 120, b"b" * 100, b"c" * 30):
        await asyncio.sleep(0)
        s.feed_data(part)
        await asyncio.sleep(0)
    s.feed_eof()
    assert await task == b"a" * 120 + b"b" * 100 + b"c" * 30
    # 250 left: the cap; 130 left: the cap (no call); 30 left: exactly the tail, never more;
    # all in: back to 1 before the read that sees the end.
    assert sock.set == [100, 30, 1]
    low.reset()
    assert sock.set == [100, 30, 1]  # already as it was: no call


async def test_low_water_on_a_closed_socket_stops_tuning_and_the_read_goes_on() -> None:
    sock = FakeSock(fail=True)
    low = ReceiveLowWater(sock, most=100)
    assert await read_bounded_into(reader([b"x" * 300]), 300, 1000, low_water=low) == b"x" * 300
    low.reset()  # no second try on a socket that is gone
    assert sock.set == []
    assert ReceiveLowWater.on(None) is None
    assert ReceiveLowWater.on(mock.Mock(get_extra_info=lambda name: None)) is None
