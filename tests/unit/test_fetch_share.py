"""Scarce sources shared out between a site's nodes (meshd.release.fetch._register_all)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import random
from pathlib import Path
from typing import Any

from meshd.core.counters import Counters
from meshd.core.effects import MemberView
from meshd.core.messages import MemberState
from meshd.core.swarm import Swarm, SwarmConfig, make_bitmap
from meshd.crypto import PublisherKey
from meshd.metrics import TransferStats
from meshd.release.announce import Announce, Member
from meshd.release.fetch import FetchDriver, ReleaseFetch
from meshd.release.manifest import Manifest
from meshd.release.publish import publish_tree
from meshd.release.store import ChunkStore


def release(tmp: Path) -> Manifest:
    src = tmp / "src" / "app.bin"
    src.parent.mkdir(parents=True)
    src.write_bytes(random.Random(3).randbytes(1_500_000))
    store = ChunkStore(tmp / "pub", fsync=False)
    return publish_tree(store, src, "app", "1.0", PublisherKey(bytes(range(32)))).manifest


def node(name: str, m: Manifest, have: int | None) -> Member:
    n = len(m.chunks)
    entries = {} if have is None else {m.release_id[:16]: Announce("app", "1.0", m.release_id[:16], have, n)}
    return Member(name, f"{name}:1", "s1", True, entries)


def driver(members: dict[str, Member]) -> FetchDriver:
    def unused(*_: Any) -> Any:
        raise AssertionError("no I/O in this test")

    return FetchDriver(
        name="me",
        site="s1",
        members=members,
        client=unused,  # type: ignore[arg-type]
        store=unused,  # type: ignore[arg-type]
        transfer=TransferStats(),
        counters=Counters(),
        swarm_config=SwarmConfig(),
        spawn=unused,
        now=lambda: 0.0,
        on_complete=unused,
        on_progress=unused,
    )


def site_of_three(
    tmp_path: Path, a_has: int
) -> tuple[Manifest, int, dict[str, Member], FetchDriver, ReleaseFetch]:
    """The publisher (complete), a (holding its first `a_has` chunks), b (nothing) and us."""
    m = release(tmp_path)
    ids = m.unique_chunks()
    n = len(ids)
    members = {"origin": node("origin", m, n), "a": node("a", m, a_has), "b": node("b", m, 0)}
    swarm = Swarm([(c, m.chunks[c]) for c in ids], [], random.Random(1), 0.0, SwarmConfig())
    return m, n, members, driver(members), ReleaseFetch(m, swarm, dict(m.chunks), 0.0)


def test_the_lone_seed_stays_cut_to_our_share_when_other_nodes_complete(tmp_path: Path) -> None:
    m, n, members, d, fetch = site_of_three(tmp_path, 0)
    fetch.peers.add("origin")
    fetch.raw["origin"] = None
    d._register_all(fetch)
    ours = make_bitmap(range(d._share(fetch)[1], n, 3), n)  # me, a, b: every third chunk
    assert d._share(fetch) == (3, 2)
    assert fetch.registered["origin"] == ours
    # a completes: it joins the complete holders; the publisher's uplink is still shared out as
    # before (same k, same share), and a serves the rest.
    members["a"] = node("a", m, n)
    fetch.peers.add("a")
    fetch.raw["a"] = None
    d._register_all(fetch)
    assert d._share(fetch) == (3, 2)
    assert fetch.registered["origin"] == ours
    assert fetch.registered["a"] is None  # all of it
    # a leaves: the group shrinks (its share must be fetched by someone).
    members["a"] = Member("a", "a:1", "s1", False, {})
    fetch.peers.discard("a")
    fetch.raw.pop("a")
    assert d._share(fetch) == (2, 1)


def test_news_of_one_peer_re_judges_all_only_when_the_share_changed(tmp_path: Path) -> None:
    _, n, members, d, fetch = site_of_three(tmp_path, 1)
    fetch.peers |= {"origin", "a"}
    fetch.raw.update({"origin": None, "a": make_bitmap([1], n)})
    d._register_all(fetch)
    assert fetch.registered["origin"] == make_bitmap(range(2, n, 3), n)  # a, b, me: third share
    fetch.raw["a"] = make_bitmap([1, 4], n)
    d._register_all(fetch, only="a")  # a's progress: only a is judged again
    assert fetch.registered["a"] == make_bitmap([1, 4], n)
    members["b"] = Member("b", "b:1", "s1", False, {})  # b died: the share changed
    d._register_all(fetch, only="b")
    assert fetch.registered["origin"] == make_bitmap(range(1, n, 2), n)  # a, me: half each


def test_a_suspect_member_keeps_its_share_and_stays_a_peer(tmp_path: Path) -> None:
    m, n, members, d, fetch = site_of_three(tmp_path, 1)
    fetch.peers |= {"origin", "a"}
    fetch.raw.update({"origin": None, "a": make_bitmap([1], n)})
    d._register_all(fetch)
    assert d._share(fetch) == (3, 2)
    rid16 = m.release_id[:16]
    bitmap = base64.b64encode(make_bitmap([1], n)).decode()
    meta = {"site": "s1", "rel:app": f"1.0 {rid16} 1/{n} #0", f"relbm:{rid16}": bitmap}
    view = MemberView("b", "", "b:1", MemberState.SUSPECT, 1, meta, 0.0)
    members["b"] = Member.from_view(view)  # busy, not dead: Lifeguard may clear it
    assert members["b"].up
    assert members["b"].entries  # what it announced still counts
    d._register_all(fetch, only="b")
    assert d._share(fetch) == (3, 2)  # nobody's share dealt again
    assert fetch.registered["origin"] == make_bitmap(range(2, n, 3), n)
    members["a"] = Member.from_view(dataclasses.replace(view, name="a", addr="a:1"))
    d._note_peer(fetch, members["a"])
    assert "a" in fetch.peers  # still asked
    members["b"] = Member.from_view(dataclasses.replace(view, state=MemberState.DEAD))
    assert not members["b"].up
    assert d._share(fetch) == (2, 1)  # dead: its share is dealt again


async def test_the_share_cut_is_lifted_on_a_stall_not_while_requests_are_in_flight(tmp_path: Path) -> None:
    m = release(tmp_path)
    ids = m.unique_chunks()
    d = driver({"origin": node("origin", m, len(ids)), "a": node("a", m, 0)})
    d.now = lambda: 100.0
    d._on_progress = lambda: None
    swarm = Swarm([(c, m.chunks[c]) for c in ids], [], random.Random(1), 0.0, SwarmConfig())
    fetch = ReleaseFetch(m, swarm, dict(m.chunks), 0.0, last_progress=90.0)  # 10 s without a chunk
    d.fetches[m.release_id] = fetch
    waiting = asyncio.get_running_loop().create_future()
    fetch.net_phase[1] = waiting  # type: ignore[assignment]  # a first piece still coming
    d._on_tick(fetch)
    assert not fetch.widened
    fetch.net_phase.clear()  # it ended (at its deadline at the latest) and nothing came
    d._on_tick(fetch)
    assert fetch.widened
    d._close_fetch(fetch)
    waiting.cancel()


async def test_members_news_is_judged_in_one_pass_on_a_timer(tmp_path: Path) -> None:
    m = release(tmp_path)
    ids = m.unique_chunks()
    n = len(ids)
    members = {"origin": node("origin", m, n), **{f"p{i}": node(f"p{i}", m, 0) for i in range(8)}}
    d = driver(members)
    sent: list[Any] = []

    def spawn(coro: Any) -> Any:
        coro.close()  # no I/O here: the requests are what is checked
        sent.append(coro)
        return asyncio.get_running_loop().create_future()

    d._spawn = spawn
    d._on_progress = lambda: None
    d.start(m, ids)
    fetch = d.fetches[m.release_id]
    passes: list[float] = []
    shares: list[int] = []
    real_schedule, real_share = fetch.swarm._schedule, d._share

    def counting_schedule(now: float) -> None:
        passes.append(now)
        real_schedule(now)

    def counting_share(f: ReleaseFetch) -> tuple[int, int]:
        shares.append(1)
        return real_share(f)

    fetch.swarm._schedule = counting_schedule  # type: ignore[method-assign]
    d._share = counting_share  # type: ignore[method-assign,assignment]
    flushed: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
    real_flush = d.flush

    def counting_flush(f: ReleaseFetch) -> None:
        passes.clear()
        shares.clear()
        real_flush(f)
        flushed.set_result((len(passes), len(shares)))

    d.flush = counting_flush  # type: ignore[method-assign,assignment]
    before = len(sent)
    # Every fetching member announces progress (its bitmap rides along): nothing is judged yet.
    for i in range(8):
        have = [i, i + 8]
        entry = Announce("app", "1.0", m.release_id[:16], len(have), n)
        members[f"p{i}"] = Member(
            f"p{i}",
            f"p{i}:1",
            "s1",
            True,
            {m.release_id[:16]: entry},
            bitmaps={m.release_id[:16]: make_bitmap(have, n)},
        )
        d.member_changed(members[f"p{i}"])
    assert passes == []
    assert shares == []
    assert fetch.flush is not None
    # No further event comes: the timer alone judges the eight, with one pass of each kind.
    assert await asyncio.wait_for(flushed, 5.0) == (1, 1)
    assert fetch.flush is None
    assert not fetch.news
    assert all(fetch.registered[f"p{i}"] == make_bitmap([i, i + 8], n) for i in range(8))
    assert len(sent) > before  # the partial holders were asked at once in that pass
    d._close_fetch(fetch)
