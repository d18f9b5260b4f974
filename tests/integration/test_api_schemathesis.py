"""schemathesis against a live `meshd run` on loopback, with the document it serves itself
(GET /v1/openapi.json): every operation, bounded and derandomized examples, and the checks that
the API gives no 5xx and no answer (status, content type, headers, body) the document does not
describe.

What a generated request may do is kept on this machine: seeds to join become a closed loopback
port, releases publish a small directory of this test with a key of this test, and queries wait
at most a moment (a named node that does not exist is waited for until the timeout).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err, Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.processes import Mesh

pytestmark = pytest.mark.timeout(180)  # it takes about 20 s

# 5xx answers the document names on purpose: the seeds of a join did not answer (the confined
# join always asks a closed port), the node has too many queries in flight (with Retry-After),
# the node is not ready (yet).
MEANT_5XX = {
    ("POST", "/v1/join", 502),
    ("GET", "/v1/health", 503),
    ("POST", "/v1/query", 503),
    ("GET", "/readyz", 503),
}


def no_unmeant_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    if (case.operation.method.upper(), case.operation.path, response.status_code) in MEANT_5XX:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    no_unmeant_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]
# POST /v1/leave stops the node (tests/integration/test_api_http.py covers it); GET /v1/events
# is a stream that never ends (tests/integration/test_api_events_resume.py reads it).
SKIPPED = {("POST", "/v1/leave"), ("GET", "/v1/events")}
EXAMPLES = 50
QUICK = "300ms"


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


class Confine:
    """Rewrites a generated case so it stays on this machine and returns quickly."""

    def __init__(self, root: Path, key: Path) -> None:
        self.seed = f"127.0.0.1:{closed_port()}"
        self.payload = root / "payload"
        self.payload.mkdir()
        (self.payload / "app.txt").write_text("hello\n")
        self.key = key
        self.origin = root / "origin"

    def __call__(self, case: Any) -> None:
        method, path = case.operation.method.upper(), case.operation.path
        if (method, path) == ("GET", "/v1/health"):
            case.query = {**(case.query or {}), "timeout": QUICK}
        body = case.body if isinstance(case.body, dict) else None
        if body is None:
            return
        if path == "/v1/query":
            body["timeout"] = QUICK
        elif path == "/v1/join":
            addrs = body.get("addrs")
            if isinstance(addrs, list) and all(isinstance(a, str) for a in addrs):
                body["addrs"] = [self.seed for _ in addrs]
        elif path == "/v1/releases":
            body["path"], body["key_file"] = str(self.payload), str(self.key)
            body["origins"] = []
            if body.get("origin_dir") is not None:
                body["origin_dir"] = str(self.origin)


def test_the_live_api_keeps_to_its_document(mesh: Mesh, tmp_path: Path) -> None:
    node = mesh.node("api1").start()
    key = tmp_path / "publisher.key"
    mesh.run_meshd("keygen", "publisher", "--out", str(key), check=True)
    confine = Confine(tmp_path, key)
    schema = schemathesis.openapi.from_url(node.api_url + "/v1/openapi.json", timeout=10)
    auth = {"Authorization": f"Bearer {node.token}"}

    results = list(schema.get_all_operations())
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) == len(results), [r.err() for r in results if isinstance(r, Err)]
    ran = {(op.method.upper(), op.path) for op in operations if (op.method.upper(), op.path) not in SKIPPED}
    assert len(ran) >= 13, ran  # the document came whole

    failures, seen = [], dict[str, set[int]]()
    for op in operations:
        if (op.method.upper(), op.path) not in SKIPPED:
            statuses = seen[f"{op.method.upper()} {op.path}"] = set()
            try:
                fuzz(op, GenerationMode.POSITIVE, node.api_url, auth, confine, statuses)
                with contextlib.suppress(Unsatisfiable):  # nothing to get wrong: no parameters, no body
                    fuzz(op, GenerationMode.NEGATIVE, node.api_url, auth, confine, set())
            except Exception as e:  # schemathesis' failure groups: collect every operation's
                failures.append(f"{op.method.upper()} {op.path}: {e}")
    assert not failures, "\n\n".join(failures)
    # Not only refusals: every operation got through to its handler's success at least once.
    assert [
        k for k, v in seen.items() if not any(200 <= c < 300 for c in v) and k != "POST /v1/join"
    ] == [], seen
    assert node.running, node.log_tail()


def fuzz(
    op: Any, mode: GenerationMode, base_url: str, auth: dict[str, str], confine: Confine, statuses: set[int]
) -> None:
    """EXAMPLES requests of `op`: valid ones (positive), or ones the document rules out (negative)."""

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the same examples on every run
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(op.as_strategy(generation_mode=mode))
        confine(case)
        response = case.call_and_validate(base_url=base_url, headers=auth, checks=CHECKS, timeout=20)
        statuses.add(response.status_code)

    run()
