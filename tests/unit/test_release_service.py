"""ReleaseService without a network: its decisions, views and pieces, driven directly.

No sockets and no sleeps: a peer is a stand-in for the PeerFetcher that answers from another
node's chunk store, and the test waits for the service's own tasks, not for the clock. The
same service over real aiohttp peers on 127.0.0.1 is tests/integration/test_release_mesh.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meshd.core.adoption import DISCOVER_RETRY, REJECT_RETRY, Offer
from meshd.core.messages import MemberState
from meshd.core.node import MemberView
from meshd.core.swarm import bitmap_indices, make_bitmap
from meshd.crypto import PublisherKey
from meshd.errors import ConfigError
from meshd.metrics import Exposition, Histograms
from meshd.release.announce import (
    MAX_GOSSIP_BITMAP_CHUNKS,
    PROGRESS_RATE,
    Announce,
    Announcer,
    OfferIndex,
    format_bitmaps,
    member_meta_keys,
    parse_announcements,
    parse_bitmaps,
    progress_interval,
)
from meshd.release.config import DistConfig
from meshd.release.manifest import Manifest
from meshd.release.peer import PeerProtocolError, UploadBusy, decode_piece, encode_piece
from meshd.release.publish import publish_tree
from meshd.release.serve import MAX_STORED, TokenBucket, UploadSlots
from meshd.release.service import ReleaseService
from meshd.release.store import ChunkStore
from meshd.units import parse_rate, parse_size
from meshd.wire import Codec
from tests.fakes import Midpoint, member, rot_chunk
from tests.metrics_text import sample

CLUSTER = "dtest"
PUB = PublisherKey(bytes(range(32)))
EVIL = PublisherKey(bytes(range(1, 33)))


def make_service(
    root: Path,
    *,
    site: str = "a",
    tags: dict[str, str] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> ReleaseService:
    return ReleaseService(
        root,
        name="me",
        site=site,
        tags=tags or {},
        codec=Codec(CLUSTER, None),
        trusted=[PUB.public_key],
        config=DistConfig(fsync=False),
        emit=events.append if events is not None else None,
    )


def make_release(
    tmp: Path,
    version: str,
    *,
    signer: PublisherKey = PUB,
    seed: int = 1,
    created: float = 1_700_000_000.0,
    site: str | None = None,
    store: ChunkStore | None = None,
) -> Manifest:
    """A signed release of 'app' whose chunks go to `store` (a peer's), or nowhere."""
    src = tmp / f"src-{version}-{seed}" / "app.bin"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(random.Random(seed).randbytes(200_000))
    store = store or ChunkStore(tmp / f"scratch-{version}-{seed}", fsync=False)
    return publish_tree(store, src, "app", version, signer, created=created, site=site).manifest


class StoreBackedFetcher:
    """Stands in for PeerFetcher: every peer answers from `store`."""

    def __init__(self, store: ChunkStore, manifests: dict[str, bytes]) -> None:
        self.store = store
        self.manifests = manifests
        self.asked: list[str] = []

    async def manifest(self, addr: str, rid: str, timeout: float = 10.0, *, to: str = "") -> bytes | None:
        self.asked.append(rid)
        return next((doc for full, doc in self.manifests.items() if full.startswith(rid)), None)

    async def chunks(
        self,
        addr: str,
        ids: Sequence[str],
        sizes: Sequence[int],
        timeout: float,
        *,
        to: str = "",
        on_data: Callable[[], None] | None = None,
    ) -> list[bytes | None]:
        return [self.store.get_stored(c) for c in ids]

    async def close(self) -> None:
        return None


async def settle(svc: ReleaseService) -> None:
    """Until the service's tasks (discovery, fetching, activation) have all ended."""
    while svc._tasks:
        await asyncio.gather(*list(svc._tasks), return_exceptions=True)


def announcing(name: str, m: Manifest, have: int | None = None) -> MemberView:
    n = len(m.chunks)
    entry = Announce(m.name, m.version, m.release_id[:16], n if have is None else have, n)
    return member(name, node_id=name, addr=f"{name}:1", meta={"site": "a", "rel:app": entry.text()})


# --- discovery, adoption, completion, through the service's inputs ---------------------------------


async def test_announced_release_is_discovered_fetched_and_activated(tmp_path: Path) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", store=peer_store)
    events: list[dict[str, Any]] = []
    svc = make_service(tmp_path / "me", events=events)
    fake = StoreBackedFetcher(peer_store, {m.release_id: m.to_bytes()})
    svc.fetcher = svc.driver.client = svc.intake.client = fake  # type: ignore[assignment]
    await svc.start()
    try:
        svc.member_update(announcing("p", m, have=0))  # nothing to get from it yet
        assert fake.asked == []
        assert not svc._tasks
        svc.member_update(announcing("p", m))
        svc.member_update(announcing("p", m))  # one discovery at a time
        await settle(svc)
        assert fake.asked == [m.release_id[:16]]
        row = svc.releases()[0]
        assert row["state"] == "active"
        assert row["current"]
        assert row["have_chunks"] == row["chunks"]
        assert [e["state"] for e in events] == ["downloading", "complete", "active"]
        assert (tmp_path / "me" / "releases" / "app" / "current" / "app.bin").is_file()
        assert parse_announcements(svc.announcements())[m.release_id[:16]].current
        svc.member_update(announcing("p", m))  # known now: not asked for again
        assert fake.asked == [m.release_id[:16]]
    finally:
        await svc.stop()


async def test_unanswered_manifest_is_asked_again_after_the_back_off(tmp_path: Path) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", store=peer_store)
    svc = make_service(tmp_path / "me")
    fake = StoreBackedFetcher(peer_store, {})  # answers 404
    svc.fetcher = svc.driver.client = svc.intake.client = fake  # type: ignore[assignment]
    clock = [100.0]
    svc.now = svc.intake.now = lambda: clock[0]  # type: ignore[method-assign]
    await svc.start()
    try:
        svc.policy.rng = Midpoint()
        svc.member_update(announcing("p", m))
        await settle(svc)
        rid16 = m.release_id[:16]
        assert svc.policy.retry_at[rid16] == 100.0 + DISCOVER_RETRY
        assert svc.policy.next_deadline(100.0) == 100.0 + DISCOVER_RETRY
        clock[0] = 100.0 + DISCOVER_RETRY - 0.1
        svc.member_update(announcing("p", m))  # within the back-off: not asked
        assert fake.asked == [rid16]
        # No member event comes again (a quiet mesh): the intake's own timer retries.
        assert svc.intake._timer is not None
        assert svc.intake._timer_at == 100.0 + DISCOVER_RETRY
        clock[0] = 100.0 + DISCOVER_RETRY
        svc.intake._on_timer()
        await settle(svc)
        assert fake.asked == [rid16, rid16]
        assert svc.policy.retry_at[rid16] == clock[0] + 2 * DISCOVER_RETRY  # doubled
        assert svc.intake._timer_at == clock[0] + 2 * DISCOVER_RETRY
    finally:
        await svc.stop()


def test_manifest_judgement_is_counted(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    svc = make_service(tmp_path / "me", site="a", events=events)
    good = make_release(tmp_path, "2.0", created=1_700_000_100.0)
    svc.intake.now = lambda: 50.0
    svc.policy.rng = Midpoint()
    assert svc.intake.check(b"not json", "0" * 16, "p") is None
    assert svc.counters["manifests.invalid"] == 1
    assert svc.policy.retry_at["0" * 16] == 50.0 + REJECT_RETRY
    assert svc.intake.check(good.to_bytes(), "f" * 16, "p") is None  # not the release announced
    assert svc.counters["manifests.invalid"] == 2
    evil = make_release(tmp_path, "6.6", signer=EVIL)
    assert svc.intake.check(evil.to_bytes(), evil.release_id[:16], "p") is None
    assert svc.counters["manifests.refused"] == 1
    assert events[-1]["state"] == "refused"
    elsewhere = make_release(tmp_path, "3.0", site="b")
    assert svc.intake.check(elsewhere.to_bytes(), elsewhere.release_id[:16], "p") is None
    assert svc.counters["releases.ignored"] == 1
    assert svc.status()["ignored"] == 1
    svc._manifests[good.release_id] = good
    twin = make_release(tmp_path, "2.0", seed=2)  # same version, other content
    assert svc.intake.check(twin.to_bytes(), twin.release_id[:16], "p") is None
    assert svc.counters["releases.conflict"] == 1
    assert svc.status()["ignored"] == 2
    fine = make_release(tmp_path, "2.1", seed=3)
    got = svc.intake.check(fine.to_bytes(), fine.release_id[:16], "p")
    assert got is not None
    assert got.release_id == fine.release_id


# --- what peers are served, and metrics ----------------------------------------------------------


async def test_served_manifests_and_bitmaps(tmp_path: Path) -> None:
    svc = make_service(tmp_path / "me")
    m = make_release(tmp_path, "1.0", store=svc.store)
    svc._manifests[m.release_id] = m
    server = svc.server
    assert server.manifest_document(m.release_id[:16]) == m.to_bytes()  # a prefix will do
    assert server.manifest_document("ab" * 8) is None
    assert server.bitmap(m.release_id) is None  # not complete: nothing to serve yet
    svc._complete.add(m.release_id)
    n = len(m.chunks)
    assert server.bitmap(m.release_id) == bytes([0xFF] * (n // 8)) + (
        bytes([(0xFF << (8 - n % 8)) & 0xFF]) if n % 8 else b""
    )
    ids = list(m.unique_chunks())[:2]
    asked = [*ids, "0" * 64]
    body = await server.read_piece(asked, 7)
    assert body[:7] == bytes(7)  # room for the envelope's header
    assert [bytes(e) if e is not None else None for e in decode_piece(memoryview(body)[7:], len(asked))] == [
        svc.store.get_stored(c) for c in ids
    ] + [None]


async def test_a_piece_is_read_into_one_buffer_leaving_out_what_is_rotten_or_gone(tmp_path: Path) -> None:
    svc = make_service(tmp_path / "me")
    m = make_release(tmp_path, "1.0", store=svc.store)
    ids = list(m.unique_chunks())[:4]
    good = svc.store.get_stored(ids[0])
    rot_chunk(svc.store, ids[1])
    svc.store.delete(ids[2])
    big = svc.store.path_for(ids[2])
    big.parent.mkdir(exist_ok=True)
    big.write_bytes(bytes(MAX_STORED + 1))  # no chunk is that big
    svc.store.delete(ids[3])
    body = await svc.server.read_piece(ids, 9)
    entries = decode_piece(memoryview(body)[9:], len(ids))
    assert entries[0] is not None
    assert bytes(entries[0]) == good
    assert entries[1:] == [None, None, None]
    assert not svc.store.has(ids[1])  # dropped: fetched again
    assert not svc.store.has(ids[2])
    assert svc.store.counters["chunks.damaged"] == 2
    assert svc.counters["store.damaged"] == 2


async def test_a_chunk_collected_between_its_size_and_its_read_is_left_out(tmp_path: Path) -> None:
    svc = make_service(tmp_path / "me")
    m = make_release(tmp_path, "1.0", store=svc.store)
    ids = list(m.unique_chunks())[:3]
    want = [svc.store.get_stored(c) for c in ids]
    read_into = svc.store.read_stored_into

    def gone_at_read(cid: str, span: memoryview) -> None:
        if cid == ids[1]:
            svc.store.delete(cid)  # the collector ran between the two passes
        read_into(cid, span)

    svc.store.read_stored_into = gone_at_read  # type: ignore[method-assign]
    body = await svc.server.read_piece(ids, 5)
    entries = decode_piece(memoryview(body)[5:], len(ids))
    assert [bytes(e) if e is not None else None for e in entries] == [want[0], None, want[2]]
    assert svc.store.counters["chunks.damaged"] == 0  # gone is not rotten


async def test_uploads_in_flight_are_bounded_whoever_asks(tmp_path: Path) -> None:
    server = make_service(tmp_path / "me").server
    server.gate = UploadSlots(running=2, waiting=1)
    release = asyncio.Event()
    entered: list[str] = []

    async def upload(src: str) -> None:
        async with server.upload_slot(src):
            entered.append(src)
            await release.wait()

    tasks = [asyncio.create_task(upload(f"198.18.0.{i}")) for i in (1, 2, 3)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert entered == ["198.18.0.1", "198.18.0.2"]  # three sources, two at once; one waits
    with pytest.raises(UploadBusy):
        async with server.upload_slot("198.18.0.4"):
            pass
    release.set()
    await asyncio.gather(*tasks)
    assert entered == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]


def test_collect_metrics_names(tmp_path: Path) -> None:
    svc = make_service(tmp_path / "me")
    svc.counters.inc("manifests.refused")
    out = Exposition()
    svc.collect_metrics(out)
    text = out.render()
    assert sample(text, "meshd_dist_manifests_refused_total") == 1, text


# --- small pieces ----------------------------------------------------------------------------------


def test_piece_encoding_round_trip_and_bounds() -> None:
    piece = encode_piece([b"\x00one", None, b"\x00three"])
    assert decode_piece(piece, 3) == [b"\x00one", None, b"\x00three"]
    with pytest.raises(PeerProtocolError, match="asked for"):
        decode_piece(piece, 2)
    with pytest.raises(PeerProtocolError, match="truncated"):
        decode_piece(piece[:-1], 3)
    with pytest.raises(PeerProtocolError, match="oversized"):
        decode_piece(piece + b"x", 3)
    with pytest.raises(PeerProtocolError, match="header"):
        decode_piece(b"XXXX", 1)


def test_announcements_parse_and_skip_garbage() -> None:
    meta = {
        "site": "a",
        "rel:app": "1.0 0123456789abcdef 10/10 current;1.1 fedcba9876543210 3/12",
        "rel:bad": "1.0 nothex 1/2;2.0 0123456789abcdeg 1/1;3.0 00000000000000aa 5/4",
        "rel:x": "",
    }
    ann = parse_announcements(meta)
    assert set(ann) == {"0123456789abcdef", "fedcba9876543210"}
    a = ann["0123456789abcdef"]
    assert a.complete
    assert a.current
    assert a.name == "app"
    assert a.version == "1.0"
    b = ann["fedcba9876543210"]
    assert not b.complete
    assert not b.current
    assert (b.have, b.total) == (3, 12)
    assert parse_announcements({"rel:app": a.text()}) == {a.rid16: a}
    assert a.seq == 0  # an entry from before seq was announced


def test_gossiped_bitmaps_round_trip_and_skip_garbage() -> None:
    bm = make_bitmap([0, 5, 9], 10)
    keys = format_bitmaps(
        {"0123456789abcdef" + "0" * 48: bm, "f" * 64: bytes(MAX_GOSSIP_BITMAP_CHUNKS // 8 + 1)}
    )
    assert list(keys) == ["relbm:0123456789abcdef"]  # too large a release: polled instead
    meta = {
        **keys,
        "relbm:0123456789abcdeX": keys["relbm:0123456789abcdef"],  # not a release id
        "relbm:00000000000000aa": "not base64!",
        "relbm:00000000000000bb": "A" * 4000,  # over the bound
        "rel:app": "1.0 0123456789abcdef 3/10",
    }
    assert parse_bitmaps(meta) == {"0123456789abcdef": bm}


class GossipOnlyFetcher(StoreBackedFetcher):
    """A peer that is never polled for its bitmap (what it holds comes with its metadata)."""

    def __init__(self, store: ChunkStore, manifests: dict[str, bytes]) -> None:
        super().__init__(store, manifests)
        self.bitmap_gets = 0
        self.chunks_asked: list[str] = []

    async def bitmap(
        self, addr: str, rid: str, n: int, timeout: float = 5.0, *, to: str = ""
    ) -> bytes | None:
        self.bitmap_gets += 1
        return None

    async def chunks(
        self,
        addr: str,
        ids: Sequence[str],
        sizes: Sequence[int],
        timeout: float,
        *,
        to: str = "",
        on_data: Callable[[], None] | None = None,
    ) -> list[bytes | None]:
        self.chunks_asked.extend(ids)
        return await super().chunks(addr, ids, sizes, timeout, to=to, on_data=on_data)


async def test_a_partial_holder_is_fetched_from_by_its_gossiped_bitmap_without_polling(
    tmp_path: Path,
) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", store=peer_store)
    ids = m.unique_chunks()
    n = len(ids)
    held = [0, 2, 3]
    svc = make_service(tmp_path / "me")
    fake = GossipOnlyFetcher(peer_store, {m.release_id: m.to_bytes()})
    svc.fetcher = svc.driver.client = svc.intake.client = fake  # type: ignore[assignment]
    await svc.start()
    try:
        view = announcing("p", m, have=len(held))
        view.meta.update(format_bitmaps({m.release_id: make_bitmap(held, n)}))
        svc.member_update(view)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if svc.releases() and svc.releases()[0]["have_chunks"] == len(held):
                break
        assert fake.bitmap_gets == 0
        assert sorted(fake.chunks_asked) == sorted(ids[i] for i in held)
        # And we gossip ours while fetching: what we now hold, for our peers to fetch from.
        mine = parse_bitmaps(svc.announcements())[m.release_id[:16]]
        assert bitmap_indices(mine, n) == set(held)
    finally:
        await svc.stop()


def test_announcements_carry_the_seq_and_the_index_offers_the_newest() -> None:
    mine = Announce("app", "2.0", "2" * 16, 3, 10, seq=7)
    assert mine.text() == "2.0 2222222222222222 3/10 #7"
    assert parse_announcements({"rel:app": mine.text()}) == {mine.rid16: mine}
    index = OfferIndex()
    old = Announce("app", "1.0", "1" * 16, 10, 10, current=True, seq=6)
    assert index.update("p", {old.rid16: old, mine.rid16: mine}) == {"app"}
    assert index.update("q", {old.rid16: old}) == {"app"}
    assert index.update("q", {old.rid16: old}) == set()  # nothing changed: nothing to look at
    offers = {o.rid16: o for o in index.offers("app")}
    assert offers[mine.rid16] == Offer("app", "2.0", 7, mine.rid16, 3)
    assert index.holders("app", old.rid16) == ["p", "q"]
    assert index.max_seq("app") == 7
    assert index.update("p", {}) == {"app"}  # p left
    assert [o.rid16 for o in index.offers("app")] == [old.rid16]
    assert index.update("q", {}) == {"app"}
    assert index.names() == []
    assert index.max_seq("app") == 7  # its holders left; a publisher still goes above it


def test_progress_alone_changes_no_offer_but_the_holders_order() -> None:
    index = OfferIndex()
    rid = "3" * 16
    assert index.update("p", {rid: Announce("app", "3.0", rid, 0, 10, seq=8)}) == {"app"}
    # Nothing yet to some: the intake may fetch the manifest now.
    assert index.update("p", {rid: Announce("app", "3.0", rid, 2, 10, seq=8)}) == {"app"}
    assert index.update("q", {rid: Announce("app", "3.0", rid, 3, 10, seq=8)}) == {"app"}
    # More chunks (each fetching member, every second): nothing to judge again...
    assert index.update("p", {rid: Announce("app", "3.0", rid, 9, 10, seq=8)}) == set()
    # ...but what is held is kept, for the manifest's source and the offer.
    assert index.holders("app", rid) == ["p", "q"]
    assert index.offers("app") == [Offer("app", "3.0", 8, rid, 9)]
    # Done and current, or dropped to nothing: judged again.
    assert index.update("p", {rid: Announce("app", "3.0", rid, 10, 10, current=True, seq=8)}) == {"app"}
    assert index.update("q", {rid: Announce("app", "3.0", rid, 0, 10, seq=8)}) == {"app"}


async def test_two_releases_completing_together_activate_one_at_a_time_newest_last(tmp_path: Path) -> None:
    # Before: both activated in parallel threads and the older one could end current.
    for first in ("older", "newer"):
        events: list[dict[str, Any]] = []
        root = tmp_path / first
        svc = make_service(root, events=events)
        svc.releases_dir.hook = ["/bin/sh", "-c", "sleep 0.2"]  # a window for the race
        await svc.start()
        try:
            ms = []
            for version, seq in (("2.0", 2), ("3.0", 3)):
                src = tmp_path / f"src-{first}-{version}" / "app.bin"
                src.parent.mkdir(parents=True, exist_ok=True)
                src.write_bytes(random.Random(seq).randbytes(100_000))
                m = publish_tree(svc.store, src, "app", version, PUB, seq=seq).manifest
                svc._manifests[m.release_id] = m
                svc._complete.add(m.release_id)
                ms.append(m)
            order = ms if first == "older" else ms[::-1]
            await asyncio.gather(*(svc._maybe_activate(m) for m in order))
            assert [e["version"] for e in events if e["state"] == "active"] == ["3.0"]
            assert svc.releases_dir.current("app") == "3.0"
            assert svc.counters["releases.superseded"] == 1
            await svc._maybe_activate(ms[0])  # completing later changes nothing
            assert svc.releases_dir.current("app") == "3.0"
        finally:
            await svc.stop()


def test_rates_and_dist_config() -> None:
    assert parse_rate("10MB", "x") == 10_000_000
    assert parse_rate("5MiB/s", "x") == 5 * 1024 * 1024
    assert parse_rate("100mbit", "x") == 12_500_000
    assert parse_rate(2048, "x") == 2048
    assert parse_rate(0, "x") is None
    assert parse_rate("", "x") is None
    with pytest.raises(ConfigError, match="rate"):
        parse_rate("fast", "x")
    cfg = DistConfig.from_table(
        {
            "keep": 2,
            "hook": ["/bin/true", "x"],
            "hook-timeout": "30s",
            "upload_rate": "1MB",
            "origin_delay": "500ms",
            "min-free": "1GiB",
        }
    )
    assert cfg.min_free == 1024**3
    assert DistConfig().min_free == 32 * 1024 * 1024
    assert parse_size("32MiB", "x") == 32 * 1024 * 1024
    assert parse_size("1.5GB", "x") == 1_500_000_000
    assert parse_size("500k", "x") == 500_000
    assert parse_size(0, "x") == 0
    for bad_size in ("lots", "-1MB", True, "10mbit"):
        with pytest.raises(ConfigError, match="size"):
            parse_size(bad_size, "x")
    assert cfg.keep == 2
    assert cfg.hook == ("/bin/true", "x")
    assert cfg.hook_timeout == 30.0
    assert cfg.upload_rate == 1_000_000
    assert cfg.origin_delay == 0.5
    assert cfg.download_rate is None
    assert cfg.swarm_config().origin_delay == 0.5
    for bad in ({"keep": 0}, {"hook": 3}, {"nope": 1}, {"fsync": "yes"}, {"min_free": "much"}):
        with pytest.raises(ConfigError):
            DistConfig.from_table(bad)


async def test_upload_token_bucket_paces() -> None:
    clock = [0.0]
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)
        clock[0] += d

    bucket = TokenBucket(1000.0, burst=1000.0, clock=lambda: clock[0], sleep=sleep)
    await bucket.take(1000)
    assert slept == []
    await bucket.take(500)
    assert slept == [pytest.approx(0.5)]
    await TokenBucket(None).take(10**9)  # unlimited never waits


def test_store_of_a_fresh_service_is_usable(tmp_path: Path) -> None:
    # The service builds its store lazily in the data dir (chunks/, manifests/, releases/).
    ReleaseService(tmp_path, name="x", site="a", tags={}, codec=Codec(CLUSTER, None))
    assert (tmp_path / "chunks").is_dir()
    assert (tmp_path / "releases").is_dir()
    assert ChunkStore(tmp_path).manifests() == []


async def test_announcer_sends_changes_at_once_when_forced_else_once_per_interval() -> None:
    sent: list[dict[str, str | None]] = []
    wanted = {"rel:app": "1.0 0123456789abcdef 1/4"}
    clock = [10.0]
    ann = Announcer(sent.append, 1.0, lambda: dict(wanted), lambda: clock[0])
    ann.announce(force=True)
    assert sent == []  # not running before the service starts
    ann.running = True
    ann.announce()
    assert sent == [{"rel:app": "1.0 0123456789abcdef 1/4"}]
    wanted["rel:app"] = "1.0 0123456789abcdef 2/4"
    clock[0] = 10.5
    ann.announce()  # within the interval: held back (a timer would send it)
    assert len(sent) == 1
    wanted.clear()
    ann.announce(force=True)
    assert sent[1:] == [{"rel:app": None}]  # the key goes away
    ann.announce(force=True)
    assert len(sent) == 2  # nothing changed
    ann.close()


def test_progress_is_announced_less_often_when_many_nodes_fetch(tmp_path: Path) -> None:
    m = make_release(tmp_path, "1.0", store=ChunkStore(tmp_path / "peer", fsync=False))
    svc = make_service(tmp_path / "me")
    interval = svc.announcer.interval
    assert callable(interval)
    assert interval() == 1.0  # alone: the configured interval
    for i in range(31):  # 31 members fetching, and we: 32 announcing progress
        svc.member_update(announcing(f"p{i}", m, have=i % 3))
    assert interval() == pytest.approx(32 / PROGRESS_RATE)
    assert interval() > 1.0
    for i in range(16):  # half of them died mid-fetch: their entries stay, they announce nothing
        svc.member_update(dataclasses.replace(announcing(f"p{i}", m, have=1), state=MemberState.DEAD))
    assert interval() == pytest.approx(16 / PROGRESS_RATE)
    for i in range(31):  # they completed: holders announce no progress
        svc.member_update(announcing(f"p{i}", m))
    assert interval() == 1.0
    assert progress_interval(1.0, 8) == 1.0
    assert progress_interval(0.5, 64) == pytest.approx(64 / PROGRESS_RATE)
    assert progress_interval(0.5, 64) > 0.5


def test_member_meta_keys() -> None:
    assert member_meta_keys({"site": "a", "rel:app": "x", "tag:role": "pos"}) == ["rel:app"]


@pytest.mark.parametrize(("my_site", "source"), [("a", "site"), ("b", "remote_site")])
async def test_release_bytes_are_counted_by_source_and_timed(
    tmp_path: Path, my_site: str, source: str
) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", store=peer_store)
    registry = CollectorRegistry()
    svc = ReleaseService(
        tmp_path / "me",
        name="me",
        site=my_site,
        tags={},
        codec=Codec(CLUSTER, None),
        trusted=[PUB.public_key],
        config=DistConfig(fsync=False),
        histograms=Histograms(registry),
    )
    fake = StoreBackedFetcher(peer_store, {m.release_id: m.to_bytes()})
    svc.fetcher = svc.driver.client = svc.intake.client = fake  # type: ignore[assignment]
    await svc.start()
    try:
        svc.member_update(announcing("p", m))  # p is in site "a"
        await settle(svc)
        row = svc.releases()[0]
        assert row["state"] == "active"
        got = svc.transfer.received_bytes
        assert got > 0
        assert row["bytes"] == {"site": 0, "remote_site": 0, "origin": 0} | {source: got}
        out = Exposition()
        svc.collect_metrics(out)
        text = out.render()
        rid16 = m.release_id[:16]
        assert sample(text, "meshd_release_received_bytes_total", release=rid16, source=source) == got
        assert sample(text, "meshd_release_received_bytes_total", release=rid16, source="origin") == 0
        labels = {"release": rid16, "name": "app", "version": "1.0"}
        assert sample(text, "meshd_release_chunks", **labels) == len(m.chunks)
        assert sample(text, "meshd_release_chunks_stored", **labels) == len(m.chunks)
        assert sample(text, "meshd_release_progress_ratio", **labels) == 1.0
        timed = generate_latest(registry).decode()
        assert (sample(timed, "meshd_chunk_fetch_seconds_count", source=source) or 0) >= 1
        other = "remote_site" if source == "site" else "site"
        assert sample(timed, "meshd_chunk_fetch_seconds_count", source=other) == 0
        assert sample(timed, "meshd_activation_seconds_count") == 1
        # A release no longer held (its manifest retired, then collected) leaves the metric.
        svc.store.delete_manifest(m.release_id)
        await svc.collect_garbage()
        out = Exposition()
        svc.collect_metrics(out)
        assert (
            sample(out.render(), "meshd_release_received_bytes_total", release=rid16, source=source) is None
        )
        assert svc.transfer.by_release == {}
    finally:
        await svc.stop()
