"""Operator API routes for releases (DESIGN.md: GET/POST /v1/releases), added to the API app.

POST /v1/releases publishes at this node (the daemon runs on the operator's host, so the body
names local paths): {"path", "name", "version", "key_file", "site"?, "tags"?, "origin_dir"?,
"origins"?}. It needs the API token like every change (the app's auth middleware).
"""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from meshd.api.http import ApiError, json_response, read_json
from meshd.errors import ConfigError, IntegrityError, StateError
from meshd.release.chunker import PublishError
from meshd.release.service import ReleaseService
from meshd.release.store import StoreError

RELEASE_SERVICE = web.AppKey("release_service", ReleaseService)
MAX_ORIGINS = 16


def _str(body: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "bad_request", f"{key!r} must be a non-empty string")
    return value.strip()


def _path(body: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = _str(body, key, required)
    if value is not None and not os.path.isabs(value):
        raise ApiError(400, "bad_request", f"{key!r} must be an absolute path on the node's host")
    return value


def _tags(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    if isinstance(value, list) and all(isinstance(t, str) and "=" in t for t in value):
        return dict(t.split("=", 1) for t in value)
    raise ApiError(400, "bad_request", "'tags' must be an object of strings or a list of 'k=v'")


async def get_releases(request: web.Request) -> web.Response:
    svc = request.app[RELEASE_SERVICE]
    return json_response({"releases": svc.releases(), "publishing": svc.publishing()})


async def post_releases(request: web.Request) -> web.Response:
    svc = request.app[RELEASE_SERVICE]
    body = await read_json(request)
    path = _path(body, "path")
    name = _str(body, "name")
    version = _str(body, "version")
    key_file = _path(body, "key_file")
    origin_dir = _path(body, "origin_dir", required=False)
    site = _str(body, "site", required=False)
    origins = body.get("origins") or []
    if (
        not isinstance(origins, list)
        or len(origins) > MAX_ORIGINS
        or not all(isinstance(o, str) for o in origins)
    ):
        raise ApiError(400, "bad_request", f"'origins' must be a list of at most {MAX_ORIGINS} URLs")
    assert path is not None
    assert name is not None
    assert version is not None
    assert key_file is not None
    try:
        info = await svc.publish(
            path,
            name,
            version,
            key_file,
            site=site,
            tags=_tags(body.get("tags")),
            origins=origins,
            origin_dir=origin_dir,
        )
    except PublishError as e:
        raise ApiError(400, "cannot_publish", str(e)) from None
    except ConfigError as e:
        raise ApiError(400, "bad_key", str(e)) from None
    except IntegrityError as e:
        raise ApiError(400, "bad_release", str(e)) from None
    except StateError as e:
        raise ApiError(409, "exists", str(e)) from None
    except StoreError as e:
        raise ApiError(507, "store_error", str(e)) from None
    return json_response(info, 201)


def add_release_routes(app: web.Application, service: ReleaseService) -> None:
    app[RELEASE_SERVICE] = service
    app.router.add_get("/v1/releases", get_releases)
    app.router.add_post("/v1/releases", post_releases)
