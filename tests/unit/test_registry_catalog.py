"""Tag and digest lookup over signed image releases (meshd/registry/catalog.py), the registry's
handler on mocked requests (no socket), and GET /v1/images' rows."""

from __future__ import annotations

from pathlib import Path

import nacl.signing
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from meshd.metrics import Exposition
from meshd.registry.api import image_rows
from meshd.registry.catalog import HeldRelease, ReleaseImages, is_image_release
from meshd.registry.image import IMAGE_INDEX_PATH, blob_path
from meshd.registry.server import Registry
from meshd.registry.source import stage_image
from meshd.release.chunker import chunk_tree
from meshd.release.manifest import Manifest, NaclSigner
from tests.metrics_text import sample
from tests.oci_images import DOCKER_MANIFEST_TYPE, OCI_MANIFEST, corrupt, make_image, sha, write_layout

SIGNER = NaclSigner(nacl.signing.SigningKey(bytes(range(32))))


def image_release(
    tmp: Path, name: str, version: str, seq: int, seed: int, repo: str = "org/app"
) -> HeldRelease:
    """An installed image release: the staged tree is what materialising it writes."""
    layout = write_layout(tmp / f"layout-{name}-{version}", make_image(seed=seed))
    root = tmp / "releases" / name / version
    root.mkdir(parents=True)
    stage_image(layout, root, repo)
    manifest = Manifest.build(name, version, chunk_tree(root), created=0.0, seq=seq).sign(SIGNER)
    return HeldRelease(manifest, root)


@pytest.fixture
def held(tmp_path: Path) -> list[HeldRelease]:
    return [image_release(tmp_path, "app", "1", 1, seed=1), image_release(tmp_path, "app", "2", 2, seed=2)]


def test_the_newest_release_naming_a_tag_wins_and_older_blobs_stay_servable(held: list[HeldRelease]) -> None:
    images = ReleaseImages(lambda: held)
    old, new = make_image(seed=1), make_image(seed=2)
    resolved = images.resolve("org/app", "v1")
    assert resolved is not None
    assert resolved.descriptor.digest == new.manifest_digest
    assert resolved.image.version == "2"
    assert images.resolve("org/app", "v9") is None  # a tag no signed release names
    assert images.resolve("other", "v1") is None
    found = images.open(sha(old.layers[0]))  # by digest: any image release held
    assert found is not None
    assert found.path == held[0].root / blob_path(sha(old.layers[0]))
    assert images.open("sha256:" + "0" * 64) is None


def test_a_release_without_an_image_index_is_not_an_image(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "blobs" / "sha256" / ("a" * 64)).write_bytes(b"x")
    m = Manifest.build("plain", "1", chunk_tree(root), created=0.0).sign(SIGNER)
    assert not is_image_release(m)
    images = ReleaseImages(lambda: [HeldRelease(m, root)])
    assert images.images() == []
    assert images.open("sha256:" + "a" * 64) is None


def test_an_image_index_changed_on_disk_after_signing_is_not_served(held: list[HeldRelease]) -> None:
    (held[1].root / IMAGE_INDEX_PATH).write_bytes(b'{"format":1,"repository":"org/app","tags":{}}')
    images = ReleaseImages(lambda: held)
    resolved = images.resolve("org/app", "v1")
    assert resolved is not None
    assert resolved.image.version == "1"


def test_a_release_gone_is_forgotten(held: list[HeldRelease]) -> None:
    live = list(held)
    images = ReleaseImages(lambda: live)
    assert len(images.images()) == 2
    live.pop()
    resolved = images.resolve("org/app", "v1")
    assert resolved is not None
    assert resolved.image.version == "1"


async def call(
    registry: Registry, method: str, path: str, headers: dict[str, str] | None = None
) -> web.Response:
    req = make_mocked_request(method, path, headers=headers or {})
    resp = await registry.handle(req)
    assert isinstance(resp, web.Response)
    return resp


def errors(resp: web.Response) -> list[str]:
    assert isinstance(resp.body, bytes)
    return [e["code"] for e in orjson.loads(resp.body)["errors"]]


async def test_manifest_by_tag_and_digest_with_the_headers_containerd_reads(held: list[HeldRelease]) -> None:
    registry = Registry(ReleaseImages(lambda: held))
    new = make_image(seed=2)
    for ref in ("v1", new.manifest_digest):
        resp = await call(registry, "GET", f"/v2/org/app/manifests/{ref}")
        assert resp.status == 200
        assert resp.body == new.manifest
        assert resp.headers["Docker-Content-Digest"] == new.manifest_digest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
    base = await call(registry, "GET", "/v2/")
    assert (base.status, base.body, base.headers["Docker-Distribution-API-Version"]) == (
        200,
        b"{}",
        "registry/2.0",
    )
    assert registry.requests[("manifest", "hit")] == 2
    assert registry.served_bytes == 2 * len(new.manifest)


async def test_misses_refusals_and_accept(held: list[HeldRelease]) -> None:
    registry = Registry(ReleaseImages(lambda: held))
    resp = await call(registry, "GET", "/v2/org/app/manifests/nope")
    assert (resp.status, errors(resp)) == (404, ["MANIFEST_UNKNOWN"])
    resp = await call(registry, "GET", "/v2/org/app/blobs/sha256:" + "0" * 64)
    assert (resp.status, errors(resp)) == (404, ["BLOB_UNKNOWN"])
    resp = await call(registry, "GET", "/v2/org/app/manifests/v1", {"Accept": DOCKER_MANIFEST_TYPE})
    assert (resp.status, errors(resp)) == (404, ["MANIFEST_UNKNOWN"])  # the client falls back
    layer = sha(make_image(seed=2).layers[0])
    resp = await call(registry, "GET", f"/v2/org/app/manifests/{layer}")  # a layer is no manifest
    assert (resp.status, errors(resp)) == (404, ["MANIFEST_UNKNOWN"])
    resp = await call(registry, "GET", "/v2/%2e%2e/org/manifests/v1")
    assert (resp.status, errors(resp)) == (400, ["NAME_INVALID"])
    for method in ("PUT", "POST", "DELETE", "PATCH"):
        resp = await call(registry, method, "/v2/org/app/manifests/v1")
        assert (resp.status, errors(resp)) == (405, ["UNSUPPORTED"])
    resp = await call(registry, "POST", "/v2/org/app/blobs/uploads/")
    assert resp.status == 405
    assert registry.requests[("manifest", "miss")] == 3
    assert registry.requests[("blob", "miss")] == 1
    assert registry.requests[("manifest", "error")] == 4  # the writes (a bad name has no kind yet)


async def test_a_stored_manifest_that_fails_its_digest_is_never_served(held: list[HeldRelease]) -> None:
    registry = Registry(ReleaseImages(lambda: held))
    new = make_image(seed=2)
    corrupt(held[1].root / blob_path(new.manifest_digest))
    resp = await call(registry, "GET", "/v2/org/app/manifests/v1")
    assert (resp.status, errors(resp)) == (404, ["BLOB_UNKNOWN"])
    assert registry.verified.mismatches == 1
    assert registry.requests[("manifest", "error")] == 1
    out = Exposition()
    registry.collect_metrics(out)
    text = out.render()
    assert sample(text, "meshd_registry_digest_mismatches_total") == 1
    assert sample(text, "meshd_registry_requests_total", kind="manifest", result="error") == 1


async def test_a_file_is_hashed_once_then_recognised(held: list[HeldRelease]) -> None:
    registry = Registry(ReleaseImages(lambda: held))
    calls = 0
    check = registry.verified.check

    def counting(*args: object) -> bool:
        nonlocal calls
        calls += 1
        return check(*args)  # type: ignore[arg-type]

    registry.verified.check = counting  # type: ignore[method-assign,assignment]
    for _ in range(3):
        assert (await call(registry, "GET", "/v2/org/app/manifests/v1")).status == 200
    assert calls == 1


def test_image_rows_say_which_release_serves_a_tag_and_where_it_is(held: list[HeldRelease]) -> None:
    images = ReleaseImages(lambda: held)
    rids = [h.manifest.release_id for h in held]
    rows = image_rows(
        images.images(),
        images,
        [{"id": rids[0], "complete_on": ["a", "b"]}, {"id": rids[1], "complete_on": ["a", "c"]}],
        {"a": "north", "b": "north", "c": "south"},
    )
    assert [(r["version"], r["serving"], r["sites"]) for r in rows] == [
        ("1", False, {"north": 2}),
        ("2", True, {"north": 1, "south": 1}),
    ]
    assert rows[1]["digest"] == make_image(seed=2).manifest_digest
