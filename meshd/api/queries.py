"""Operator API routes for gossip queries: GET /v1/health and POST /v1/query (DESIGN.md).

    GET /v1/health?site=S&node=N&tag=K=V&timeout=3s&relay_factor=1&summary=site   (open, no token)
        node: repeatable and/or a comma list; tag: repeatable; site and tag values may be
        "re:<pattern>" (a full-match RE2 regular expression, linear time: no backreferences or
        lookaround; only with the API token, as every matching node runs it); timeout: a
        duration (250ms, 3s, 1m;
        default Serf's: gossip interval x 16 x ceil(log10(N+1))).
    POST /v1/query {"name", "payload", "site", "nodes", "tags", "timeout", "relay_factor"}
        (needs the API token: query handlers run commands on every matching node)
        payload: a string, given to each node's handler on stdin; nodes: a list (or comma
        string); tags: {"k": "v"} or ["k=v", ...]; timeout: "3s" or a number of seconds.

With summary=site, each site's answers are gathered inside the site and one summary per site
comes back (meshd.core.aggregate; the asking node gets about one message per site, not one per
node), answered as {"sites": {"<site>": {"nodes", "passing", "warning", "critical", "missing":
[names], "failing": [{"name", "status", "checks": [check names]}]}}, "elapsed_ms", "timed_out"}:
"nodes" counts the site's nodes the query covered (answered or missing), "critical" includes
nodes whose answer was unreadable or an error; filters apply as without it; relay_factor is
not used (answers go to the site's aggregator). A site whose aggregator died before sending
its summary shows every expected node missing (and timed_out is true).

Without it, both answer {"responses": [...], "missing": [names], "elapsed_ms", "timed_out"} as soon as
every alive node that matches has answered, or at the timeout. Each response is the node's
answer object with "name", "site" and "elapsed_ms" (when it arrived) added:

    health        {"name", "site", "status", "checks": [{"name", "kind", "status", "output",
                   "updated"}], "elapsed_ms"}                          (checks worst first)
    a handler     {"name", "site", "handler", "exit_code", "output", "truncated", "elapsed_ms"}
                   and "error" ("timeout", "failed") + "detail" when the command did not finish
    no handler    {"name", "site", "error": "no handler", "detail", "handlers": [...]}
    busy node     {"name", "site", "error": "busy", "detail"}

An answer that is not a JSON object (another implementation) comes as {"name", "site",
"payload": text}. "missing" names the alive nodes that matched and did not answer in time,
plus matching members the node already knows to be suspect or dead, plus any node named in the
filter that did not answer (a typo is reported, not silently ignored). Members that left on
purpose are not missing. Errors: 400 bad filters, timeout, relay factor or body; 429 when this
API already waits on MAX_CLIENT_QUERIES queries of this client or MAX_API_QUERIES in all; 503
when the node has too many queries in flight (both with Retry-After).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import orjson
from aiohttp import web

from meshd.api.agent import AGENT, MemberLike
from meshd.api.http import ApiError, error_response, json_response, read_json, require_token
from meshd.api.limits import API_COUNTERS, ClientSlots, client_of
from meshd.core.aggregate import AGGREGATE_SITE, SitePart
from meshd.core.counters import Counters
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.query import REGEX_PREFIX, QueryLimits, QueryResult, matches, split_meta
from meshd.errors import ConfigError, StateError
from meshd.health import HEALTH_QUERY
from meshd.health.summary import site_doc
from meshd.units import parse_duration

MAX_API_QUERIES = 32  # queries this API waits on at once
MAX_CLIENT_QUERIES = 4  # ... of them from one client address
MAX_FILTER_NODES = QueryLimits.max_filter_nodes  # the core refuses more; say so while parsing
MAX_FILTER_TAGS = QueryLimits.max_filter_tags
MAX_PAYLOAD = 64 * 1024  # the core's max_query_size (1 KiB encoded) refuses far less anyway
_UNANSWERED_STATES = (MemberState.SUSPECT, MemberState.DEAD)


@runtime_checkable
class QueryAgent(Protocol):
    """What these routes need from the daemon besides the Agent protocol."""

    async def run_query(
        self,
        name: str,
        payload: bytes,
        filters: QueryFilter,
        timeout: float | None,
        relay_factor: int,
        aggregate: str = "",
    ) -> QueryResult:
        """ConfigError for bad arguments, StateError when too many queries are in flight;
        `aggregate="site"`: the result's `sites` holds one summary per site."""
        ...

    def members(self) -> Sequence[MemberLike]: ...


IN_FLIGHT = web.AppKey("query_in_flight", ClientSlots)  # .count: queries waiting now


# --- parsing -----------------------------------------------------------------------------------


def _nodes(values: Iterable[object], where: str) -> list[str]:
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ApiError(400, "bad_filter", f"{where}: node names are strings, got {value!r}")
        for name in value.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    if len(out) > MAX_FILTER_NODES:
        raise ApiError(400, "bad_filter", f"{where}: at most {MAX_FILTER_NODES} node names")
    return out


def _tag_pairs(values: Iterable[object], where: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        if not isinstance(value, str) or "=" not in value:
            raise ApiError(400, "bad_filter", f"{where}: expected KEY=VALUE, got {value!r}")
        key, _, want = value.partition("=")
        _put_tag(tags, key.strip(), want, where)
    return tags


def _put_tag(tags: dict[str, str], key: str, want: str, where: str) -> None:
    if not key:
        raise ApiError(400, "bad_filter", f"{where}: empty tag key")
    if key in tags and tags[key] != want:
        raise ApiError(400, "bad_filter", f"{where}: tag {key!r} given twice with different values")
    tags[key] = want
    if len(tags) > MAX_FILTER_TAGS:
        raise ApiError(400, "bad_filter", f"{where}: at most {MAX_FILTER_TAGS} tags")


def _tags(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict):
        tags: dict[str, str] = {}
        for key, want in value.items():
            if not isinstance(key, str) or not isinstance(want, str):
                raise ApiError(400, "bad_filter", "tags: keys and values are strings")
            _put_tag(tags, key.strip(), want, "tags")
        return tags
    if isinstance(value, list):
        return _tag_pairs(value, "tags")
    if isinstance(value, str):
        return _tag_pairs([v for v in value.split(",") if v], "tags")
    raise ApiError(400, "bad_filter", 'tags: expected {"key": "value"} or ["key=value", ...]')


def _timeout(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = parse_duration(value, "timeout")
    except ConfigError as e:
        raise ApiError(400, "bad_timeout", str(e)) from None
    if seconds <= 0:
        raise ApiError(400, "bad_timeout", "timeout: must be more than 0")
    return seconds


def _relay_factor(value: object) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ApiError(400, "bad_request", f"relay_factor: expected a small whole number, got {value!r}")
    return value


def _site(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, "bad_filter", f"site: expected a string, got {value!r}")
    return value.strip()


# --- the answer --------------------------------------------------------------------------------


def _member_sites(members: Sequence[MemberLike]) -> dict[str, str]:
    return {m.name: m.meta.get("site", "default") for m in members}


def missing_nodes(result: QueryResult, filters: QueryFilter, members: Sequence[MemberLike]) -> list[str]:
    """The alive matches that did not answer, plus suspect/dead matches and named nodes."""
    answered = {a.name for a in result.responses}
    missing = set(result.missing)
    for m in members:
        if m.state in _UNANSWERED_STATES and m.name not in answered:
            site, tags = split_meta(m.meta)
            if matches(filters, m.name, site, tags):
                missing.add(m.name)
    left = {m.name for m in members if m.state == MemberState.LEFT}
    # A named node that never answered is reported (a typo shows), unless it left on purpose.
    missing.update(n for n in filters.nodes if n not in answered and n not in left)
    return sorted(missing)


def response_json(name: str, payload: bytes, site: str | None, elapsed_ms: float) -> dict[str, Any]:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        doc = None
    out: dict[str, Any] = {"name": name, "site": site}
    if isinstance(doc, dict):
        out.update((k, v) for k, v in doc.items() if k != "name")
        if not isinstance(out.get("site"), str):
            out["site"] = site
    else:
        out["payload"] = payload.decode("utf-8", errors="replace")
    out["elapsed_ms"] = round(elapsed_ms, 1)
    return out


def result_json(
    result: QueryResult, filters: QueryFilter, members: Sequence[MemberLike], *, health: bool
) -> dict[str, Any]:
    sites = _member_sites(members)
    responses = []
    for a in result.responses:
        doc = response_json(a.name, a.payload, sites.get(a.name), a.elapsed_ms)
        if health:
            if doc.get("status") not in ("passing", "warning", "critical"):
                doc["status"] = "unknown"
            if not isinstance(doc.get("checks"), list):
                doc["checks"] = []
        responses.append(doc)
    responses.sort(key=lambda d: (str(d.get("site") or ""), d["name"]))
    return {
        "responses": responses,
        "missing": missing_nodes(result, filters, members),
        "elapsed_ms": round(result.elapsed_ms, 1),
        "timed_out": result.timed_out,
    }


def _summary(value: object) -> str:
    if value is None or value == "":
        return ""
    if value != AGGREGATE_SITE:
        raise ApiError(400, "bad_request", f"summary: only {AGGREGATE_SITE!r} is known, got {value!r}")
    return AGGREGATE_SITE


def summary_json(result: QueryResult, filters: QueryFilter, members: Sequence[MemberLike]) -> dict[str, Any]:
    """`GET /v1/health?summary=site`: each site's counts, failing and missing nodes."""
    parts: dict[str, list[SitePart]] = {}
    missing: dict[str, set[str]] = {}
    for s in result.sites:
        site = s.site or "default"
        parts.setdefault(site, []).extend(s.parts)
        missing.setdefault(site, set()).update(s.missing)
    sites = _member_sites(members)
    # What the node knows is down, and named nodes that never answered, as without summary.
    answered = {n for s in result.sites for n in s.answered()}
    for name in missing_nodes(result, filters, members):
        if name not in answered:
            missing.setdefault(sites.get(name) or "default", set()).add(name)
    return {
        "sites": {
            site: site_doc(parts.get(site, ()), missing.get(site, ()))
            for site in sorted(parts.keys() | missing.keys())
        },
        "elapsed_ms": round(result.elapsed_ms, 1),
        "timed_out": result.timed_out,
    }


def _retry_later(status: int, error: str, detail: str) -> web.Response:
    resp = error_response(status, error, detail)
    resp.headers["Retry-After"] = "1"
    return resp


async def _run(
    request: web.Request,
    name: str,
    payload: bytes,
    filters: QueryFilter,
    timeout: float | None,
    relay_factor: int,
    aggregate: str = "",
) -> web.Response:
    agent = request.app[AGENT]
    if not isinstance(agent, QueryAgent):
        raise ApiError(501, "not_available", "this node does not run queries")
    in_flight, client = request.app[IN_FLIGHT], client_of(request)
    refused = in_flight.acquire(client)
    if refused is not None:
        # A query holds its slot up to its timeout: one client must not take them all.
        request.app[API_COUNTERS].inc(f"refused.queries_{refused}")
        detail = (
            f"{MAX_CLIENT_QUERIES} queries of this client already waiting here"
            if refused == "per_client"
            else f"{MAX_API_QUERIES} queries already waiting here"
        )
        return _retry_later(429, "too_many_queries", detail)
    try:
        result = await agent.run_query(name, payload, filters, timeout, relay_factor, aggregate)
    except ConfigError as e:
        raise ApiError(400, "bad_query", str(e)) from None
    except StateError as e:
        return _retry_later(503, "busy", str(e))
    finally:
        in_flight.release(client)
    if aggregate:
        return json_response(summary_json(result, filters, agent.members()))
    doc = result_json(result, filters, agent.members(), health=name == HEALTH_QUERY)
    return json_response(doc)


# --- handlers ----------------------------------------------------------------------------------


async def get_health(request: web.Request) -> web.Response:
    q = request.query
    filters = QueryFilter(
        nodes=_nodes(q.getall("node", []), "node"),
        site=_site(q.get("site")),
        tags=_tag_pairs(q.getall("tag", []), "tag"),
    )
    if any(v.startswith(REGEX_PREFIX) for v in (filters.site, *filters.tags.values())):
        # Every matching node runs the pattern (RE2: linear time, bounded size, but still work
        # on every node), so only an operator with the token may send one.
        require_token(request, "a regular-expression filter")
    return await _run(
        request,
        HEALTH_QUERY,
        b"",
        filters,
        _timeout(q.get("timeout")),
        _relay_factor(q.get("relay_factor")),
        _summary(q.get("summary")),
    )


async def post_query(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "bad_request", "name: the query's name, a non-empty string")
    payload = body.get("payload")
    if payload is None:
        payload = ""
    if not isinstance(payload, str):
        raise ApiError(400, "bad_request", "payload: a string (given to the handlers on stdin)")
    raw = payload.encode()
    if len(raw) > MAX_PAYLOAD:
        raise ApiError(400, "bad_request", f"payload: at most {MAX_PAYLOAD} bytes")
    nodes = body.get("nodes")
    if isinstance(nodes, str):
        nodes = [nodes]
    if nodes is not None and not isinstance(nodes, list):
        raise ApiError(400, "bad_filter", "nodes: a list of node names")
    filters = QueryFilter(
        nodes=_nodes(nodes or [], "nodes"),
        site=_site(body.get("site")),
        tags=_tags(body.get("tags")),
    )
    return await _run(
        request,
        name.strip(),
        raw,
        filters,
        _timeout(body.get("timeout")),
        _relay_factor(body.get("relay_factor")),
    )


def add_query_routes(app: web.Application) -> None:
    """Register /v1/health (open) and /v1/query (token: the app's auth middleware)."""
    app[IN_FLIGHT] = ClientSlots(MAX_CLIENT_QUERIES, MAX_API_QUERIES)
    if API_COUNTERS not in app:
        app[API_COUNTERS] = Counters()
    app.router.add_get("/v1/health", get_health)
    app.router.add_post("/v1/query", post_query)
