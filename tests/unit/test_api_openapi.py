"""GET /v1/openapi.json: a valid OpenAPI 3.1 document that names every route the operator app
registers, and whose schemas the handlers' real answers (over the fake agent) satisfy.

Requests go through the app's own router and middleware (Application._handle on a mocked
request): no socket, so this stays a unit test.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import jsonschema_rs
import orjson
import pytest
from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request
from schemathesis.specs.openapi.definitions import OPENAPI_31

from meshd import __version__
from meshd.api.app import create_api_app
from meshd.api.openapi import OPENAPI_PATH, add_openapi_route, openapi_document
from meshd.core.aggregate import SitePart, SiteResult
from meshd.core.messages import MemberState
from meshd.core.query import QueryAnswer
from meshd.errors import StateError
from meshd.health.summary import summarize
from meshd.registry.api import add_image_routes
from meshd.release.api import add_release_routes
from tests.fakes import AUTH, FakeAgent, member

DOC = openapi_document()
HOST = {"Host": "localhost"}  # no port: the mocked transport names its own


def full_app(agent: FakeAgent) -> web.Application:
    """The operator app as the daemon composes it (daemon.py: create_api_app, the release
    routes, the document)."""
    app = create_api_app(agent)
    add_release_routes(app, object())  # type: ignore[arg-type]  # the routes only, not called
    add_image_routes(app, object())  # type: ignore[arg-type]
    add_openapi_route(app)
    app.freeze()  # what the server does: the middleware chain (errors, Host guard, token) is on
    return app


def test_the_document_is_valid_openapi_3_1_with_meshds_version() -> None:
    errors = [str(e) for e in jsonschema_rs.validator_for(OPENAPI_31).iter_errors(DOC)]
    assert errors == []
    assert DOC["openapi"].startswith("3.1")
    assert DOC["info"]["version"] == __version__
    # Every schema is itself a valid JSON Schema (2020-12, OpenAPI 3.1's dialect).
    for name, schema in DOC["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_every_registered_route_is_documented_and_nothing_else() -> None:
    routes = {
        (r.method, r.resource.canonical)
        for r in full_app(FakeAgent()).router.routes()
        if r.method != "HEAD" and r.resource is not None  # aiohttp adds HEAD to every GET
    }
    documented = {(m.upper(), path) for path, item in DOC["paths"].items() for m in item}
    assert documented == routes


def test_changes_are_secured_by_the_bearer_token_and_every_answer_has_a_schema() -> None:
    assert DOC["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            assert (op.get("security") == [{"bearer": []}]) == (method == "post"), (method, path)
            if method == "post":
                assert {"401", "403", "413"} <= op["responses"].keys(), path
            assert "421" in op["responses"], path  # the Host guard answers on every route
            for status, answer in op["responses"].items():
                assert answer["content"], (path, status)


def _schema_of(path: str, method: str, status: int, content_type: str) -> dict[str, Any]:
    answers = DOC["paths"][path][method.lower()]["responses"]
    assert str(status) in answers, f"{method} {path} answered {status}, not documented"
    content = answers[str(status)]["content"]
    assert content_type in content, f"{method} {path} {status}: {content_type} not documented"
    # Refs (#/components/...) resolve against the root: give the schema the document's components.
    return {**content[content_type]["schema"], "components": DOC["components"]}


async def call(
    app: web.Application, method: str, url: str, body: Any = None, auth: bool = False
) -> web.Response:
    headers = {**HOST, **(AUTH if auth else {})}
    payload = None
    if body is not None:
        raw = orjson.dumps(body)
        protocol = mock.Mock(_reading_paused=False)
        payload = streams.StreamReader(protocol, 2**16, loop=mock.Mock())
        payload.feed_data(raw)
        payload.feed_eof()
        headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(raw))
    req = make_mocked_request(method, url, headers=headers, app=app, payload=payload)  # type: ignore[arg-type]
    resp = await app._handle(req)
    assert isinstance(resp, web.Response)
    return resp


def assert_conforms(method: str, url: str, resp: web.Response) -> Any:
    path = url.split("?")[0]
    if path.startswith("/static/"):
        path = "/static/{name}"  # the one templated path
    content_type = resp.content_type
    schema = _schema_of(path, method, resp.status, content_type)
    assert isinstance(resp.body, bytes)
    doc = orjson.loads(resp.body) if content_type == "application/json" else resp.body.decode()
    errors = [str(e) for e in jsonschema_rs.validator_for(schema).iter_errors(doc)]
    assert errors == [], f"{method} {url} {resp.status}: {errors}"
    return doc


def health(status: str, *checks: str) -> bytes:
    return orjson.dumps(
        {
            "status": status,
            "checks": [
                {"name": c, "kind": "builtin", "status": status, "output": "", "updated": 1.0} for c in checks
            ],
        }
    )


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent(
        people=[
            member(
                "n1",
                site="factory",
                meta={"health": "passing", "rel:app": "2 0123456789abcdef 3/4 #7"},
                role="gw",
            ),
            member("n2", MemberState.SUSPECT, site="factory"),
            member(
                "n3", MemberState.DEAD, site="shop", meta={"rel:app": "2 0123456789abcdef 4/4 #7 current"}
            ),
        ],
        ring=[bytes(range(32))],
        answers=[
            QueryAnswer("n1", health("passing"), 1.5),
            QueryAnswer("n2", b"not json", 2.0),
            QueryAnswer("n3", orjson.dumps({"error": "no handler", "detail": "x", "handlers": []}), 3.0),
        ],
        missing=("n4",),
        sites=(
            SiteResult(
                "factory",
                (SitePart("n1", summarize("health", [("n1", health("warning", "load"))]), ("n1",)),),
                ("n2",),
            ),
        ),
    )


READS = [
    ("/v1/status", 200),
    ("/v1/members", 200),
    ("/v1/members?state=alive,dead&site=factory&tag=role=gw", 200),
    ("/v1/members?state=sleepy", 400),
    ("/v1/keys", 200),
    ("/healthz", 200),
    ("/readyz", 200),
    ("/metrics", 200),
    ("/", 200),
    ("/v1/health", 200),
    ("/v1/health?summary=site", 200),
    ("/v1/health?timeout=soon", 400),
    ("/v1/health?site=re:fac.*", 401),  # a pattern needs the token
    (OPENAPI_PATH, 200),
    ("/v1/rollout", 200),
    ("/static/dashboard.js", 200),
    ("/static/dashboard.css", 200),
    ("/static/index.html", 404),  # only the fixed list
]


@pytest.mark.parametrize(("url", "status"), READS)
async def test_real_answers_of_reads_conform_to_the_document(agent: FakeAgent, url: str, status: int) -> None:
    resp = await call(full_app(agent), "GET", url)
    assert resp.status == status
    assert_conforms("GET", url, resp)


async def test_the_host_guard_answer_is_documented(agent: FakeAgent) -> None:
    req = make_mocked_request("GET", "/v1/status", headers={"Host": "evil.example"}, app=full_app(agent))
    resp = await req.app._handle(req)
    assert isinstance(resp, web.Response)
    assert resp.status == 421
    assert_conforms("GET", "/v1/status", resp)


async def test_rollout_and_a_refused_reload_conform(agent: FakeAgent) -> None:
    app = full_app(agent)
    rollout = assert_conforms("GET", "/v1/rollout", await call(app, "GET", "/v1/rollout"))
    assert [r["id"] for r in rollout["releases"]] == ["0123456789abcdef"]
    assert rollout["releases"][0]["sites"]["shop"]["down"] == ["n3"]
    agent.reload_outcome = {"ok": False, "applied": [], "restart_needed": [], "error": "bad toml"}
    resp = await call(app, "POST", "/v1/reload", None, True)
    assert resp.status == 409
    assert assert_conforms("POST", "/v1/reload", resp)["detail"] == "bad toml"


async def test_readyz_not_ready_and_an_insecure_keyring_conform(agent: FakeAgent) -> None:
    agent.ready, agent.ring = False, None
    app = full_app(agent)
    assert assert_conforms("GET", "/readyz", await call(app, "GET", "/readyz"))["ready"] is False
    assert assert_conforms("GET", "/v1/keys", await call(app, "GET", "/v1/keys"))["insecure"] is True


CHANGES: list[tuple[str, Any, bool, int]] = [
    ("/v1/join", {"addrs": ["127.0.0.1:7946"]}, True, 200),
    ("/v1/join", {"addrs": []}, True, 400),
    ("/v1/join", {"addrs": ["127.0.0.1:7946"]}, False, 401),
    ("/v1/keys", {"op": "install", "key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}, True, 200),
    ("/v1/keys", {"op": "remove", "key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}, True, 409),
    ("/v1/keys", {"op": "install", "key": "short"}, True, 400),
    ("/v1/query", {"name": "uptime", "payload": "x", "nodes": ["n1"], "tags": {"role": "gw"}}, True, 200),
    ("/v1/query", {"name": ""}, True, 400),
    ("/v1/leave", {}, True, 200),
    ("/v1/reload", None, True, 200),
    ("/v1/reload", None, False, 401),
]


@pytest.mark.parametrize(("path", "body", "auth", "status"), CHANGES)
async def test_real_answers_of_changes_conform_to_the_document(
    agent: FakeAgent, path: str, body: Any, auth: bool, status: int
) -> None:
    resp = await call(full_app(agent), "POST", path, body, auth)
    assert resp.status == status
    assert_conforms("POST", path, resp)


async def test_a_busy_node_answers_503_with_retry_after_as_documented(agent: FakeAgent) -> None:
    agent.raises = StateError("too many queries")
    resp = await call(full_app(agent), "GET", "/v1/health")
    assert resp.status == 503
    assert_conforms("GET", "/v1/health", resp)
    assert "Retry-After" in DOC["paths"]["/v1/health"]["get"]["responses"]["503"]["headers"]
    assert resp.headers["Retry-After"].isdigit()
