"""The runtime as the core's effect handler, without waiting on the clock or opening a socket.

Tests that let real time pass or use a real socket: tests/integration/test_runtime_realtime.py.
"""

from __future__ import annotations

import asyncio
import random

import orjson

from meshd.core.config import LOCAL
from meshd.core.messages import Query, QueryFilter, QueryResponse
from meshd.core.node import Node
from meshd.core.query import QueryAction
from meshd.metrics import Exposition
from meshd.runtime import MAX_ANSWERING, NodeRuntime
from meshd.wire import Codec, encode_message
from tests.fakes import SentDatagrams, StandInCore
from tests.metrics_text import sample

CODEC = Codec("t", None)


def node(name: str = "b") -> Node:
    return Node(
        name, f"id-{name}", f"{name}:1", LOCAL, CODEC, random.Random(1), asyncio.get_running_loop().time()
    )


async def test_a_core_exception_is_counted_and_what_it_queued_still_goes_out() -> None:
    core = StandInCore([(b"hello", "127.0.0.1:9")], fail_datagrams=True, fail_timers=1)
    sent = SentDatagrams()
    rt = NodeRuntime(core, udp=sent)  # type: ignore[arg-type]
    rt.start()
    rt.on_datagram(b"x", "127.0.0.1:1")  # the core raises: logged, counted, the pump still runs
    assert rt.errors == 1
    assert sent.out == [(b"hello", "127.0.0.1:9")]
    rt._on_timer()  # what the armed timer does when it fires: a failing core is counted too
    assert core.timer_calls == 1
    assert rt.errors == 2
    await rt.close()


async def test_one_unsendable_datagram_does_not_stop_the_others() -> None:
    core = StandInCore([(b"1", "bad:1"), (b"2", "good:1")], fail_datagrams=True)
    sent = SentDatagrams(fail_to="bad:1")
    rt = NodeRuntime(core, udp=sent)  # type: ignore[arg-type]
    rt.start()
    rt.on_datagram(b"x", "127.0.0.1:1")
    assert sent.out == [(b"2", "good:1")]
    assert rt.errors == 2  # the core's exception and the failed send
    await rt.close()


def query_packet(qid: int) -> bytes:
    return CODEC.pack([encode_message(Query(0, qid, "q", b"", "a", "127.0.0.1:1", QueryFilter(), 0, 5.0))])


async def test_a_busy_answer_goes_out_in_the_same_flush() -> None:
    b = node("b")
    sent = SentDatagrams()
    rt = NodeRuntime(b, udp=sent)  # type: ignore[arg-type]
    stuck = asyncio.Event()

    async def never(action: QueryAction) -> bytes:
        await stuck.wait()
        return b""

    rt.set_query_answerer(never)
    rt.start()
    for qid in range(MAX_ANSWERING):
        rt.on_datagram(query_packet(qid), "127.0.0.1:1")
    assert rt.queries_busy == 0
    assert sent.out == []
    rt.on_datagram(query_packet(999), "127.0.0.1:1")
    assert rt.queries_busy == 1
    [(data, addr)] = sent.out
    [answer] = CODEC.unpack(data)[:1]
    assert addr == "127.0.0.1:1"
    assert isinstance(answer, QueryResponse)
    assert answer.id == 999
    assert orjson.loads(answer.payload)["error"] == "busy"
    await rt.close()


async def test_ask_is_resolved_by_the_query_done_effect() -> None:
    a = node("a")
    rt = NodeRuntime(a)

    async def ok(action: QueryAction) -> bytes:
        return b"fine"

    rt.set_query_answerer(ok)
    rt.start()
    result = await rt.ask("q", b"", QueryFilter(), 5.0)
    assert [(r.name, r.payload) for r in result.responses] == [("a", b"fine")]
    assert not result.timed_out
    await rt.close()


async def test_collect_metrics_writes_membership_runtime_and_query_counts() -> None:
    a = node("a")
    rt = NodeRuntime(a)
    rt.start()
    rt.errors, rt.events_dropped, rt.queries_busy = 2, 3, 4
    a.counters.inc("drops.auth")
    a.queries.counters.inc("query.match")
    out = Exposition()
    rt.collect_metrics(out)
    text = out.render()
    for name, labels, value in [
        ("meshd_members", {"state": "alive"}, 1),
        ("meshd_members", {"state": "dead"}, 0),
        ("meshd_health_score", {}, 0),
        ("meshd_runtime_errors_total", {}, 2),
        ("meshd_events_dropped_total", {}, 3),
        ("meshd_event_subscribers", {}, 0),
        ("meshd_drops_auth_total", {}, 1),
        ("meshd_queries_query_match_total", {}, 1),
        ("meshd_queries_in_flight", {}, 0),
        ("meshd_queries_busy_total", {}, 4),
    ]:
        assert sample(text, name, **labels) == value, name
    assert sample(text, "meshd_broadcast_queue") is not None
    await rt.close()
