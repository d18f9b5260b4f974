"""The runtime calls the daemon's persistence hook before any effect of a core call goes out."""

from __future__ import annotations

from meshd.runtime import NodeRuntime
from tests.fakes import SentDatagrams, StandInCore


async def test_before_effects_runs_before_the_datagrams_are_sent() -> None:
    core = StandInCore([(b"alive", "127.0.0.1:9")])
    sent = SentDatagrams()
    rt = NodeRuntime(core, udp=sent)  # type: ignore[arg-type]
    seen: list[int] = []
    rt.before_effects = lambda: seen.append(len(sent.out))
    rt.start()
    rt.on_datagram(b"x", "127.0.0.1:1")
    assert seen == [0, 0]  # called at start and for the datagram, each time before sending
    assert sent.out == [(b"alive", "127.0.0.1:9")]
    await rt.close()
