"""Free space (meshd/release/space.py): what a release needs, who waits, who may go, and the
service that does not start a release that cannot fit and resumes when space returns.

No sockets and no sleeps: peers are stand-ins answering from another node's chunk store, the
free space is a number the test sets, and the test runs the gate's poll itself (the watch that
would run it every second is parked on a long interval).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from meshd.core.swarm import SwarmConfig
from meshd.crypto import PublisherKey
from meshd.release.announce import Announce
from meshd.release.config import DistConfig
from meshd.release.manifest import Manifest
from meshd.release.publish import publish_tree
from meshd.release.service import ReleaseService
from meshd.release.space import MiB, SpaceWaits, describe, space_needed
from meshd.release.store import ChunkStore, DiskFullError
from meshd.wire import Codec
from tests.fakes import FakeDisk, member, put_many_through, put_placed_through

PUB = PublisherKey(bytes(range(32)))
MARGIN = 1 * MiB


def make_release(tmp: Path, version: str, store: ChunkStore, size: int = 600_000) -> Manifest:
    src = tmp / f"src-{version}" / "app.bin"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(random.Random(version).randbytes(size))
    return publish_tree(store, src, "app", version, PUB, created=1_700_000_000.0).manifest


class StoreBackedFetcher:
    """Stands in for PeerFetcher: every peer answers from `store`."""

    def __init__(self, store: ChunkStore, manifests: dict[str, bytes]) -> None:
        self.store = store
        self.manifests = manifests
        self.chunks_asked = 0

    async def manifest(self, addr: str, rid: str, timeout: float = 10.0, *, to: str = "") -> bytes | None:
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
        self.chunks_asked += len(ids)
        return [self.store.get_stored(c) for c in ids]

    async def close(self) -> None:
        return None


def announcing(name: str, m: Manifest) -> Any:
    n = len(m.chunks)
    entry = Announce(m.name, m.version, m.release_id[:16], n, n)
    return member(name, node_id=name, addr=f"{name}:1", meta={"site": "a", "rel:app": entry.text()})


def make_service(root: Path, disk: FakeDisk, events: list[dict[str, Any]]) -> ReleaseService:
    svc = ReleaseService(
        root,
        name="me",
        site="a",
        tags={},
        codec=Codec("dtest", None),
        trusted=[PUB.public_key],
        config=DistConfig(fsync=False, min_free=MARGIN),
        emit=events.append,
        # A cool-down far longer than the test: only retry_now can end it.
        swarm_config=SwarmConfig(backoff_base=3600.0, piece_target=64 * 1024),
        free_space=disk,
    )
    svc.space.interval = 3600.0  # the test polls by itself
    return svc


def serve_from(svc: ReleaseService, store: ChunkStore, m: Manifest) -> StoreBackedFetcher:
    """Every peer of `svc` answers `m` (manifest and chunks) from `store`."""
    fake = StoreBackedFetcher(store, {m.release_id: m.to_bytes()})
    svc.fetcher = svc.driver.client = svc.intake.client = fake  # type: ignore[assignment]
    return fake


async def settle(svc: ReleaseService) -> None:
    """Until the service's tasks have ended (all but the parked free-space watch)."""
    while True:
        tasks = [t for t in svc._tasks if t is not svc.space._watcher]
        if not tasks:
            return
        await asyncio.gather(*tasks, return_exceptions=True)


def row(svc: ReleaseService) -> dict[str, Any]:
    (r,) = svc.releases()
    return r


# --- the sans-IO part --------------------------------------------------------------------------


def test_need_is_the_missing_chunks_once_plus_the_materialised_release(tmp_path: Path) -> None:
    m = make_release(tmp_path, "1.0", ChunkStore(tmp_path / "s", fsync=False))
    ids = m.unique_chunks()
    assert len(ids) > 3
    assert space_needed(m, ids) == sum(m.chunks.values()) + m.total_size
    some = ids[:2]
    assert space_needed(m, [*some, *some]) == sum(m.chunks[c] for c in some) + m.total_size
    assert space_needed(m, []) == m.total_size
    assert describe(64 * MiB, 40 * MiB) == "disk full: needs 64 MiB, 40 MiB free"
    assert describe(3 * MiB // 2, None) == "disk full: needs 1.5 MiB"


def test_waits_fit_with_the_margin_first_come_first_served() -> None:
    w = SpaceWaits(10)
    assert w.fits(90, 100)
    assert not w.fits(91, 100)
    assert w.hold("a", 60, 0.0, started=False)
    assert w.hold("b", 50, 0.0, started=False)
    assert w.hold("c", 20, 0.0, started=False)
    assert not w.hold("a", 70, 0.5, started=False)  # known: not news again, need updated
    assert w.error("a") == describe(80, None)
    assert [x.rid for x in w.ready(25, 1.0)] == []  # nothing fits
    assert w.error("a") == describe(80, 25)
    # 100 free: a (70) fits, b (50) would not after it, c (20) still does.
    assert [x.rid for x in w.ready(100, 2.0)] == ["a", "c"]
    assert w.rids() == ["b"]
    assert w.error("a") is None
    w.drop("b")
    assert not len(w)


def test_a_resume_without_progress_is_not_news_and_backs_off() -> None:
    w = SpaceWaits(0, retry_base=1.0, retry_max=8.0)
    assert w.hold("r", 100, 0.0, started=True, progress=5)
    assert [x.rid for x in w.ready(100, 0.0)] == ["r"]
    # Stalled again with no chunk since: quiet, and not resumed before 2 s, then 4 s, then 8 s.
    for streak, t in ((1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)):
        assert not w.hold("r", 100, t, started=True, progress=5)
        delay = min(8.0, 2.0**streak)
        assert w.ready(100, t + delay - 0.01) == []
        assert [x.rid for x in w.ready(100, t + delay)] == ["r"]
    # Progress since the last resume: news again, and resumed at once.
    assert w.hold("r", 90, 50.0, started=True, progress=6)
    assert [x.rid for x in w.ready(100, 50.0)] == ["r"]
    w.forget_except([])
    assert w.hold("r", 90, 60.0, started=True, progress=6)  # history forgotten


# --- the service -------------------------------------------------------------------------------


async def test_a_release_that_does_not_fit_waits_and_starts_when_space_grows(tmp_path: Path) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", peer_store)
    need = space_needed(m, m.unique_chunks()) + MARGIN
    disk = FakeDisk(need - 1)
    events: list[dict[str, Any]] = []
    svc = make_service(tmp_path / "me", disk, events)
    fake = serve_from(svc, peer_store, m)
    await svc.start()
    try:
        svc.member_update(announcing("p", m))
        await settle(svc)
        r = row(svc)
        assert r["state"] == "waiting"
        assert r["error"] == describe(need, need - 1)
        assert r["have_chunks"] == 0
        assert fake.chunks_asked == 0
        assert m.release_id not in svc.driver.fetches
        assert svc.space._watcher is not None  # watching free space
        for _ in range(3):  # still full: reported once, not per poll
            await svc.space.poll()
            await settle(svc)
        assert [e["state"] for e in events] == ["disk full"]
        assert events[0]["detail"] == describe(need, need - 1)
        assert svc.counters["space.full"] == 1
        assert row(svc)["state"] == "waiting"
        disk.free = need
        await svc.space.poll()
        await settle(svc)
        assert row(svc)["state"] == "active"
        assert "error" not in row(svc)
        assert [e["state"] for e in events] == ["disk full", "downloading", "complete", "active"]
        assert svc.counters["space.resumed"] == 1
        assert not len(svc.space.waits)
    finally:
        await svc.stop()


async def test_a_fetch_stalled_by_a_full_disk_resumes_at_once_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", peer_store, size=1_200_000)
    disk = FakeDisk(1 << 40)
    events: list[dict[str, Any]] = []
    svc = make_service(tmp_path / "me", disk, events)
    fake = serve_from(svc, peer_store, m)
    real_put = svc.store.put
    stored: list[str] = []

    def put(cid: str, data: bytes) -> int:  # room for 3 chunks, then the disk is full
        if len(stored) >= 3:
            raise DiskFullError("disk full: cannot store chunk (No space left on device)")
        stored.append(cid)
        return real_put(cid, data)

    monkeypatch.setattr(svc.store, "put", put)
    real_many = svc.store.put_many
    monkeypatch.setattr(svc.store, "put_many", put_many_through(put))
    real_placed = svc.store.put_placed
    monkeypatch.setattr(svc.store, "put_placed", put_placed_through(put))
    await svc.start()
    try:
        svc.member_update(announcing("p", m))
        await settle(svc)
        r = row(svc)
        assert r["state"] == "waiting"
        assert r["have_chunks"] == 3
        assert r["error"].startswith("disk full")
        assert [e["state"] for e in events] == ["downloading", "disk full"]
        fetch = svc.driver.fetches[m.release_id]
        assert fetch.disk_failed == {"p"}
        # The peer cools down for an hour (the swarm's back-off): nothing is asked meanwhile.
        asked = fake.chunks_asked
        disk.free = 0
        await svc.space.poll()
        await settle(svc)
        assert fake.chunks_asked == asked
        # The row shows what the poll read (the need was taken when the fetch stalled).
        assert row(svc)["error"].endswith(" MiB, 0.0 MiB free")
        # Space returns: the cool-down is cleared and the rest flows at once.
        monkeypatch.setattr(svc.store, "put", real_put)
        monkeypatch.setattr(svc.store, "put_many", real_many)
        monkeypatch.setattr(svc.store, "put_placed", real_placed)
        disk.free = 1 << 40
        await svc.space.poll()
        await settle(svc)
        assert row(svc)["state"] == "active"
        assert [e["state"] for e in events] == ["downloading", "disk full", "complete", "active"]
        assert svc.counters["space.full"] == 1
        assert svc.counters["space.resumed"] == 1
    finally:
        await svc.stop()


async def test_unknown_free_space_does_not_block_a_release(tmp_path: Path) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", peer_store)

    def broken(path: Path) -> int:
        raise OSError(5, "Input/output error")

    events: list[dict[str, Any]] = []
    svc = make_service(tmp_path / "me", FakeDisk(0), events)
    svc.space.free_space = broken
    serve_from(svc, peer_store, m)
    await svc.start()
    try:
        svc.member_update(announcing("p", m))
        await settle(svc)
        assert row(svc)["state"] == "active"
        assert svc.counters["space.probe_errors"] == 1
        assert svc.space._watcher is None  # nothing waits: nothing polls
    finally:
        await svc.stop()


async def test_a_release_resumed_at_start_is_checked_too(tmp_path: Path) -> None:
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", peer_store)
    root = tmp_path / "me"
    ChunkStore(root, fsync=False).put_manifest(m.release_id, m.to_bytes())  # adopted, no chunk yet
    events: list[dict[str, Any]] = []
    disk = FakeDisk(0)
    svc = make_service(root, disk, events)
    await svc.start()
    try:
        assert row(svc)["state"] == "waiting"
        assert m.release_id not in svc.driver.fetches
        assert [e["state"] for e in events] == ["disk full"]
    finally:
        await svc.stop()


class GatedDisk(FakeDisk):
    """A statvfs that does not answer until the test lets it (a slow disk at start)."""

    def __init__(self, free: int) -> None:
        super().__init__(free)
        self.gate = threading.Event()

    def __call__(self, path: object) -> int:
        self.gate.wait(10.0)
        return super().__call__(path)


def half_held(tmp_path: Path) -> tuple[Manifest, Path, int]:
    """A node's data dir left by a kill mid-download: the manifest and half of its chunks."""
    peer_store = ChunkStore(tmp_path / "peer", fsync=False)
    m = make_release(tmp_path, "1.0", peer_store, size=1_200_000)
    root = tmp_path / "me"
    mine = ChunkStore(root, fsync=False)
    mine.put_manifest(m.release_id, m.to_bytes())
    ids = m.unique_chunks()
    held = ids[: len(ids) // 2]
    for cid in held:
        mine.put(cid, peer_store.get_stored(cid))
    assert 0 < len(held) < len(ids)
    return m, root, len(held)


async def test_a_release_resumed_at_start_shows_what_it_holds_before_its_fetch_starts(
    tmp_path: Path,
) -> None:
    # The manifest is listed as soon as it is found; the fetch starts after the free-space
    # probe. In between, the row said 0 chunks for a node holding half of them.
    m, root, held = half_held(tmp_path)
    disk = GatedDisk(1 << 40)
    svc = make_service(root, disk, [])
    starting = asyncio.create_task(svc.start())
    try:
        for _ in range(500):
            if svc.releases():
                break
            await asyncio.sleep(0.01)
        assert m.release_id not in svc.driver.fetches  # the probe has not answered yet
        assert row(svc)["have_chunks"] == held
        disk.gate.set()
        await starting
        assert m.release_id in svc.driver.fetches
        assert row(svc)["have_chunks"] == held
    finally:
        disk.gate.set()
        await starting
        await svc.stop()


async def test_a_resumed_release_waiting_for_room_shows_what_it_holds(tmp_path: Path) -> None:
    m, root, held = half_held(tmp_path)
    svc = make_service(root, FakeDisk(0), [])
    await svc.start()
    try:
        r = row(svc)
        assert r["state"] == "waiting"
        assert r["have_chunks"] == held
        assert m.release_id not in svc.driver.fetches
    finally:
        await svc.stop()
