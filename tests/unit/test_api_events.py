"""Event stream ids and resume (api/events.py): the replay ring, what a stream that comes back
with Last-Event-ID gets first, and the frames GET /v1/events opens with."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp.test_utils import make_mocked_request

from meshd.api.app import _last_event_id, _opening_frames, reset_frame, sse_frame
from meshd.api.events import READER_QUEUE, EventHub, EventLog
from meshd.core.messages import MemberState
from meshd.runtime import NodeEvent
from tests.fakes import FakeAgent, FakeEvent, member

N1 = member("n1")


def test_ids_count_up_within_a_run_and_name_it() -> None:
    log: EventLog[str] = EventLog("b00t")
    assert log.last_id == "b00t-0"
    assert [log.record(e) for e in "abc"] == ["b00t-1", "b00t-2", "b00t-3"]
    assert log.since("b00t-1") == [("b00t-2", "b"), ("b00t-3", "c")]
    assert log.since("b00t-3") == []
    assert log.since("b00t-0") == [("b00t-1", "a"), ("b00t-2", "b"), ("b00t-3", "c")]


def test_an_id_of_another_run_in_the_future_or_not_an_id_cannot_resume() -> None:
    log: EventLog[str] = EventLog("b00t")
    log.record("a")
    for other in ("0ther-1", "b00t-2", "b00t-x", "b00t-", "", "garbage", "b00t--1", "b00t-\u0661"):
        assert log.since(other) is None, other


def test_an_id_older_than_the_ring_cannot_resume_but_the_oldest_kept_can() -> None:
    log: EventLog[int] = EventLog("b", capacity=3)
    for i in range(1, 6):
        log.record(i)  # the ring keeps 3, 4, 5
    assert log.since("b-1") is None  # 2 is gone
    assert log.since("b-2") == [("b-3", 3), ("b-4", 4), ("b-5", 5)]


def test_ephemeral_events_are_numbered_but_not_kept() -> None:
    log: EventLog[str] = EventLog("b", capacity=2)
    log.record("a")
    stats = log.record("stats", replayable=False)
    log.record("b")
    assert stats == "b-2"
    assert log.since("b-0") == [("b-1", "a"), ("b-3", "b")]
    assert log.since(stats) == [("b-3", "b")]  # a client whose last event was a stats one
    for _ in range(5):
        log.record("stats", replayable=False)  # do not push the kept events out
    assert log.since("b-0") == [("b-1", "a"), ("b-3", "b")]


async def test_a_stream_that_comes_back_gets_what_it_missed_then_live_events() -> None:
    agent = FakeAgent()
    hub = EventHub(agent.subscribe, "b00t")
    first, opening = hub.open(None)
    assert opening.hello_id == "b00t-0"
    assert opening.backlog == []
    assert opening.reset is None
    assert len(agent.subs) == 1  # the hub's one subscription
    dead, left = FakeEvent("dead", member("n2", MemberState.DEAD)), FakeEvent("leave", N1)
    hub.deliver(dead)
    assert first.queue.get_nowait() == ("b00t-1", dead)
    hub.close_reader(first)  # the client goes away; events go on
    hub.deliver(left)
    second, opening = hub.open("b00t-1")
    assert opening.hello_id is None
    assert opening.reset is None
    assert opening.backlog == [("b00t-2", left)]
    hub.deliver(dead)
    assert second.queue.get_nowait() == ("b00t-3", dead)
    await hub.close()
    assert agent.subs == []


async def test_a_stream_from_another_run_starts_with_a_reset() -> None:
    hub = EventHub(FakeAgent().subscribe, "new")
    hub.deliver(FakeEvent("join", N1))
    _, opening = hub.open("old-41")
    assert opening.reset is not None
    assert opening.hello_id == "new-1"
    assert opening.backlog == []
    frames = _opening_frames(opening, "old-41")
    assert frames[0] == b"retry: 2000\n: meshd events\n\n"
    head, data = frames[1].split(b"\ndata: ")
    assert head == b"id: new-1\nevent: reset"
    assert orjson.loads(data)["last_event_id"] == "old-41"
    await hub.close()


async def test_stats_events_reach_open_streams_but_are_not_replayed() -> None:
    hub = EventHub(FakeAgent().subscribe, "b")
    reader, _ = hub.open(None)
    stats = NodeEvent("stats", None, {"sent_bytes": 1})
    hub.deliver(stats)
    assert reader.queue.get_nowait() == ("b-1", stats)
    _, opening = hub.open("b-0")
    assert opening.backlog == []
    await hub.close()


async def test_a_stream_that_falls_behind_is_marked_lost_not_grown() -> None:
    hub = EventHub(FakeAgent().subscribe, "b")
    reader, _ = hub.open(None)
    for _ in range(READER_QUEUE + 5):
        hub.deliver(FakeEvent("update", N1))
    assert reader.lost
    assert reader.queue.qsize() == READER_QUEUE
    await hub.close()


async def test_the_hub_pumps_the_agents_events_in_order() -> None:
    agent = FakeAgent()
    hub = EventHub(agent.subscribe, "b")
    reader, _ = hub.open(None)
    for kind in ("join", "leave"):
        agent.subs[0].queue.put_nowait(FakeEvent(kind, N1))
    got = [await asyncio.wait_for(reader.queue.get(), 5) for _ in range(2)]
    assert [(i, e.kind) for i, e in got] == [("b-1", "join"), ("b-2", "leave")]
    await hub.close()


async def test_frames_carry_their_ids_and_a_fresh_stream_its_position() -> None:
    frame = sse_frame(FakeEvent("dead", N1), "b-7")
    assert frame.startswith(b"id: b-7\nevent: member\ndata: ")
    assert sse_frame(NodeEvent("release", None, {"name": "app"}), "b-8").startswith(
        b"id: b-8\nevent: release\n"
    )
    hub = EventHub(FakeAgent().subscribe, "b")
    _, opening = hub.open(None)
    assert _opening_frames(opening, None) == [b"retry: 2000\nid: b-0\n: meshd events\n\n"]
    assert reset_frame("b-9", "x", "why").startswith(b"id: b-9\nevent: reset\ndata: ")
    await hub.close()


def test_where_a_client_got_to_comes_from_the_header_or_the_query() -> None:
    def asked(url: str, **headers: str) -> str | None:
        return _last_event_id(make_mocked_request("GET", url, headers=headers))

    assert asked("/v1/events") is None
    assert asked("/v1/events", **{"Last-Event-ID": "b-4"}) == "b-4"
    assert asked("/v1/events?last_event_id=b-2") == "b-2"  # EventSource's first connection
    assert asked("/v1/events?last_event_id=b-2", **{"Last-Event-ID": "b-5"}) == "b-5"  # a reconnection
    assert asked("/v1/events", **{"Last-Event-ID": "  "}) is None
    assert len(asked("/v1/events?last_event_id=" + "9" * 5000) or "") == 200  # bounded
