"""The OpenAPI 3.1 document of the operator API, served at GET /v1/openapi.json (DESIGN.md).

Python data, built once: every route the app registers (tests/unit/test_api_openapi.py checks
the set against app.router), the parameters with the limits the handlers enforce, the bodies,
every answer's JSON schema as the handlers build it, and the {"error", "detail"} body with the
statuses each route can give. Field names here are contract, like DESIGN.md's table.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
from aiohttp import web

from meshd import __version__
from meshd.api.app import HEALTH_VALUES, MAX_BODY, MAX_CLIENT_SSE, MAX_JOIN_ADDRS, STATES, STATIC_FILES
from meshd.api.queries import MAX_FILTER_NODES, MAX_FILTER_TAGS, MAX_PAYLOAD
from meshd.release.api import MAX_ORIGINS
from meshd.release.manifest import NAME_RE, RESERVED_VERSIONS

__all__ = ["OPENAPI_PATH", "add_openapi_route", "openapi_document"]

OPENAPI_PATH = "/v1/openapi.json"
_JSON = "application/json"
_DURATION = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)?$"  # units.parse_duration
_RELEASE_NAME = f"^{NAME_RE.pattern}$"  # release/manifest.py
_QUERY_STATUSES = ("passing", "warning", "critical", "unknown")
_RELEASE_STATES = ("waiting", "downloading", "activating", "failed", "active", "installed", "complete")


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object with these required properties (more may come: answers grow, clients ignore)."""
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
    }


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_NAMES = {"type": "array", "items": _STR}
_STR_MAP = {"type": "object", "additionalProperties": _STR}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        **_obj({"error": _STR, "detail": {}}),
        "description": "Every error: a short code and a human detail (a string, or null).",
    },
    "Member": _obj(
        {
            "name": _STR,
            "id": _STR,
            "addr": _STR,
            "site": _STR,
            "tags": _STR_MAP,
            "state": {"enum": list(STATES)},
            "incarnation": _INT,
            "health": {"enum": list(HEALTH_VALUES), "description": "unknown for a node not alive"},
        }
    ),
    "Status": _obj(
        {
            "name": _STR,
            "id": _STR,
            "cluster": _STR,
            "site": _STR,
            "addr": _STR,
            "addr_source": _STR,
            "version": _STR,
            "uptime_s": _NUM,
            "ready": _BOOL,
            "members": _obj(dict.fromkeys(STATES, _INT)),
            "clock_skew": _obj(
                {"peers": _INT, "max_offset_s": _NUM},
                {
                    "threshold_s": _NUM,
                    "skewed": {
                        "type": "array",
                        "items": _obj({"name": _STR, "id": _STR, "offset_s": _NUM}),
                    },
                },
            ),
            "transfer": _obj({"sent_bytes": _INT, "received_bytes": _INT, "origin_bytes": _INT}),
        }
    ),
    "Keys": _obj(
        {
            "keys": {"type": "array", "items": _obj({"id": _STR, "primary": _BOOL})},
            "primary": {"type": ["string", "null"]},
            "insecure": {**_BOOL, "description": "true: the node runs --insecure, no keyring"},
        }
    ),
    "QueryAnswer": {
        **_obj(
            {"name": _STR, "site": {"type": ["string", "null"]}},
            {
                "elapsed_ms": _NUM,
                "status": {"enum": list(_QUERY_STATUSES)},
                "checks": {"type": "array", "items": {"type": "object"}},
                "handler": _STR,
                "exit_code": {"type": ["integer", "null"]},
                "output": _STR,
                "truncated": _BOOL,
                "error": _STR,
                "detail": {},
                "handlers": _NAMES,
                "payload": _STR,
            },
        ),
        "description": "One node's answer object, with name, site and elapsed_ms added; "
        '"payload" when the answer was not a JSON object.',
    },
    "QueryResult": _obj(
        {
            "responses": {"type": "array", "items": _ref("QueryAnswer")},
            "missing": _NAMES,
            "elapsed_ms": _NUM,
            "timed_out": _BOOL,
        }
    ),
    "SiteSummary": _obj(
        {
            "sites": {
                "type": "object",
                "additionalProperties": _obj(
                    {
                        "nodes": _INT,
                        "passing": _INT,
                        "warning": _INT,
                        "critical": _INT,
                        "missing": _NAMES,
                        "failing": {
                            "type": "array",
                            "items": _obj(
                                {"name": _STR, "status": {"enum": list(_QUERY_STATUSES)}, "checks": _NAMES}
                            ),
                        },
                    }
                ),
            },
            "elapsed_ms": _NUM,
            "timed_out": _BOOL,
        }
    ),
    "Target": _obj({"site": {"type": ["string", "null"]}, "tags": _STR_MAP}),
    "Release": _obj(
        {
            "name": _STR,
            "version": _STR,
            "id": _STR,
            "size": _INT,
            "chunks": _INT,
            "have_chunks": _INT,
            "state": {"enum": list(_RELEASE_STATES)},
            "current": _BOOL,
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "created": {**_STR, "description": "YYYY-MM-DDTHH:MM:SSZ, informational"},
            "seq": _INT,
            "target": _ref("Target"),
            "nodes_complete": _INT,
            "complete_on": _NAMES,
            "current_on": _NAMES,
            "nodes": {
                "type": "object",
                "additionalProperties": {"type": "string", "pattern": r"^[0-9]+/[0-9]+$"},
                "description": "node name -> have/total chunks",
            },
        },
        {
            "error": _STR,
            "bytes": {
                **_obj({"site": _INT, "remote_site": _INT, "origin": _INT}),
                "description": "bytes this node received for it: from peers in its site, in other "
                "sites, from the origin",
            },
        },
    ),
    "RolloutSite": _obj(
        {
            "nodes": _INT,
            "complete": _INT,
            "fetching": _INT,
            "waiting": _INT,
            "current": _INT,
            "have_chunks": _INT,
            "total_chunks": _INT,
            "percent": {"type": "number", "minimum": 0, "maximum": 100},
            "down": _NAMES,
        }
    ),
    "Rollout": _obj(
        {
            "releases": {
                "type": "array",
                "items": _obj(
                    {
                        "name": _STR,
                        "version": _STR,
                        "id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                        "seq": _INT,
                        "chunks": _INT,
                        "nodes": _INT,
                        "complete": _INT,
                        "percent": {"type": "number", "minimum": 0, "maximum": 100},
                        "sites": {"type": "object", "additionalProperties": _ref("RolloutSite")},
                    }
                ),
            }
        }
    ),
    "Images": _obj(
        {
            "node": _STR,
            "site": _STR,
            "images": {
                "type": "array",
                "items": _obj(
                    {
                        "repository": _STR,
                        "tag": _STR,
                        "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
                        "media_type": _STR,
                        "size": _INT,
                        "release": _STR,
                        "version": _STR,
                        "release_id": _STR,
                        "serving": {
                            **_BOOL,
                            "description": "whether the registry answers this tag from this release now",
                        },
                        "nodes": {**_NAMES, "description": "alive members that have the release complete"},
                        "sites": {"type": "object", "additionalProperties": _INT},
                    }
                ),
            },
        },
        {
            "cache": {
                **_obj({"blobs": _INT, "bytes": _INT, "cap": _INT}),
                "description": "this node's pull-through cache (only with --registry-upstream)",
            },
            "caches": {
                "type": "array",
                "description": "pull-through caches of this node's and the other alive members, from "
                "what they gossip (`ocicache`)",
                "items": _obj({"node": _STR, "site": _STR, "blobs": _INT, "bytes": _INT}),
            },
        },
    ),
    "Reload": _obj(
        {"ok": _BOOL, "applied": _NAMES, "restart_needed": _NAMES, "error": {"type": ["string", "null"]}}
    ),
    "Releases": _obj(
        {
            "releases": {"type": "array", "items": _ref("Release")},
            "publishing": {
                "type": "array",
                "items": _obj({"name": _STR, "version": _STR, "done_bytes": _INT, "total_bytes": _INT}),
            },
        }
    ),
    "Published": _obj(
        {
            "id": _STR,
            "name": _STR,
            "version": _STR,
            "seq": _INT,
            "size": _INT,
            "files": _INT,
            "chunks": _INT,
            "new_chunks": _INT,
            "stored_bytes": _INT,
            "origin_dir": {"type": ["string", "null"]},
            "origins": _NAMES,
            "target": _ref("Target"),
        }
    ),
}

# --- answers -----------------------------------------------------------------------------------

_ERROR_WHY = {
    400: "Bad parameters or body (JSON); or, as text/plain from the HTTP server before meshd "
    "sees the request, a request line or header over 8190 bytes",
    401: "No Authorization header (changes need the API token)",
    403: "Wrong API token, or an Origin that is not this API",
    404: "No such thing",
    409: "Conflicts with the node's state",
    413: f"Body over {MAX_BODY} bytes",
    421: "The Host header does not name this API (DNS rebinding guard)",
    429: "Too many long requests of this client or in all (see Retry-After)",
    501: "This node does not run queries",
    502: "No seed answered",
    503: "Too many queries in flight on the node (see Retry-After)",
    507: "The release store failed (disk full?)",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}}


def _error(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {"description": _ERROR_WHY[status], "content": {_JSON: {"schema": _ref("Error")}}}
    if status in (429, 503):
        out["headers"] = copy.deepcopy(_RETRY_AFTER)
    if status == 400:
        out["content"]["text/plain"] = {"schema": _STR}
    return out


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _responses(ok: dict[int, dict[str, Any]], *errors: int) -> dict[str, Any]:
    """The route's own answers plus what any route can say: 421 and 403 (the Host and Origin
    guard), 400 (a request line or header too long for the HTTP server)."""
    out: dict[str, Any] = {str(status): body for status, body in ok.items()}
    for status in sorted({*errors, 400, 403, 421}):
        out[str(status)] = _error(status)
    return out


_CHANGE = (400, 401, 403, 413)  # every POST: the token, the body's size and shape


def _param(name: str, where: str, schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": where, "schema": schema, "description": description, **extra}


def _tag_list(name: str) -> dict[str, Any]:
    return _param(
        name,
        "query",
        {"type": "array", "items": {"type": "string", "pattern": "^[^=]+=.*$"}, "maxItems": MAX_FILTER_TAGS},
        "KEY=VALUE, repeatable; every one must match",
        style="form",
        explode=True,
    )


_FILTER_PARAMS = [
    _param(
        "node",
        "query",
        {"type": "array", "items": _STR, "maxItems": MAX_FILTER_NODES},
        f"node names, repeatable and/or comma lists (at most {MAX_FILTER_NODES})",
        style="form",
        explode=True,
    ),
    _param("site", "query", _STR, 'a site, or "re:<RE2 pattern>" (the pattern needs the API token)'),
    _tag_list("tag"),
    _param(
        "timeout", "query", {"type": "string", "pattern": _DURATION}, "a duration: 250ms, 3s, 1m (max 300s)"
    ),
    _param("relay_factor", "query", {"type": "string", "pattern": "^[0-9]+$"}, "relays per answer (max 5)"),
]

_QUERY_BODY = _obj(
    {"name": {"type": "string", "minLength": 1, "pattern": r"\S"}},
    {
        "payload": {
            "type": ["string", "null"],
            "description": f"given to handlers on stdin; at most {MAX_PAYLOAD} bytes",
        },
        "site": {"type": ["string", "null"]},
        "nodes": {
            "oneOf": [_STR, {"type": "array", "items": _STR, "maxItems": MAX_FILTER_NODES}, {"type": "null"}]
        },
        "tags": {
            "oneOf": [
                _STR_MAP,
                {"type": "array", "items": {"type": "string", "pattern": "^[^=]+=.*$"}},
                _STR,
                {"type": "null"},
            ]
        },
        "timeout": {
            "oneOf": [{"type": "string", "pattern": _DURATION}, {"type": "number", "exclusiveMinimum": 0}]
        },
        "relay_factor": {"type": "integer", "minimum": 0, "maximum": 5},
    },
)

_RELEASE_BODY = _obj(
    {
        "path": {"type": "string", "pattern": "^/", "description": "a file or directory on the node's host"},
        "name": {"type": "string", "pattern": _RELEASE_NAME},
        "version": {"type": "string", "pattern": _RELEASE_NAME, "not": {"enum": sorted(RESERVED_VERSIONS)}},
        "key_file": {"type": "string", "pattern": "^/", "description": "the publisher's Ed25519 key file"},
    },
    {
        "site": {"type": ["string", "null"], "pattern": r"\S"},
        "tags": {
            "oneOf": [
                _STR_MAP,
                {"type": "array", "items": {"type": "string", "pattern": "=.*"}},
                {"type": "null"},
            ]
        },
        "origin_dir": {"type": ["string", "null"], "pattern": "^/"},
        "origins": {"type": ["array", "null"], "items": _STR, "maxItems": MAX_ORIGINS},
    },
)


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": schema}}}


_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]

_PATHS: dict[str, Any] = {
    "/": {
        "get": {
            "summary": "The dashboard page (static HTML and an EventSource; no external assets)",
            "responses": _responses(
                {200: {"description": "HTML", "content": {"text/html": {"schema": _STR}}}}
            ),
        }
    },
    "/v1/status": {
        "get": {"summary": "This node", "responses": _responses({200: _ok(_ref("Status"))})},
    },
    "/v1/members": {
        "get": {
            "summary": "The members this node knows, sorted by name",
            "parameters": [
                _param(
                    "state",
                    "query",
                    {"type": "string", "pattern": f"^({'|'.join(STATES)})(,({'|'.join(STATES)}))*$"},
                    "comma list of states",
                ),
                _param("site", "query", _STR, "only this site"),
                _param("name", "query", _STR, "only this name"),
                _tag_list("tag"),
            ],
            "responses": _responses(
                {200: _ok(_obj({"members": {"type": "array", "items": _ref("Member")}}))}, 400
            ),
        }
    },
    "/v1/join": {
        "post": {
            "summary": "Push-pull with these seeds (as Serf's join)",
            "security": _SECURED,
            "requestBody": _body(
                _obj(
                    {
                        "addrs": {
                            "type": "array",
                            "items": {"type": "string", "description": "host:port (port defaults)"},
                            "minItems": 1,
                            "maxItems": MAX_JOIN_ADDRS,
                        }
                    }
                )
            ),
            "responses": _responses(
                {200: _ok(_obj({"joined": {"type": "integer", "minimum": 1}}))}, *_CHANGE, 502
            ),
        }
    },
    "/v1/leave": {
        "post": {
            "summary": "Leave the mesh gracefully; the daemon then stops",
            "security": _SECURED,
            "responses": _responses({200: _ok(_obj({"leaving": {"const": True}}))}, *_CHANGE),
        }
    },
    "/v1/keys": {
        "get": {
            "summary": "The cluster keyring (key ids only)",
            "responses": _responses({200: _ok(_ref("Keys"))}),
        },
        "post": {
            "summary": "Install, use or remove a cluster key",
            "security": _SECURED,
            "requestBody": _body(
                _obj(
                    {
                        "op": {"enum": ["install", "use", "remove"]},
                        "key": {
                            "type": "string",
                            "pattern": "^[A-Za-z0-9+/]{43}=$",
                            "description": "32 bytes, base64",
                        },
                    }
                )
            ),
            "responses": _responses({200: _ok(_ref("Keys"))}, *_CHANGE, 409),
        },
    },
    "/v1/events": {
        "get": {
            "summary": "Server-sent events: member, keyring, health, release, query, reload, stats, reset",
            "description": "Every frame has an id (<boot>-<seq>). Reconnect with Last-Event-ID (or "
            "?last_event_id=) to get the events missed first; an id from another run, or older than "
            "the node keeps, starts the stream with `event: reset` (reload the state).",
            "parameters": [
                _param("Last-Event-ID", "header", _STR, "the id of the last event seen"),
                _param("last_event_id", "query", _STR, "the same, for clients that cannot set headers"),
            ],
            "responses": _responses(
                {200: {"description": "an event stream", "content": {"text/event-stream": {"schema": _STR}}}},
                429,
            )
            | {
                "429": {
                    **_error(429),
                    "description": f"At most {MAX_CLIENT_SSE} streams of one client (see Retry-After)",
                }
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus text format, names prefixed meshd_",
            "responses": _responses(
                {200: {"description": "metrics", "content": {"text/plain": {"schema": _STR}}}}
            ),
        }
    },
    "/healthz": {
        "get": {
            "summary": "Liveness",
            "responses": _responses({200: _ok(_obj({"status": {"const": "ok"}}))}),
        },
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: 200 once joined (or alone by intent)",
            "responses": _responses(
                {
                    200: _ok(_obj({"ready": {"const": True}, "detail": _STR})),
                    503: _ok(_obj({"ready": {"const": False}, "detail": _STR}), "not ready yet"),
                }
            ),
        }
    },
    "/v1/health": {
        "get": {
            "summary": "A health query to the matching nodes (or, with summary=site, one summary per site)",
            "description": "Returns as soon as every matching alive node has answered, or at the timeout.",
            "parameters": [
                *_FILTER_PARAMS,
                _param("summary", "query", {"enum": ["site"]}, "site: aggregate inside each site"),
            ],
            "responses": _responses(
                {200: _ok({"anyOf": [_ref("QueryResult"), _ref("SiteSummary")]})}, 400, 401, 429, 501, 503
            ),
        }
    },
    "/v1/query": {
        "post": {
            "summary": "A named query to the matching nodes' handlers",
            "security": _SECURED,
            "requestBody": _body(_QUERY_BODY),
            "responses": _responses({200: _ok(_ref("QueryResult"))}, *_CHANGE, 429, 501, 503),
        }
    },
    "/v1/releases": {
        "get": {"summary": "Releases this node knows", "responses": _responses({200: _ok(_ref("Releases"))})},
        "post": {
            "summary": "Publish a file or directory of the node's host as a signed release",
            "security": _SECURED,
            "requestBody": _body(_RELEASE_BODY),
            "responses": _responses({201: _ok(_ref("Published"), "published")}, *_CHANGE, 409, 507),
        },
    },
    "/v1/images": {
        "get": {
            "summary": "Container images this node serves on --registry (from signed image releases)",
            "description": "One row per image release and tag; `nodes` and `sites` say where else the "
            "release is complete, from what members gossip.",
            "responses": _responses({200: _ok(_ref("Images"))}),
        }
    },
    "/v1/rollout": {
        "get": {
            "summary": "How far each release has spread, per site, from what members gossip",
            "description": "Only alive members count; a dead member that announced a release is listed in "
            "its site's `down`.",
            "responses": _responses({200: _ok(_ref("Rollout"))}),
        }
    },
    "/v1/reload": {
        "post": {
            "summary": "Re-read the configuration file as SIGHUP does (as `consul reload`)",
            "description": "Applies checks, query handlers, trusted publisher keys, tags, rate caps and "
            "logging; names the changed settings that need a restart. A refused file changes nothing (409).",
            "security": _SECURED,
            "responses": _responses({200: _ok(_ref("Reload"))}, *_CHANGE, 409),
        }
    },
    "/static/{name}": {
        "get": {
            "summary": "The dashboard's script and style sheet (a fixed list of names)",
            "parameters": [
                _param(
                    "name", "path", {"enum": sorted(STATIC_FILES)}, "a file of the dashboard", required=True
                ),
            ],
            "responses": _responses(
                {
                    200: {
                        "description": "the file",
                        "content": {"text/javascript": {"schema": _STR}, "text/css": {"schema": _STR}},
                    }
                },
                404,
            ),
        }
    },
    OPENAPI_PATH: {
        "get": {
            "summary": "This document",
            "responses": _responses(
                {200: {"description": "OpenAPI 3.1", "content": {_JSON: {"schema": {"type": "object"}}}}}
            ),
        }
    },
}


def openapi_document() -> dict[str, Any]:
    """The document (a fresh copy: callers may edit it)."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "meshd operator API",
                "version": __version__,
                "description": "Reads are open; changes need Authorization: Bearer <token> (the token "
                'in <data-dir>/api-token). Every error is JSON {"error", "detail"}.',
            },
            "paths": _PATHS,
            "components": {
                "schemas": _SCHEMAS,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }
    )


_DOCUMENT = orjson.dumps(openapi_document())


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=_DOCUMENT, content_type=_JSON)


def add_openapi_route(app: web.Application) -> None:
    app.router.add_get(OPENAPI_PATH, get_openapi)
