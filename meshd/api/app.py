"""The operator HTTP API (DESIGN.md "Operator API"; names and fields are contract).

Reads are open; changes need `Authorization: Bearer <token>` (the token in
<data-dir>/api-token). Every route answers only requests whose Host (and Origin, if sent) names
this API (api/guard.py: DNS rebinding); event streams and queries are limited per client
(api/limits.py). Every error is JSON {"error": ..., "detail": ...}. The app talks to
the daemon only through the `Agent` protocol (api/agent.py), so tests can drive it with a fake;
route modules share the JSON helpers of api/http.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.resources
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from meshd import __version__
from meshd.api.agent import AGENT, Agent, EventLike, MemberLike
from meshd.api.events import EventHub, Opening
from meshd.api.guard import AllowedHost, HostPolicy, split_authority, split_origin
from meshd.api.http import ApiError, error_response, json_response, read_json, require_token
from meshd.api.limits import API_COUNTERS, SLOW_READER, ClientSlots, client_of, collect_api_metrics
from meshd.api.queries import IN_FLIGHT, add_query_routes
from meshd.config import DEFAULT_PORT
from meshd.core.counters import Counters
from meshd.core.messages import MemberState
from meshd.errors import ConfigError, MeshError, StateError
from meshd.metrics import CONTENT_TYPE, Exposition
from meshd.net.http_server import HttpServer
from meshd.release.rollout import rollout
from meshd.units import format_hostport, parse_hostport

log = logging.getLogger("meshd.api")

MAX_BODY = 256 * 1024
MAX_JOIN_ADDRS = 64
MAX_SSE_CLIENTS = 64  # event streams open at once, all clients
MAX_CLIENT_SSE = 4  # ... from one client address
SSE_KEEPALIVE = 15.0
SSE_POLL = 1.0  # how soon a stream whose client went away gives its slot back
SSE_WRITE_TIMEOUT = 10.0  # a client that takes longer to accept a frame is dropped
STATES = {s.name.lower(): s for s in MemberState}
HEALTH_VALUES = ("passing", "warning", "critical", "unknown")
_MUTATING = ("POST", "PUT", "PATCH", "DELETE")

SHUTDOWN = web.AppKey("shutdown", asyncio.Event)
HOST_POLICY = web.AppKey("host_policy", HostPolicy)
SSE_CLIENTS = web.AppKey("sse_clients", ClientSlots)
EVENT_HUB = web.AppKey("event_hub", EventHub)


# --- helpers ---------------------------------------------------------------------------------


def member_json(m: MemberLike) -> dict[str, Any]:
    meta = m.meta
    # A node's health is what it last announced; once it is not alive that is stale, not known.
    health = meta.get("health", "unknown") if m.state == MemberState.ALIVE else "unknown"
    return {
        "name": m.name,
        "id": m.node_id,
        "addr": m.addr,
        "site": meta.get("site", "default"),
        "tags": {k[4:]: v for k, v in meta.items() if k.startswith("tag:")},
        "state": m.state.name.lower(),
        "incarnation": m.incarnation,
        "health": health if health in HEALTH_VALUES else "unknown",
    }


def count_states(members: Sequence[MemberLike]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for m in members:
        counts[m.state.name.lower()] += 1
    return counts


def _parse_tag_filter(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ApiError(400, "bad_filter", f"tag filter must be KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


def filter_members(
    members: Sequence[MemberLike], query: Mapping[str, str], tags: list[str]
) -> list[MemberLike]:
    states: set[MemberState] | None = None
    if query.get("state"):
        states = set()
        for s in query["state"].split(","):
            st = STATES.get(s.strip().lower())
            if st is None:
                raise ApiError(400, "bad_filter", f"unknown state {s!r} (one of {', '.join(STATES)})")
            states.add(st)
    site = query.get("site") or None
    name = query.get("name") or None
    tag_filters = [_parse_tag_filter(t) for t in tags]
    out = []
    for m in members:
        if states is not None and m.state not in states:
            continue
        if site is not None and m.meta.get("site", "default") != site:
            continue
        if name is not None and m.name != name:
            continue
        if any(m.meta.get("tag:" + k) != v for k, v in tag_filters):
            continue
        out.append(m)
    return sorted(out, key=lambda m: m.name)


# --- middleware --------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.error, e.detail)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        error = (e.reason or "error").lower().replace(" ", "_")
        resp = error_response(e.status, error, e.text if e.text and e.text != e.reason else None)
        for h in ("Allow",):
            if h in e.headers:
                resp.headers[h] = e.headers[h]
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("API handler failed: %s %s", request.method, request.path)
        return error_response(500, "internal_error", "see the meshd log")


def _local_address(request: web.Request) -> tuple[str, int] | None:
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sock, tuple) and len(sock) >= 2:
        return str(sock[0]), int(sock[1])
    return None


def _shown(value: str) -> str:
    return value if len(value) <= 80 else value[:80] + "..."


@web.middleware
async def origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route: the Host (and Origin, when sent) must name this API, so a page that rebinds
    its own DNS name to this address reads nothing. No CORS headers are ever sent."""
    app, policy, local = request.app, request.app[HOST_POLICY], _local_address(request)
    hosts = request.headers.getall("Host", [])
    host = split_authority(hosts[0]) if len(hosts) == 1 else None
    if host is None or not policy.names_this_api(*host, local):
        app[API_COUNTERS].inc("refused.host")
        shown = _shown(hosts[0]) if len(hosts) == 1 else f"{len(hosts)} Host headers"
        raise ApiError(
            421,
            "misdirected_request",
            f"Host {shown!r} does not name this API (use its address, or allow the name with "
            "--api-allow-host)",
        )
    origins = request.headers.getall("Origin", [])
    if origins:
        origin = split_origin(origins[0]) if len(origins) == 1 else None
        if origin is None or not policy.names_this_api(*origin, local):
            app[API_COUNTERS].inc("refused.origin")
            raise ApiError(403, "cross_origin", f"Origin {_shown(origins[0])!r} is not this API")
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in _MUTATING:
        require_token(request)
    return await handler(request)


# --- handlers ----------------------------------------------------------------------------------


async def get_status(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    t = agent.transfer
    return json_response(
        {
            "name": agent.name,
            "id": agent.node_id,
            "cluster": agent.cluster,
            "site": agent.site,
            "addr": agent.addr,
            "addr_source": agent.addr_source,
            "version": __version__,
            "uptime_s": round(agent.uptime(), 3),
            "ready": agent.is_ready(),
            "members": count_states(agent.members()),
            "clock_skew": agent.clock_skew(),
            "transfer": {
                "sent_bytes": t.sent_bytes,
                "received_bytes": t.received_bytes,
                "origin_bytes": t.origin_bytes,
            },
        }
    )


async def get_members(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    members = filter_members(agent.members(), request.query, request.query.getall("tag", []))
    return json_response({"members": [member_json(m) for m in members]})


async def post_join(request: web.Request) -> web.Response:
    body = await read_json(request)
    addrs = body.get("addrs")
    if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
        raise ApiError(400, "bad_request", 'expected {"addrs": ["host:port", ...]}')
    if len(addrs) > MAX_JOIN_ADDRS:
        raise ApiError(400, "bad_request", f"at most {MAX_JOIN_ADDRS} addresses")
    try:
        norm = [format_hostport(*parse_hostport(a, "addrs", DEFAULT_PORT)) for a in addrs]
    except ConfigError as e:
        raise ApiError(400, "bad_address", str(e)) from None
    joined = await request.app[AGENT].join(norm)
    if joined == 0:
        raise ApiError(502, "join_failed", f"no seed answered: {', '.join(norm)}")
    return json_response({"joined": joined})


async def post_leave(request: web.Request) -> web.Response:
    request.app[AGENT].request_leave()
    return json_response({"leaving": True})


async def post_reload(request: web.Request) -> web.Response:
    """Re-read the configuration as SIGHUP does; 409 with the reason when the file is refused
    (the node keeps its settings)."""
    outcome = await request.app[AGENT].reload()
    if not outcome["ok"]:
        raise ApiError(409, "reload_failed", outcome["error"])
    return json_response(outcome)


def _keys_json(agent: Agent) -> dict[str, Any]:
    keys = agent.keys()
    if keys is None:
        return {"keys": [], "primary": None, "insecure": True}
    ids, primary = keys
    return {
        "keys": [{"id": k, "primary": k == primary} for k in ids],
        "primary": primary,
        "insecure": False,
    }


async def get_keys(request: web.Request) -> web.Response:
    return json_response(_keys_json(request.app[AGENT]))


async def post_keys(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    body = await read_json(request)
    op, key_text = body.get("op"), body.get("key")
    if op not in ("install", "use", "remove"):
        raise ApiError(400, "bad_request", 'op must be "install", "use" or "remove"')
    if not isinstance(key_text, str):
        raise ApiError(400, "bad_request", "key must be the base64 text of a 32-byte key")
    try:
        key = base64.b64decode(key_text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_key", "key is not base64 text") from None
    if len(key) != 32:
        raise ApiError(400, "bad_key", f"expected 32 bytes of key, got {len(key)}")
    if agent.keys() is None:
        raise ApiError(409, "insecure", "this node runs --insecure; it has no keyring")
    try:
        agent.key_op(op, key)
    except StateError as e:
        raise ApiError(409, "key_state", str(e)) from None
    except MeshError as e:
        raise ApiError(400, "bad_key", str(e)) from None
    return json_response(_keys_json(agent))


def event_json(ev: EventLike) -> bytes:
    member = member_json(ev.member) if ev.member is not None else None
    return orjson.dumps({"kind": ev.kind, "member": member})


def sse_frame(ev: EventLike, event_id: str | None = None) -> bytes:
    """One SSE frame: member/keyring events, or events that carry their own JSON payload
    (release events from update distribution); with its id (api/events.py) when given."""
    head = b"id: " + event_id.encode() + b"\n" if event_id is not None else b""
    payload = getattr(ev, "payload", None)
    if isinstance(payload, dict):
        return head + b"event: " + ev.kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
    name = b"keyring" if ev.kind == "keyring" else b"member"
    return head + b"event: " + name + b"\ndata: " + event_json(ev) + b"\n\n"


def reset_frame(event_id: str, last_event_id: str, why: str) -> bytes:
    """The stream cannot give what came after `last_event_id`: the client reloads its state."""
    data = orjson.dumps({"last_event_id": last_event_id, "detail": why})
    return b"id: " + event_id.encode() + b"\nevent: reset\ndata: " + data + b"\n\n"


def _too_many_streams(refused: str) -> web.Response:
    detail = (
        f"at most {MAX_CLIENT_SSE} event streams from one client"
        if refused == "per_client"
        else f"at most {MAX_SSE_CLIENTS} event streams"
    )
    resp = error_response(429, "too_many_streams", detail)
    resp.headers["Retry-After"] = "5"
    return resp


async def _send(request: web.Request, resp: web.StreamResponse, frame: bytes) -> bool:
    """Write one frame; False (and the connection aborted) when the client does not take it in
    time: a reader that never reads costs a bounded buffer, not memory without limit."""
    try:
        await asyncio.wait_for(resp.write(frame), SSE_WRITE_TIMEOUT)
    except TimeoutError:
        request.app[API_COUNTERS].inc(SLOW_READER)
        if request.transport is not None:
            request.transport.abort()  # close() would wait for the full buffer to drain
        return False
    return True


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def get_events(request: web.Request) -> web.StreamResponse:
    app = request.app
    slots, client = app[SSE_CLIENTS], client_of(request)
    refused = slots.acquire(client)
    if refused is not None:
        app[API_COUNTERS].inc(f"refused.events_{refused}")
        return _too_many_streams(refused)
    try:
        return await _stream_events(request)
    finally:
        slots.release(client)


def _last_event_id(request: web.Request) -> str | None:
    """Where a client that comes back got to: the Last-Event-ID header (EventSource sends it
    when it reconnects), or ?last_event_id= (a first connection cannot set headers)."""
    value = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    return value.strip()[:200] if value and value.strip() else None


def _opening_frames(opening: Opening, last_event_id: str | None) -> list[bytes]:
    hello = b"retry: 2000\n"
    if opening.hello_id is not None and opening.reset is None:
        hello += b"id: " + opening.hello_id.encode() + b"\n"  # a position before any event
    frames = [hello + b": meshd events\n\n"]
    if opening.reset is not None and opening.hello_id is not None and last_event_id is not None:
        frames.append(reset_frame(opening.hello_id, last_event_id, opening.reset))
    frames.extend(sse_frame(ev, event_id) for event_id, ev in opening.backlog)
    return frames


async def _stream_events(request: web.Request) -> web.StreamResponse:
    app = request.app
    last_event_id = _last_event_id(request)
    reader, opening = app[EVENT_HUB].open(last_event_id)
    getter: asyncio.Future[Any] | None = None
    stop: asyncio.Future[Any] | None = None
    try:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        shutdown = app[SHUTDOWN]
        stop = asyncio.ensure_future(shutdown.wait())
        loop = asyncio.get_running_loop()
        sent = True
        for frame in _opening_frames(opening, last_event_id):
            sent = sent and await _send(request, resp, frame)
        last = loop.time()
        # aiohttp does not cancel a handler whose client left: look at the transport now and
        # then, so a closed stream gives its per-client slot back within SSE_POLL. A stream
        # that fell behind ends: its client resumes from the last id it got.
        while sent and not reader.lost and not shutdown.is_set() and not _client_gone(request):
            if getter is None:
                getter = asyncio.ensure_future(reader.queue.get())
            done, _ = await asyncio.wait(
                {getter, stop}, timeout=SSE_POLL, return_when=asyncio.FIRST_COMPLETED
            )
            if getter in done:
                event_id, ev = getter.result()
                sent, last = await _send(request, resp, sse_frame(ev, event_id)), loop.time()
                getter = None
            elif stop not in done and loop.time() - last >= SSE_KEEPALIVE:
                sent, last = await _send(request, resp, b": keepalive\n\n"), loop.time()
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        if stop is not None:
            stop.cancel()
        if getter is not None:
            getter.cancel()  # a client gone mid-wait must not leave the Queue.get pending
        app[EVENT_HUB].close_reader(reader)
    return resp


async def get_rollout(request: web.Request) -> web.Response:
    """Rollout progress of every release per site, from the members' gossiped `rel:` entries."""
    return json_response({"releases": rollout(request.app[AGENT].members())})


async def get_metrics(request: web.Request) -> web.Response:
    app = request.app
    out = Exposition()
    app[AGENT].collect_metrics(out)
    collect_api_metrics(app[API_COUNTERS], out, streams=app[SSE_CLIENTS].count, queries=app[IN_FLIGHT].count)
    return web.Response(body=out.render().encode(), headers={"Content-Type": CONTENT_TYPE})


async def get_healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def get_readyz(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    if agent.is_ready():
        return json_response({"ready": True, "detail": agent.readiness_detail()})
    return json_response({"ready": False, "detail": agent.readiness_detail()}, 503)


# The dashboard's files (meshd/api/static/), by the name the page asks for: a fixed list, so no
# request path ever reaches the file system.
STATIC_FILES = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
}
_DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _static_file(name: str) -> bytes | None:
    try:
        return (importlib.resources.files("meshd.api") / "static" / name).read_bytes()
    except (FileNotFoundError, OSError):
        return None


async def get_index(request: web.Request) -> web.Response:
    body = _static_file("index.html") or b"<!doctype html><title>meshd</title><p>meshd: see /v1/members</p>"
    return web.Response(body=body, content_type="text/html", headers=_DASHBOARD_HEADERS)


async def get_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = STATIC_FILES.get(name)
    body = _static_file(name) if content_type else None
    if content_type is None or body is None:
        raise ApiError(404, "not_found", f"no dashboard file {name!r}")
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_DASHBOARD_HEADERS)


async def _on_shutdown(app: web.Application) -> None:
    app[SHUTDOWN].set()


async def _on_cleanup(app: web.Application) -> None:
    await app[EVENT_HUB].close()


def create_api_app(
    agent: Agent, allow_hosts: Iterable[AllowedHost] = (), boot: str | None = None
) -> web.Application:
    """The operator API; later features (health, query, releases) add their routes to it.

    `allow_hosts`: names the API answers besides loopback names and its own address. `boot`:
    what event ids of this run start with (default: random, new with every run)."""
    app = web.Application(
        client_max_size=MAX_BODY, middlewares=[error_middleware, origin_middleware, auth_middleware]
    )
    app[AGENT] = agent
    app[SHUTDOWN] = asyncio.Event()
    app[HOST_POLICY] = HostPolicy(allow_hosts)
    app[API_COUNTERS] = Counters()
    app[SSE_CLIENTS] = ClientSlots(MAX_CLIENT_SSE, MAX_SSE_CLIENTS)
    app[EVENT_HUB] = EventHub(agent.subscribe, boot if boot is not None else secrets.token_hex(4))
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    r = app.router
    r.add_get("/", get_index)
    r.add_get("/static/{name}", get_static)
    r.add_get("/v1/status", get_status)
    r.add_get("/v1/members", get_members)
    r.add_post("/v1/join", post_join)
    r.add_post("/v1/leave", post_leave)
    r.add_post("/v1/reload", post_reload)
    r.add_get("/v1/keys", get_keys)
    r.add_post("/v1/keys", post_keys)
    r.add_get("/v1/events", get_events)
    r.add_get("/v1/rollout", get_rollout)
    r.add_get("/metrics", get_metrics)
    r.add_get("/healthz", get_healthz)
    r.add_get("/readyz", get_readyz)
    add_query_routes(app)  # GET /v1/health, POST /v1/query
    return app


class ApiServer(HttpServer):
    """Runs the operator API (its `bound` address says which port a port-0 bind got)."""

    async def start(self, host: str, port: int) -> None:
        await super().start(host, port)
        if HOST_POLICY in self.app and self.bound is not None:
            # The name the API was bound by (--api gw1.lan:7789) is one of its names.
            self.app[HOST_POLICY].bound = (host, int(self.bound[1]))
