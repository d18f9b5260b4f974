"""DeadlineTimer (meshd/loop_timer.py) on real event loops, in real time: its callback runs once,
never before its deadline by the loop's clock, however the loop rounds it."""

from __future__ import annotations

import asyncio

import pytest

from meshd.loop_timer import DeadlineTimer

pytestmark = pytest.mark.integration


async def fired_at(deadline_in: float, wait: float = 0.05) -> list[tuple[float, float]]:
    """(loop time, deadline) of each call of a timer armed `deadline_in` ahead."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_in
    calls: list[tuple[float, float]] = []
    timer = DeadlineTimer(lambda: calls.append((loop.time(), deadline)))
    timer.arm(deadline)
    await asyncio.sleep(wait)
    assert not timer.pending
    return calls


def test_under_uvloop_a_deadline_a_fraction_of_a_millisecond_ahead_fires_once_and_not_early() -> None:
    """uvloop rounds delays to whole milliseconds on a millisecond clock: before, such a
    deadline fired at once, again and again, each a pass over the core (85% of the membership
    core's timer runs at 32 hosts)."""
    uvloop = pytest.importorskip("uvloop")
    for ahead in (0.0001, 0.0004, 0.0009, 0.0031):
        calls = uvloop.run(fired_at(ahead))
        assert len(calls) == 1, ahead
        at, deadline = calls[0]
        assert at >= deadline


async def test_on_asyncio_too_it_fires_once_at_its_deadline() -> None:
    calls = await fired_at(0.0004)
    assert len(calls) == 1
    assert calls[0][0] >= calls[0][1]


async def test_the_same_deadline_again_is_no_change_and_cancel_stops_it() -> None:
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    timer = DeadlineTimer(lambda: calls.append(loop.time()))
    deadline = loop.time() + 0.02
    timer.arm(deadline)
    handle = timer._handle
    timer.arm(deadline)
    assert timer._handle is handle  # nothing re-made
    timer.arm(deadline + 0.01)  # moved: the old one is cancelled
    assert handle is not None
    assert handle.cancelled()
    timer.cancel()
    assert not timer.pending
    await asyncio.sleep(0.05)
    assert calls == []
    timer.arm(loop.time() + 0.01)  # armed again after a cancel
    await asyncio.sleep(0.05)
    assert len(calls) == 1
