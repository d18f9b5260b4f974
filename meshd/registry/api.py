"""GET /v1/images on the operator API: the images this node serves, and where else in the mesh
each image release is complete (from what members gossip, per site)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from meshd.api.agent import AGENT
from meshd.api.http import json_response
from meshd.core.messages import MemberState
from meshd.registry.catalog import ImageRelease, ReleaseImages
from meshd.registry.pullthrough import PullThrough
from meshd.registry.site_cache import SUMMARY_KEY, decode_summary
from meshd.release.api import RELEASE_SERVICE

IMAGES = web.AppKey("images", ReleaseImages)
PULL = web.AppKey("pull_through", PullThrough)


def image_rows(
    images: Iterable[ImageRelease],
    resolve: ReleaseImages,
    release_rows: Iterable[Mapping[str, Any]],
    site_of: Mapping[str, str],
) -> list[dict[str, Any]]:
    """One row per (image release, tag): what the tag points at, whether this node serves that
    release for it now (the newest release naming it), and the nodes and sites that have it."""
    complete_on = {r["id"]: list(r.get("complete_on", [])) for r in release_rows}
    rows = []
    for img in images:
        m = img.release.manifest
        nodes = sorted(complete_on.get(m.release_id, []))
        sites: dict[str, int] = {}
        for n in nodes:
            site = site_of.get(n, "?")
            sites[site] = sites.get(site, 0) + 1
        for tag, desc in sorted(img.index.tags.items()):
            now = resolve.resolve(img.index.repository, tag)
            rows.append(
                {
                    "repository": img.index.repository,
                    "tag": tag,
                    "digest": desc.digest,
                    "media_type": desc.media_type,
                    "size": m.total_size,
                    "release": m.name,
                    "version": m.version,
                    "release_id": m.release_id,
                    "serving": now is not None and now.image.release.manifest.release_id == m.release_id,
                    "nodes": nodes,
                    "sites": dict(sorted(sites.items())),
                }
            )
    rows.sort(key=lambda r: (r["repository"], r["tag"], r["release"], r["version"]))
    return rows


async def get_images(request: web.Request) -> web.Response:
    images = request.app[IMAGES]
    agent = request.app[AGENT]
    site_of = {m.name: m.meta.get("site", "") for m in agent.members()}
    site_of[agent.name] = agent.site
    rows = image_rows(images.images(), images, request.app[RELEASE_SERVICE].releases(), site_of)
    doc: dict[str, Any] = {"node": agent.name, "site": agent.site, "images": rows}
    pull = request.app.get(PULL)
    caches = []
    if pull is not None:
        mine = doc["cache"] = pull.summary()
        caches.append(
            {"node": agent.name, "site": agent.site, "blobs": mine["blobs"], "bytes": mine["bytes"]}
        )
    for m in agent.members():
        held = decode_summary(m.meta.get(SUMMARY_KEY))
        if held is not None and m.name != agent.name and m.state == MemberState.ALIVE:
            site = m.meta.get("site", "default")
            caches.append({"node": m.name, "site": site, "blobs": held[0], "bytes": held[1]})
    if caches:
        doc["caches"] = sorted(caches, key=lambda c: (c["site"], c["node"]))
    return json_response(doc)


def add_image_routes(app: web.Application, images: ReleaseImages, pull: PullThrough | None = None) -> None:
    """After add_release_routes (it reads the release service's rows). With a pull-through, the
    answer says what its cache holds ("cache": blobs, bytes, cap)."""
    app[IMAGES] = images
    if pull is not None:
        app[PULL] = pull
    app.router.add_get("/v1/images", get_images)
