"""A full disk is a state, not a loop: nodes on 127.0.0.1 (the mesh of test_release_mesh.py)
whose free space is injected (SpaceGate.free_space), with the real loop and the real watch.

- a release that cannot fit is not fetched (no byte received), shows "waiting" with the disk
  state, and is fetched and made current within seconds of the space growing;
- a fetch stalled mid-way by a full disk (the store's put raises DiskFullError) resumes within
  seconds of space returning, although its source cools down for half a minute;
- a hung statvfs is timed out, and never joined by a second one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshd.core.swarm import SwarmConfig
from meshd.release.activate import ActivationDiskFull
from meshd.release.config import DistConfig
from meshd.release.space import space_needed
from meshd.release.store import DiskFullError
from tests.fakes import FakeDisk, put_many_through, put_placed_through
from tests.integration.test_release_mesh import Mesh, data_blob, publish, wait_for, write_file

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
async def space_mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    await m.close()


def states(mesh: Mesh, node: str, rid: str) -> list[str]:
    return [e["state"] for e in mesh.events if e["node"] == node and e["id"] == rid]


async def test_a_release_that_cannot_fit_waits_then_is_fetched_when_the_disk_grows(
    space_mesh: Mesh, tmp_path: Path
) -> None:
    mesh = space_mesh
    n0 = await mesh.add("n0")
    n1 = await mesh.add("n1")
    disk = FakeDisk(20 * MiB)  # the release needs 3 MB + 3 MB + the 32 MiB margin
    n1.service.space.free_space = disk
    blob = data_blob(7, 3_000_000)
    rid = await publish(n0, write_file(tmp_path / "src" / "app.bin", blob), "1.0")
    await wait_for(lambda: n1.state_of(rid) == "waiting", what="n1 waiting for disk space")
    manifest = n0.service._manifests[rid]
    need = space_needed(manifest, manifest.unique_chunks()) + DistConfig().min_free
    row = n1.row(rid)
    assert row is not None
    assert row["error"] == f"disk full: needs {need / MiB:.0f} MiB, 20 MiB free"
    assert row["have_chunks"] == 0
    # It watches free space meanwhile, and fetches nothing.
    calls = disk.calls
    await wait_for(lambda: disk.calls >= calls + 2, timeout=10.0, what="free space polled")
    assert n1.service.transfer.received_bytes == 0  # no chunk byte (the manifest only)
    assert n1.state_of(rid) == "waiting"
    assert states(mesh, "n1", rid) == ["disk full"]  # reported once, not per poll
    assert n1.service.counters["space.full"] == 1
    disk.free = 200 * MiB  # the disk grew
    loop = asyncio.get_running_loop()
    grown = loop.time()
    await wait_for(lambda: n1.state_of(rid) == "active", timeout=10.0, what="n1 active")
    took = loop.time() - grown
    assert n1.release_file("app", "app.bin").read_bytes() == blob
    assert states(mesh, "n1", rid) == ["disk full", "downloading", "complete", "active"]
    assert took < 10.0
    await wait_for(lambda: n1.service.space._watcher is None, timeout=5.0, what="the watch ended")


async def test_a_fetch_stalled_by_a_full_disk_resumes_within_seconds_of_space_returning(
    space_mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = space_mesh
    n0 = await mesh.add("n0")
    # A half-minute cool-down after the first failure: waiting it out would take 30 s.
    slow_backoff = SwarmConfig(origin_delay=1.0, timeout_min=3.0, backoff_base=30.0, piece_target=256 * 1024)
    n1 = await mesh.add("n1", swarm=slow_backoff)
    disk = FakeDisk(1 << 40)
    n1.service.space.free_space = disk
    store = n1.service.store
    real_put = store.put
    room = [8]  # chunks that still fit

    def put(cid: str, data: bytes) -> int:
        if room[0] <= 0:
            disk.free = 0  # what statvfs would say now
            raise DiskFullError(f"disk full: cannot store chunk {cid[:16]} (No space left on device)")
        room[0] -= 1
        return real_put(cid, data)

    monkeypatch.setattr(store, "put", put)
    real_many = store.put_many
    monkeypatch.setattr(store, "put_many", put_many_through(put))
    real_placed = store.put_placed
    monkeypatch.setattr(store, "put_placed", put_placed_through(put))
    blob = data_blob(8, 4_000_000)
    rid = await publish(n0, write_file(tmp_path / "src" / "app.bin", blob), "1.0")
    await wait_for(lambda: n1.state_of(rid) == "waiting", what="n1 stalled on a full disk")
    row = n1.row(rid)
    assert row is not None
    assert row["error"].startswith("disk full")
    assert 0 < row["have_chunks"] < row["chunks"]
    assert states(mesh, "n1", rid) == ["downloading", "disk full"]
    fetch = n1.service.driver.fetches[rid]
    assert fetch.disk_failed == {"n0"}
    # Still full for a few polls: it stays waiting, reported once.
    calls = disk.calls
    await wait_for(lambda: disk.calls >= calls + 2, timeout=10.0, what="free space polled")
    assert n1.state_of(rid) == "waiting"
    assert states(mesh, "n1", rid) == ["downloading", "disk full"]
    # Space returns: chunks flow again within a poll, not after the 30 s cool-down.
    monkeypatch.setattr(store, "put", real_put)
    monkeypatch.setattr(store, "put_many", real_many)
    monkeypatch.setattr(store, "put_placed", real_placed)
    disk.free = 1 << 40
    loop = asyncio.get_running_loop()
    back = loop.time()
    await wait_for(lambda: n1.state_of(rid) == "active", timeout=10.0, what="n1 active")
    assert loop.time() - back < 10.0
    assert n1.release_file("app", "app.bin").read_bytes() == blob
    assert states(mesh, "n1", rid) == ["downloading", "disk full", "complete", "active"]
    assert n1.service.counters["space.resumed"] == 1


async def test_a_hung_statvfs_times_out_and_is_never_joined_by_another(space_mesh: Mesh) -> None:
    n0 = await space_mesh.add("n0")
    gate = n0.service.space
    release = threading.Event()
    calls: list[Any] = []

    def hung(path: Path) -> int:
        calls.append(path)
        release.wait(30.0)
        return 123 * MiB

    gate.free_space = hung
    gate.timeout = 0.2
    try:
        assert await gate._probe() is None  # timed out
        assert n0.service.counters["space.probe_timeouts"] == 1
        assert await gate._probe() is None  # the first still hangs: no second call
        assert n0.service.counters["space.probe_busy"] == 1
        assert len(calls) == 1
    finally:
        release.set()
    await wait_for(lambda: gate._probing is None, timeout=5.0, what="the hung call returned")
    assert await gate._probe() == 123 * MiB
    assert len(calls) == 2


async def test_no_room_to_materialise_waits_then_activates_when_space_returns(
    space_mesh: Mesh, tmp_path: Path
) -> None:
    # Before: a disk full while materialising marked the release "failed" for good.
    mesh = space_mesh
    n0 = await mesh.add("n0")
    n1 = await mesh.add("n1")
    disk = FakeDisk(1000 * MiB)
    n1.service.space.free_space = disk
    real = n1.service.releases_dir.materialise
    full = [True]

    def materialise(manifest: Any, assembly: Any = None) -> Path:
        if full[0]:
            disk.free = 1 * MiB  # the unpacking filled the disk
            raise ActivationDiskFull(f"cannot materialise {manifest.name} {manifest.version}: disk full")
        return real(manifest, assembly)

    n1.service.releases_dir.materialise = materialise  # type: ignore[method-assign]
    rid = await publish(n0, write_file(tmp_path / "src" / "app.bin", data_blob(8, 1_000_000)), "1.0")
    await wait_for(lambda: n1.state_of(rid) == "waiting", what="n1 waiting for room to activate")
    row = n1.row(rid)
    assert row is not None
    assert "disk full" in row["error"]
    assert row["have_chunks"] == row["chunks"]  # fetched; only the release folder lacks room
    calls = disk.calls
    await wait_for(lambda: disk.calls >= calls + 2, timeout=10.0, what="free space polled")
    assert n1.state_of(rid) == "waiting"
    assert n1.service.counters["activations.failed"] == 0
    full[0] = False
    disk.free = 1000 * MiB
    await wait_for(lambda: n1.state_of(rid) == "active", timeout=10.0, what="n1 activates once there is room")
    assert states(mesh, "n1", rid).count("disk full") == 1
    assert n1.service.counters["activations.disk_full"] == 1
