"""Releases under faults (issue 10): the newest trusted release wins on every node, whatever the
order of publishing and joining, the publishers' clocks, the restarts and the failed fetches.

Each test is one row of the issue's table, on the in-process mesh of test_release_mesh.py (real
stores and aiohttp peer servers on 127.0.0.1, membership gossiped by the test's Mesh). Every test
reads the release events to check that no node ever made an older version current after a newer
one, not only where it ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from meshd.release.manifest import Manifest
from tests.integration.test_release_mesh import Mesh, TNode, data_blob, publish, wait_for, write_file

pytestmark = pytest.mark.integration

SIZE = 1_500_000
DAY = 86_400.0


@pytest.fixture
async def mesh(tmp_path: Path) -> Any:
    m = Mesh(tmp_path)
    yield m
    await m.close()


def made_current(mesh: Mesh, node: str) -> list[str]:
    """The versions `node` made current, in order (its "active" release events)."""
    return [e["version"] for e in mesh.events if e["node"] == node and e["state"] == "active"]


def assert_never_back(mesh: Mesh, published: list[str], nodes: Iterable[str]) -> None:
    """No node made a version current after a later-published one."""
    rank = {v: i for i, v in enumerate(published)}
    for node in nodes:
        seen = [rank[v] for v in made_current(mesh, node)]
        assert seen == sorted(set(seen)), f"{node} made current {made_current(mesh, node)}"


def stored_size(node: TNode, rid: str) -> int:
    m = node.service._manifests[rid]
    return sum(node.service.store.stored_size(c) for c in m.chunks)


def tree(tmp: Path, label: str, seed: int) -> Path:
    write_file(tmp / label / "app.bin", data_blob(seed, SIZE))
    return tmp / label / "app.bin"


async def all_current(nodes: Iterable[TNode], rid: str, timeout: float = 30.0) -> None:
    nodes = list(nodes)
    await wait_for(
        lambda: all(n.state_of(rid) == "active" for n in nodes),
        timeout,
        f"{rid[:16]} current on {[n.name for n in nodes]}",
    )


async def test_a_joining_node_fetches_only_the_newest_release_peers_keep(mesh: Mesh, tmp_path: Path) -> None:
    # Before: it downloaded every version its peers keep (2.00x the bytes), at once, and in
    # some joins version 1 ended current 1 ms after version 2.
    holders = [await mesh.add(f"h{i}") for i in range(4)]
    r1 = await publish(holders[0], tree(tmp_path, "v1", 1), "1")
    await all_current(holders, r1)
    r2 = await publish(holders[1], tree(tmp_path, "v2", 2), "2")
    await all_current(holders, r2)
    assert all(h.row(r1) is not None for h in holders)  # they keep both versions
    v2_bytes = stored_size(holders[1], r2)
    for i in range(3):
        new = await mesh.add(f"new{i}")
        await all_current([new], r2)
        assert made_current(mesh, new.name) == ["2"]
        assert new.row(r1) is None, "the older version was fetched"
        assert new.service.transfer.received_bytes <= v2_bytes * 1.05
        assert new.release_file("app", "app.bin").read_bytes() == data_blob(2, SIZE)
    assert_never_back(mesh, ["1", "2"], [n.name for n in mesh.nodes])


async def test_a_node_down_while_two_releases_came_out_fetches_and_runs_the_newest(
    mesh: Mesh, tmp_path: Path
) -> None:
    # Before: both were fetched at once, both activated in parallel threads, 2.0 ended current.
    a, b, c = [await mesh.add(n) for n in "abc"]
    r1 = await publish(a, tree(tmp_path, "v1", 1), "1.0")
    await all_current([a, b, c], r1)
    await mesh.kill(c)
    r2 = await publish(a, tree(tmp_path, "v2", 2), "2.0")
    r3 = await publish(b, tree(tmp_path, "v3", 3), "3.0")
    await all_current([a, b], r3)
    back = await mesh.add("c", root=c.root)
    await all_current([back], r3)
    assert made_current(mesh, "c") == ["1.0", "3.0"]
    assert back.row(r2) is None
    assert back.service.transfer.received_bytes <= stored_size(b, r3) * 1.05
    assert_never_back(mesh, ["1.0", "2.0", "3.0"], "abc")


async def test_a_restart_holding_two_unfinished_releases_resumes_the_newest_only(
    mesh: Mesh, tmp_path: Path
) -> None:
    # A node killed while it held 2.0 and 3.0 unfinished (as the old code left it).
    a, c = await mesh.add("a"), await mesh.add("c")
    r1 = await publish(a, tree(tmp_path, "v1", 1), "1.0")
    await all_current([a, c], r1)
    await mesh.kill(c)
    r2 = await publish(a, tree(tmp_path, "v2", 2), "2.0")
    r3 = await publish(a, tree(tmp_path, "v3", 3), "3.0")
    for rid in (r2, r3):
        m = a.service._manifests[rid]
        c.service.store.put_manifest(rid, m.to_bytes())
        for cid in list(m.chunks)[:2]:
            c.service.store.put(cid, a.service.store.get_stored(cid))
    back = await mesh.add("c", root=c.root)
    assert back.row(r2) is None  # dropped at start: superseded and not installed
    await all_current([back], r3)
    assert made_current(mesh, "c") == ["1.0", "3.0"]
    assert not back.service.store.has_manifest(r2)


async def test_newest_installed_but_not_current_is_made_current_at_start(mesh: Mesh, tmp_path: Path) -> None:
    # Before: stuck on the older one with the newest complete but never made current.
    a, c = await mesh.add("a"), await mesh.add("c")
    r1 = await publish(a, tree(tmp_path, "v1", 1), "1.0")
    await all_current([a, c], r1)
    await mesh.kill(c)
    r2 = await publish(a, tree(tmp_path, "v2", 2), "2.0")
    m2 = a.service._manifests[r2]
    c.service.store.put_manifest(r2, m2.to_bytes())
    for cid in m2.chunks:
        c.service.store.put(cid, a.service.store.get_stored(cid))
    await mesh.kill(a)  # nobody to fetch from: what is on disk must do
    back = await mesh.add("c", root=c.root)
    await all_current([back], r2, timeout=10.0)
    assert made_current(mesh, "c") == ["1.0", "2.0"]


async def test_a_publisher_with_its_clock_400_days_ahead_does_not_block_later_releases(
    mesh: Mesh, tmp_path: Path
) -> None:
    # Before: its release was "newer" than any later one (created compared as text): the others
    # stayed on it, or refused it; the skewed node never took a later release.
    ahead = await mesh.add("ahead", wall=lambda: time.time() + 400 * DAY)
    behind = await mesh.add("behind", wall=lambda: 0.0)  # an RTC reset to 1970
    normal = [await mesh.add(f"n{i}") for i in range(2)]
    everyone = [ahead, behind, *normal]
    r8 = await publish(normal[0], tree(tmp_path, "v8", 8), "8")
    await all_current(everyone, r8)
    r10 = await publish(ahead, tree(tmp_path, "v10", 10), "10")
    await all_current(everyone, r10)
    r11 = await publish(normal[1], tree(tmp_path, "v11", 11), "11")
    await all_current(everyone, r11)
    assert ahead.service.transfer.received_bytes > 0
    r12 = await publish(behind, tree(tmp_path, "v12", 12), "12")
    await all_current(everyone, r12)
    created = Manifest.from_bytes(behind.service.manifest_bytes(r12)).created
    assert created.startswith("1970-")  # informational only
    assert_never_back(mesh, ["8", "10", "11", "12"], [n.name for n in everyone])


async def test_three_releases_published_in_a_row_from_different_nodes(mesh: Mesh, tmp_path: Path) -> None:
    nodes = [await mesh.add(f"n{i}") for i in range(5)]
    r1 = await publish(nodes[0], tree(tmp_path, "v1", 1), "1")
    await all_current(nodes, r1)
    # Back to back, before any of them has spread: each publisher has seen the one before.
    rids, seqs = [], []
    for i, version in enumerate(["2", "3", "4"]):
        rids.append(await publish(nodes[i], tree(tmp_path, f"v{version}", 20 + i), version))
        seqs.append(nodes[i].service._manifests[rids[-1]].seq)
        await asyncio.sleep(0.05)  # one gossip round: the next publisher hears of it
    assert seqs == [2, 3, 4]  # each took one above the highest it had seen
    await all_current(nodes, rids[-1])
    assert_never_back(mesh, ["1", "2", "3", "4"], [n.name for n in nodes])


async def test_a_failed_first_manifest_fetch_converges_in_a_quiet_mesh(mesh: Mesh, tmp_path: Path) -> None:
    # Before: a failed manifest fetch was asked for again only on the next member event.
    holder = await mesh.add("holder")
    rid = await publish(holder, tree(tmp_path, "v1", 1), "1")
    real = holder.service.full_release_id
    asked: list[str] = []

    def first_fails(r: str) -> str | None:
        asked.append(r)
        return None if len(asked) == 1 else real(r)

    holder.service.full_release_id = first_fails  # type: ignore[method-assign,assignment]
    new = await mesh.add("new")
    await wait_for(lambda: len(asked) >= 1, 5.0, "the first manifest request")
    # No member event follows: nothing in this mesh changes until the retry timer fires.
    await all_current([new], rid, timeout=15.0)
    assert new.service.policy.failures == {}


async def test_a_newer_release_for_another_site_does_not_hide_the_one_for_this_site(
    mesh: Mesh, tmp_path: Path
) -> None:
    hq = await mesh.add("hq", site="hq")
    a1 = await mesh.add("a1", site="a")
    b1 = await mesh.add("b1", site="b")
    r5 = await publish(hq, tree(tmp_path, "v5", 5), "5", site="a")
    r6 = await publish(hq, tree(tmp_path, "v6", 6), "6", site="b")
    await all_current([a1], r5)
    await all_current([b1], r6)
    assert hq.row(r5) is not None  # the publisher keeps seeding both
    a2 = await mesh.add("a2", site="a")  # offered 6 (not for it) and 5: takes 5
    await all_current([a2], r5)
    assert a2.row(r6) is None
    r7 = await publish(hq, tree(tmp_path, "v7", 7), "7", site="a")
    await all_current([a1, a2], r7)
    assert b1.state_of(r6) == "active"
