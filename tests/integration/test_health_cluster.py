"""Health and queries across real `meshd run` processes on loopback: a failing command check
shows up as critical in /v1/members, in the health query and in meshctl's exit code; a status
change spreads and raises a health event; custom handlers answer (big answers whole), a query
nobody handles gets "no handler" answers, and a killed node is named missing at the timeout."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Mesh, NodeProc

pytestmark = pytest.mark.integration

NO_BUILTINS = "".join(
    f'[[check]]\nname = "{n}"\nkind = "{k}"\nenabled = false\n'
    for n, k in (
        ("load", "load"),
        ("memory", "memory"),
        ("disk-data", "disk"),
        ("disk-root", "disk"),
        ("loop-lag", "loop_lag"),
    )
)


def write_config(root: Path, name: str, body: str) -> Path:
    path = root / f"{name}.toml"
    path.write_text(body)
    return path


def health_of(n: NodeProc) -> dict[str, str]:
    try:
        return {m["name"]: m["health"] for m in n.get("/v1/members")["members"]}
    except (OSError, ValueError):
        return {}


def post(n: NodeProc, path: str, body: dict[str, Any], token: bool = True) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {n.token}"
    req = urllib.request.Request(n.api_url + path, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read() or b"{}")


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in doc["responses"]}


def read_health_event(stream: Any, node: str, deadline: float) -> dict[str, Any]:
    event = ""
    while time.monotonic() < deadline:
        line = stream.readline().decode().rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "health":
            doc: dict[str, Any] = json.loads(line[5:])
            if doc["name"] == node and doc["health"] == "critical":
                return doc
    raise AssertionError(f"no critical health event for {node}")


@pytest.mark.timeout(120)
def test_health_and_queries_across_the_mesh(mesh: Mesh, tmp_path: Path) -> None:
    flag = tmp_path / "n2-exit-code"
    flag.write_text("0")
    configs = {
        # built-in checks stay on here (the machine's load may make them warn: fine)
        "n1": '[[query_handler]]\nname = "echo"\ncommand = "cat"\n'
        '[[query_handler]]\nname = "big"\ncommand = "head -c 5000 /dev/zero | tr \'\\\\0\' x"\n',
        "n2": NO_BUILTINS + '[[check]]\nname = "flag"\ninterval = "300ms"\n'
        f'command = ["sh", "-c", "exit $(cat {flag})"]\n',
        "n3": NO_BUILTINS + '[[check]]\nname = "broken"\ncommand = "echo disk on fire; exit 2"\n'
        '[[check]]\nname = "meh"\ncommand = "false"\n'
        '[[query_handler]]\nname = "echo"\ncommand = ["cat"]\n',
        "n4": NO_BUILTINS,
    }
    sites = {"n1": "factory", "n2": "factory", "n3": "shop", "n4": "shop"}
    nodes: dict[str, NodeProc] = {}
    for name, body in configs.items():
        extra = [
            "--config",
            str(write_config(tmp_path, name, body)),
            "--site",
            sites[name],
            "--tag",
            f"role={'edge' if name in ('n1', 'n3') else 'core'}",
        ]
        join = [] if name == "n1" else [nodes["n1"].addr]
        nodes[name] = mesh.node(name).start(join=join, extra=extra)
    n1, n2, n3, n4 = nodes.values()
    everyone = set(nodes)

    # The summary travels with membership: every node lists n3 critical without a query.
    def summaries_known() -> bool:
        return all(
            (h := health_of(n)).keys() == everyone
            and h["n3"] == "critical"
            and h["n2"] == "passing"
            and h["n4"] == "passing"
            and h["n1"] != "unknown"
            for n in nodes.values()
        )

    mesh.wait_until("every node knows every summary", summaries_known, 30)

    # The health query, asked at any node, completes with every answer (not at the timeout).
    doc = n2.get("/v1/health?timeout=10s")
    assert doc["missing"] == []
    assert doc["timed_out"] is False
    assert doc["elapsed_ms"] < 10_000
    answers = by_name(doc)
    assert answers.keys() == everyone
    assert answers["n3"]["status"] == "critical"
    assert answers["n3"]["site"] == "shop"
    broken = answers["n3"]["checks"][0]  # worst first
    assert broken["name"] == "broken"
    assert broken["status"] == "critical"
    assert "disk on fire" in broken["output"]
    assert {c["name"]: c["status"] for c in answers["n3"]["checks"]}["meh"] == "warning"
    assert {c["name"] for c in answers["n1"]["checks"]} >= {
        "load",
        "memory",
        "disk-data",
        "disk-root",
        "loop-lag",
    }
    assert answers["n4"] == {**answers["n4"], "status": "passing", "checks": []}

    # Filters: site, tags, node names (an unknown name is reported missing).
    assert set(by_name(n1.get("/v1/health?site=factory"))) == {"n1", "n2"}
    assert set(by_name(n1.get("/v1/health?tag=role=edge"))) == {"n1", "n3"}
    doc = n1.get("/v1/health?node=n2,n4&node=ghost&timeout=2s")
    assert set(by_name(doc)) == {"n2", "n4"}
    assert doc["missing"] == ["ghost"]
    assert n1.status_code("/v1/health?timeout=soon") == 400
    assert n1.status_code("/v1/health?tag=role") == 400

    # meshctl: 2 when a node is critical, 0 for a site that is fine.
    res = n1.meshctl("health")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "broken (critical)" in res.stdout
    assert "disk on fire" in res.stdout
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["SITE", "NODE", "STATUS"]
    assert [ln.split()[0] for ln in lines[1:] if ln and not ln.startswith(" ")][:2] == ["factory"] * 2
    res = n1.meshctl("health", "--site", "factory", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert {r["name"] for r in json.loads(res.stdout)["responses"]} == {"n1", "n2"}

    # A status change spreads by gossip and raises a health event on the event stream.
    with urllib.request.urlopen(n4.api_url + "/v1/events", timeout=20) as stream:
        flag.write_text("2")
        event = read_health_event(stream, "n2", time.monotonic() + 20)
    assert event["previous"] == "passing"
    assert event["site"] == "factory"
    mesh.wait_until(
        "n2 critical everywhere",
        lambda: all(health_of(n).get("n2") == "critical" for n in nodes.values()),
        15,
    )
    flag.write_text("0")

    # Custom queries: handlers answer with their output, the others say they have none.
    status, doc = post(n2, "/v1/query", {"name": "echo", "payload": "ping 42", "timeout": "10s"})
    assert status == 200
    assert doc["missing"] == []
    assert doc["timed_out"] is False
    answers = by_name(doc)
    assert answers.keys() == everyone
    for name in ("n1", "n3"):
        assert answers[name]["output"] == "ping 42"
        assert answers[name]["exit_code"] == 0
    for name in ("n2", "n4"):
        assert answers[name]["error"] == "no handler"
        assert "no handler for query 'echo'" in answers[name]["detail"]
    status, doc = post(n2, "/v1/query", {"name": "echo"}, token=False)
    assert status == 401
    status, doc = post(n2, "/v1/query", {"name": "echo", "relay_factor": 99})
    assert status == 400
    assert "relay_factor" in doc["detail"]

    # An answer bigger than a packet arrives whole (over TCP), with a relay copy on the way.
    status, doc = post(n4, "/v1/query", {"name": "big", "nodes": ["n1"], "relay_factor": 1, "timeout": "10s"})
    assert status == 200
    assert doc["missing"] == []
    assert by_name(doc)["n1"]["output"] == "x" * 5000

    res = n3.meshctl("query", "echo", "hello", "--tag", "role=edge", token=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "n1 (factory): exit 0" in res.stdout
    assert "  hello" in res.stdout

    # kill -9: asked at once, the dead node is named missing when the timeout ends.
    n4.signal(signal.SIGKILL)
    n4.wait_exit()
    started = time.monotonic()
    res = n1.meshctl("health", "--timeout", "2s", "--json")
    took = time.monotonic() - started
    assert res.returncode == 2, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["missing"] == ["n4"]
    assert set(by_name(doc)) == {"n1", "n2", "n3"}
    assert took < 15
    res = n1.meshctl("health", "--site", "shop", "--timeout", "1s")
    assert res.returncode == 2
    assert "missing" in res.stdout
