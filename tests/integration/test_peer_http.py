"""The peer TCP exchange over real loopback sockets: bodies much larger than one socket read."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshd.core.messages import MemberState
from meshd.net.peer_http import PeerClient, PeerServer, create_peer_app
from meshd.wire import Codec
from tests.processes import InProcessStarter

pytestmark = pytest.mark.integration


class Echo:
    def __init__(self, size: int) -> None:
        self.size = size

    def handle_stream(self, data: bytes, addr: str) -> bytes | None:
        return bytes(range(256)) * (self.size // 256)


async def test_a_multi_megabyte_reply_arrives_whole(port_factory: Callable[[], int]) -> None:
    port = port_factory()
    codec = Codec("t", None)
    server = PeerServer(create_peer_app(Echo(3 << 20), codec))
    await server.start("127.0.0.1", port)
    client = PeerClient(codec)
    try:
        reply = await client.exchange(f"127.0.0.1:{port}", b"hello", 10.0)
        assert reply is not None
        assert len(reply) == 3 << 20
        assert reply[:512] == bytes(range(256)) * 2
    finally:
        await client.close()
        await server.stop()


async def test_join_carries_metadata_far_larger_than_a_packet(in_process_node: InProcessStarter) -> None:
    big = {f"tag:k{i}": "v" * 200 for i in range(1000)}  # about 200 KB: 150 packets' worth
    big_rt = await in_process_node("big", meta=big)
    small_rt = await in_process_node("small")
    assert await small_rt.join([big_rt.node.addr]) == 1
    seen = small_rt.node.member("big")
    assert seen is not None
    assert seen.state == MemberState.ALIVE
    assert seen.meta == big
