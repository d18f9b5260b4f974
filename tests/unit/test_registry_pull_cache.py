"""The pull-through (meshd/registry/pullthrough.py) with a fake upstream and fake site peers in
this process: where a missing blob comes from, one upstream fetch per digest, leases and
advertisements in the metadata, a corrupt peer banned, wrong upstream bytes never cached, the
cache's cap and its restart; and the registry serving through it (tags only with pass_tags)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from meshd.errors import DecodeError
from meshd.metrics import Exposition
from meshd.registry.catalog import ReleaseImages
from meshd.registry.peer_blobs import BlobAsk
from meshd.registry.pullthrough import BlobCache, OnBlock, PullThrough
from meshd.registry.server import Registry
from meshd.registry.site_cache import (
    ADVERT_KEY,
    SiteMember,
    advertises,
    decode_advert,
    encode_advert,
    lease_key,
    rendezvous_order,
    rendezvous_owner,
)
from meshd.registry.upstream import TagAnswer, UpstreamError
from meshd.wire import Codec
from tests.metrics_text import sample
from tests.oci_images import make_image, sha

BLOB = os.urandom(300_000)
DIGEST = sha(BLOB)
UP = "http://127.0.0.1:5001"


class FakeUpstream:
    def __init__(self, blobs: dict[str, bytes], tags: dict[str, tuple[bytes, str]] | None = None) -> None:
        self.blobs = blobs
        self.tags = tags or {}
        self.gets: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None  # set: a fetch waits for it (to overlap requests)
        self.down = False

    async def stream(self, kind: str, repo: str, digest: str, limit: int, on_block: OnBlock) -> int:
        self.gets[digest] += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise OSError("connection refused")
        data = self.blobs.get(digest)
        if data is None:
            raise UpstreamError("404", final=True)
        for i in range(0, len(data), 65536):
            await on_block(data[i : i + 65536])
        return len(data)

    async def manifest_by_tag(self, repo: str, tag: str, accept: str) -> TagAnswer | None:
        hit = self.tags.get(tag)
        return TagAnswer(hit[0], "application/vnd.oci.image.manifest.v1+json", hit[1]) if hit else None


class FakePeers:
    """Site peers answering blob asks from dicts (what each holds), counting asks."""

    def __init__(self, held: dict[str, dict[str, bytes]]) -> None:
        self.held = held
        self.asks: list[tuple[str, bool]] = []
        self.unreachable: set[str] = set()

    async def __call__(self, peer: SiteMember, ask: BlobAsk, on_block: OnBlock) -> bool:
        self.asks.append((peer.name, ask.fetch))
        if peer.name in self.unreachable:
            raise OSError("connection refused")
        data = self.held.get(peer.name, {}).get(ask.digest)
        if data is None:
            return False
        await on_block(data)
        return True


def pull_through(
    tmp: Path,
    upstream: FakeUpstream,
    peers: FakePeers,
    site: list[SiteMember],
    *,
    me: str = "n1",
    cap: int = 10**9,
    pass_tags: bool = False,
) -> tuple[PullThrough, list[dict[str, str | None]]]:
    updates: list[dict[str, str | None]] = []
    pt = PullThrough(
        BlobCache(tmp / "registry", cap),
        me=me,
        codec=Codec("t", None),
        upstreams=[UP],
        pass_tags=pass_tags,
        site_members=lambda: site,
        set_meta_keys=updates.append,
        peer_fetch=peers,
        upstream=lambda _url: upstream,
    )
    pt.start()
    return pt, updates


def holder(name: str, *digests: str) -> SiteMember:
    return SiteMember.from_meta(name, f"addr-{name}", "", True, {ADVERT_KEY: encode_advert(digests)})


def metrics(pt: PullThrough) -> str:
    out = Exposition()
    pt.collect_metrics(out)
    return out.render()


async def test_a_miss_nobody_has_is_fetched_upstream_once_under_a_lease_then_advertised(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream({DIGEST: BLOB})
    me = "n1" if rendezvous_owner(DIGEST, ["n1", "n2"]) == "n1" else "n2"
    site = [holder("n2" if me == "n1" else "n1")]
    pt, updates = pull_through(tmp_path, upstream, FakePeers({}), site, me=me)
    try:
        upstream.gate = asyncio.Event()
        requests = [asyncio.ensure_future(pt.fetch(DIGEST, "org/app", "")) for _ in range(5)]
        for _ in range(100):  # until the one fetch has started (no real time passes)
            if upstream.gets[DIGEST]:
                break
            await asyncio.sleep(0)
        assert any(u.get(lease_key(DIGEST)) == "1" for u in updates)  # the site learns at once
        upstream.gate.set()
        assert await asyncio.gather(*requests) == ["upstream"] * 5
        assert upstream.gets[DIGEST] == 1  # five requests, one fetch
        assert (tmp_path / "registry/blobs/sha256" / DIGEST[7:]).read_bytes() == BLOB
        assert updates[-1].get(lease_key(DIGEST), "gone") is None  # lease removed when done
        advert = decode_advert(pt.meta_wanted()[ADVERT_KEY])
        assert advertises(advert, DIGEST)
        pt.announcer.announce(force=True)  # what its rate-limit timer does
        assert advertises(decode_advert(updates[-1][ADVERT_KEY]), DIGEST)
        text = metrics(pt)
        assert sample(text, "meshd_registry_upstream_bytes_total") == len(BLOB)
        assert sample(text, "meshd_registry_cache_blobs") == 1
        assert sample(text, "meshd_registry_cache_bytes") == len(BLOB)
        assert await pt.fetch(DIGEST, "org/app", "") == "cache"
    finally:
        await pt.close()


async def test_a_holder_in_the_site_serves_it_and_upstream_is_not_asked(tmp_path: Path) -> None:
    upstream = FakeUpstream({DIGEST: BLOB})
    peers = FakePeers({"n3": {DIGEST: BLOB}})
    pt, _ = pull_through(tmp_path, upstream, peers, [holder("n2"), holder("n3", DIGEST)])
    try:
        assert await pt.fetch(DIGEST, "org/app", "") == "peer"
        assert peers.asks == [("n3", False)]
        assert upstream.gets[DIGEST] == 0
        assert sample(metrics(pt), "meshd_registry_peer_bytes_total", direction="in") == len(BLOB)
    finally:
        await pt.close()


async def test_a_peer_serving_other_bytes_is_banned_counted_and_the_next_one_serves(tmp_path: Path) -> None:
    bad = bytearray(BLOB)
    bad[1000] ^= 1
    liar, honest = rendezvous_order(DIGEST, ["n2", "n3"])  # the liar is every node's first choice
    upstream = FakeUpstream({DIGEST: BLOB})
    peers = FakePeers({liar: {DIGEST: bytes(bad)}, honest: {DIGEST: BLOB}})
    pt, _ = pull_through(tmp_path, upstream, peers, [holder("n2", DIGEST), holder("n3", DIGEST)])
    try:
        assert await pt.fetch(DIGEST, "org/app", "") == "peer"
        assert peers.asks == [(liar, False), (honest, False)]
        assert (tmp_path / "registry/blobs/sha256" / DIGEST[7:]).read_bytes() == BLOB
        assert sample(metrics(pt), "meshd_registry_peer_bad_blobs_total") == 1
        assert upstream.gets[DIGEST] == 0
        assert not list((tmp_path / "registry/blobs/sha256").glob(".tmp-*"))  # nothing left over
        # the ban holds for this blob: dropped from the cache, asked again, the liar is skipped
        pt.cache.index.remove(DIGEST)
        peers.asks.clear()
        assert await pt.fetch(DIGEST, "org/app", "") == "peer"
        assert peers.asks == [(honest, False)]
    finally:
        await pt.close()


async def test_wrong_bytes_from_upstream_are_never_cached(tmp_path: Path) -> None:
    upstream = FakeUpstream({DIGEST: BLOB[:-1] + b"!"})
    pt, _ = pull_through(tmp_path, upstream, FakePeers({}), [])
    try:
        assert await pt.fetch(DIGEST, "org/app", "") is None
        assert pt.cache.cached(DIGEST) is None
        assert list((tmp_path / "registry/blobs/sha256").iterdir()) == []
        assert sample(metrics(pt), "meshd_registry_upstream_bad_blobs_total") == 1
        assert upstream.gets[DIGEST] == 1  # the same bytes would come again: no retry
    finally:
        await pt.close()


async def test_the_owner_is_asked_to_fetch_and_an_unreachable_owner_means_upstream_here(
    tmp_path: Path,
) -> None:
    names = ["n1", "n2", "n3"]
    data = next(c for c in (BLOB + bytes([i]) for i in range(256)) if rendezvous_owner(sha(c), names) == "n2")
    d = sha(data)
    blobs = {d: data}
    upstream = FakeUpstream(blobs)
    peers = FakePeers({"n2": dict(blobs)})  # the owner fetches it (here: holds it) for us
    pt, _ = pull_through(tmp_path, upstream, peers, [holder("n2"), holder("n3")])
    try:
        assert await pt.fetch(d, "org/app", "") == "peer"
        assert peers.asks == [("n2", True)]  # fetch=True: the owner pays the uplink, not us
        assert upstream.gets[d] == 0
        pt.cache.index.remove(d)
        peers.asks.clear()
        peers.unreachable.add("n2")
        assert await pt.fetch(d, "org/app", "") == "upstream"
        assert peers.asks == [("n2", True)]
        assert upstream.gets[d] == 1
    finally:
        await pt.close()


async def test_upstream_down_is_retried_a_bounded_number_of_times(tmp_path: Path) -> None:
    upstream = FakeUpstream({DIGEST: BLOB})
    upstream.down = True
    slept: list[float] = []

    async def no_sleep(s: float) -> None:
        slept.append(s)

    pt = PullThrough(
        BlobCache(tmp_path / "registry", 10**9),
        me="n1",
        codec=Codec("t", None),
        upstreams=[UP],
        pass_tags=False,
        site_members=list,
        set_meta_keys=None,
        sleep=no_sleep,
        peer_fetch=FakePeers({}),
        upstream=lambda _url: upstream,
    )
    pt.cache.scan()
    try:
        assert await pt.fetch(DIGEST, "org/app", "") is None
        assert upstream.gets[DIGEST] == 3
        assert slept == [0.5, 2.0]
    finally:
        await pt.close()


async def test_cache_cap_collects_least_recently_used_and_a_restart_keeps_order_and_drops_temp_files(
    tmp_path: Path,
) -> None:
    blobs = [os.urandom(1024 * 1024) for _ in range(4)]
    upstream = FakeUpstream({sha(b): b for b in blobs})
    pt, _ = pull_through(tmp_path, upstream, FakePeers({}), [], cap=3 * 1024 * 1024)
    try:
        for b in blobs[:3]:
            assert await pt.fetch(sha(b), "r", "") == "upstream"
        assert pt.cache.open(sha(blobs[0])) is not None  # used again: blobs[1] is now the oldest
        assert await pt.fetch(sha(blobs[3]), "r", "") == "upstream"  # over the cap: one goes
        assert pt.cache.cached(sha(blobs[1])) is None
        assert not (tmp_path / "registry/blobs/sha256" / sha(blobs[1])[7:]).exists()
        assert {d for d in (sha(b) for b in blobs) if pt.cache.cached(d)} == {
            sha(blobs[i]) for i in (0, 2, 3)
        }
    finally:
        await pt.close()
    for when, i in enumerate((2, 0, 3)):  # the order of use, as the files' mtimes keep it
        os.utime(tmp_path / "registry/blobs/sha256" / sha(blobs[i])[7:], (1000 + when, 1000 + when))
    leftover = tmp_path / "registry/blobs/sha256/.tmp-123-456"
    leftover.write_bytes(b"half a blob")
    (tmp_path / "registry/blobs/sha256/not-a-digest").write_bytes(b"x")
    again = BlobCache(tmp_path / "registry", 2 * 1024 * 1024)
    again.scan()  # smaller cap now: the least recently used (blobs[2]) goes at start
    assert not leftover.exists()
    assert {d for d in (sha(b) for b in blobs) if again.cached(d)} == {sha(blobs[0]), sha(blobs[3])}
    assert again.total == 2 * 1024 * 1024


# --- the registry through the pull-through ----------------------------------------------------


async def call(registry: Registry, path: str) -> web.Response:
    resp = await registry.handle(make_mocked_request("GET", path))
    assert isinstance(resp, web.Response)
    return resp


async def test_the_registry_serves_a_miss_through_the_cache_and_counts_its_source(tmp_path: Path) -> None:
    image = make_image(seed=5)
    upstream = FakeUpstream(image.blobs())
    pt, _ = pull_through(tmp_path, upstream, FakePeers({}), [])
    registry = Registry(ReleaseImages(list), pull=pt)
    try:
        resp = await call(registry, f"/v2/org/app/manifests/{image.manifest_digest}")
        assert resp.status == 200
        assert resp.body == image.manifest
        found = await registry.find(sha(image.layers[0]), "org/app", "")
        assert found is not None
        assert found.source == "upstream"
        found.file.close()
        found = await registry.find(sha(image.layers[0]), "org/app", "")
        assert found is not None
        assert found.source == "cache"
        found.file.close()
        out = Exposition()
        registry.collect_metrics(out)
        assert sample(out.render(), "meshd_registry_hits_total", kind="manifest", source="upstream") == 1
    finally:
        await pt.close()


async def test_a_tag_no_signed_release_covers_is_a_404_unless_pass_tags(tmp_path: Path) -> None:
    image = make_image(seed=6)
    tags = {"v1": (image.manifest, image.manifest_digest)}
    upstream = FakeUpstream(image.blobs(), tags)
    pt, _ = pull_through(tmp_path / "a", upstream, FakePeers({}), [])
    try:
        resp = await call(Registry(ReleaseImages(list), pull=pt), "/v2/org/app/manifests/v1")
        assert resp.status == 404
        assert isinstance(resp.body, bytes)
        assert orjson.loads(resp.body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    finally:
        await pt.close()
    pt, _ = pull_through(tmp_path / "b", upstream, FakePeers({}), [], pass_tags=True)
    try:
        resp = await call(Registry(ReleaseImages(list), pull=pt), "/v2/org/app/manifests/v1")
        assert resp.status == 200
        assert resp.body == image.manifest
        assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
        assert pt.cache.cached(image.manifest_digest) is not None  # by digest; the tag is not kept
        # an upstream whose digest header is not its body's: refused, counted, nothing cached
        upstream.tags["v2"] = (b'{"schemaVersion": 2}', image.manifest_digest)
        resp = await call(Registry(ReleaseImages(list), pull=pt), "/v2/org/app/manifests/v2")
        assert resp.status == 404
        assert sample(metrics(pt), "meshd_registry_upstream_bad_blobs_total") == 1
        assert pt.cache.cached(sha(b'{"schemaVersion": 2}')) is None
    finally:
        await pt.close()


# --- the peer protocol's ask ------------------------------------------------------------------


def test_blob_ask_round_trip_and_bad_input() -> None:
    ask = BlobAsk(DIGEST, "org/app", "docker.io", "manifests", True)
    assert BlobAsk.decode(ask.encode()) == ask
    bad = [
        b"not json",
        b"[]",
        orjson.dumps({"digest": "sha256:xyz", "repo": "r"}),
        orjson.dumps({"digest": DIGEST, "repo": 5}),
        orjson.dumps({"digest": DIGEST, "repo": "r" * 300}),
        orjson.dumps({"digest": DIGEST, "repo": "../../etc"}),
        orjson.dumps({"digest": DIGEST, "repo": "r", "ns": "host/../x"}),
        orjson.dumps({"digest": DIGEST, "repo": "r", "kind": "uploads"}),
        orjson.dumps({"digest": DIGEST, "repo": "r", "fetch": "yes"}),
    ]
    for body in bad:
        with pytest.raises(DecodeError):
            BlobAsk.decode(body)
