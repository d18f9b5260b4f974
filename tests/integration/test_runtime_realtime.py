"""The runtime keeps the protocol ticking on a real event loop, in real time, over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from meshd.runtime import NodeRuntime
from tests.fakes import SentDatagrams, StandInCore

pytestmark = pytest.mark.integration


class ExplodingSocket:
    def sendto(self, data: bytes, addr: str) -> None:
        raise ValueError(f"cannot send to {addr}")


async def test_runtime_survives_core_exceptions() -> None:
    node = StandInCore([(b"hello", "127.0.0.1:9")], timer_in=0.02, fail_datagrams=True, fail_timers=1)
    sent = SentDatagrams()
    rt = NodeRuntime(node, udp=sent)  # type: ignore[arg-type]
    rt.start()
    rt.on_datagram(b"x", "127.0.0.1:1")  # the core raises: logged, counted, loop goes on
    assert rt.errors == 1
    assert (b"hello", "127.0.0.1:9") in sent.out  # outputs are still flushed
    await asyncio.sleep(0.2)
    assert node.timer_calls >= 3  # the timer is re-armed after a failing handle_timer
    assert rt.errors == 2
    await rt.close()


async def test_a_failing_send_does_not_stop_the_timer() -> None:
    node = StandInCore([(b"x", "h:\u00b2")], timer_in=0.02)  # an address a peer could make up
    rt = NodeRuntime(node, udp=ExplodingSocket())  # type: ignore[arg-type]
    rt.start()
    await asyncio.sleep(0.3)
    assert node.timer_calls >= 3
    assert rt.errors >= 3
    await rt.close()


async def test_the_udp_endpoint_counts_a_malformed_address() -> None:
    from meshd.net.udp import UDPEndpoint

    ep = UDPEndpoint(lambda data, addr: None)
    await ep.open("127.0.0.1", 0)
    try:
        ep.sendto(b"x", "h:\u00b2")
        assert ep.stats.send_errors == 1
    finally:
        ep.close()


class DueOnce(StandInCore):
    """A core with one deadline a fraction of a millisecond ahead, then none for an hour."""

    def __init__(self, due: float) -> None:
        super().__init__([])
        self.due = due
        self.early = 0

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        if now < self.due:
            self.early += 1

    def get_timer(self) -> float:
        return self.due if self.timer_calls == 0 else self.due + 3600.0


def test_a_timer_the_loop_fires_early_runs_the_core_once_at_its_deadline() -> None:
    """uvloop rounds delays to whole milliseconds on a millisecond clock: a deadline a fraction
    of one ahead fired at once, again and again, each a pass over the core (85% of all timer
    runs at 32 hosts). The core is called once, when its deadline has come."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> DueOnce:
        loop = asyncio.get_running_loop()
        core = DueOnce(loop.time() + 0.0004)
        rt = NodeRuntime(core)  # type: ignore[arg-type]
        rt.start()
        await asyncio.sleep(0.05)
        await rt.close()
        return core

    core = uvloop.run(run())
    assert core.timer_calls == 1
    assert core.early == 0
