"""HealthService in the runtime: the summary is merged into the node's metadata (other keys
kept), a change raises a health event, the node answers its own queries through the runtime
(command checks and handlers run subprocesses)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest

from meshd.core.config import LAN
from meshd.core.messages import QueryFilter
from meshd.core.node import Node
from meshd.health.monitor import HealthMonitor
from meshd.health.service import HealthService
from meshd.health.spec import CheckSpec, HandlerSpec
from meshd.runtime import NodeEvent, NodeRuntime
from meshd.wire import Codec

pytestmark = pytest.mark.integration


def make_runtime(meta: dict[str, str]) -> NodeRuntime:
    loop = asyncio.get_running_loop()
    node = Node("solo", "id", "127.0.0.1:1", LAN, Codec("c", None), random.Random(1), loop.time(), meta=meta)
    return NodeRuntime(node)


async def test_summary_is_merged_into_meta_and_raises_an_event(tmp_path: Any) -> None:
    flag = tmp_path / "code"
    flag.write_text("0")
    check = CheckSpec("flag", "command", interval=0.1, timeout=5.0, command=f"exit $(cat {flag})")
    monitor = HealthMonitor([check], {"echo": HandlerSpec("echo", "cat")})
    runtime = make_runtime({"site": "factory", "tag:role": "gw", "rel:app": "4.2"})
    service = HealthService(monitor, "solo", "factory")
    service.attach(runtime)
    runtime.start()
    sub = runtime.subscribe()
    try:
        await service.start()
        assert runtime.node.meta == {
            "site": "factory",
            "tag:role": "gw",
            "rel:app": "4.2",
            "health": "passing",
        }
        # Another feature changes its own key meanwhile: the health update must keep it.
        runtime.set_meta({**runtime.node.meta, "rel:app": "4.3"})
        flag.write_text("2")
        event: Any = None
        while event is None or event.kind != "health" or event.payload["health"] != "critical":
            event = await asyncio.wait_for(sub.get(), 5)
        assert isinstance(event, NodeEvent)
        assert event.payload["name"] == "solo"
        assert event.payload["previous"] == "passing"
        assert event.member is not None
        assert event.member.meta["health"] == "critical"
        assert runtime.node.meta == {
            "site": "factory",
            "tag:role": "gw",
            "rel:app": "4.3",
            "health": "critical",
        }

        # A node asking alone answers itself: the result comes straight back.
        result = await runtime.ask("health", b"", QueryFilter(), 2.0)
        assert [a.name for a in result.responses] == ["solo"]
        assert not result.timed_out
        assert orjson.loads(result.responses[0].payload)["status"] == "critical"
        result = await runtime.ask("echo", b"hi", QueryFilter(), 2.0)
        assert orjson.loads(result.responses[0].payload)["output"] == "hi"
        result = await runtime.ask("nope", b"", QueryFilter(), 2.0)
        assert orjson.loads(result.responses[0].payload)["error"] == "no handler"
        # Nobody matches: complete at once, nothing missing.
        result = await runtime.ask("health", b"", QueryFilter(site="elsewhere"), 2.0)
        assert result.responses == ()
        assert result.missing == ()
        assert not result.timed_out
    finally:
        sub.close()
        await service.stop()
        await runtime.close()
