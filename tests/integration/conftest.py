"""Fixtures for the integration tests: a Mesh of `meshd run` processes, in-process nodes on
loopback. The helpers themselves live in tests/processes.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshd.api.app import create_api_app
from tests.fakes import FakeAgent
from tests.processes import InProcessStarter, Mesh, free_port


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.stop_all()


@pytest.fixture
def port_factory() -> Callable[[], int]:
    """free_port, for tests that bind sockets themselves."""
    return free_port


@pytest.fixture
async def in_process_node() -> AsyncIterator[InProcessStarter]:
    """Start a core node with its runtime, UDP socket and peer HTTP app in this process, on a
    free loopback port: `rt = await in_process_node("r1", meta={...})`. Stopped afterwards."""
    import asyncio
    import random

    from meshd.core.config import LOCAL
    from meshd.core.node import Node
    from meshd.net.peer_http import PeerServer, create_peer_app
    from meshd.net.udp import UDPEndpoint
    from meshd.runtime import NodeRuntime
    from meshd.wire import Codec

    started: list[tuple[NodeRuntime, PeerServer]] = []

    async def start(name: str, meta: dict[str, str] | None = None) -> NodeRuntime:
        port = free_port()
        node = Node(
            name,
            name * 8,
            f"127.0.0.1:{port}",
            LOCAL,
            Codec("t", None),
            random.Random(name),
            asyncio.get_running_loop().time(),
            meta,
        )
        rt = NodeRuntime(node)
        udp = UDPEndpoint(rt.on_datagram)
        await udp.open("127.0.0.1", port)
        rt.udp = udp
        server = PeerServer(create_peer_app(rt, node.codec))
        await server.start("127.0.0.1", port)
        rt.start()
        started.append((rt, server))
        return rt

    yield start
    for rt, server in started:
        if rt.udp is not None:
            rt.udp.close()
        await rt.close()
        await server.stop()


@pytest.fixture
async def client(agent: FakeAgent) -> AsyncIterator[TestClient]:
    """The operator API over an aiohttp test server, answered by the module's `agent` fixture."""
    async with TestClient(TestServer(create_api_app(agent))) as c:
        yield c
