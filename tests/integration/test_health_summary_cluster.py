"""`GET /v1/health?summary=site` and `meshctl health --summary` across real `meshd run`
processes on loopback: one summary per site with counts, the failing node and its checks, a
killed node named missing in its own site, filters still applied, exit 2 when something is
critical or missing."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.integration.test_health_cluster import NO_BUILTINS, health_of, write_config
from tests.processes import Mesh, NodeProc

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_site_summary_across_real_nodes(mesh: Mesh, tmp_path: Path) -> None:
    configs = {
        "a1": NO_BUILTINS,
        "a2": NO_BUILTINS + '[[check]]\nname = "broken"\ncommand = "echo on fire; exit 2"\n',
        "b1": NO_BUILTINS,
        "b2": NO_BUILTINS,
        "b3": NO_BUILTINS,
    }
    sites = {"a1": "plant-a", "a2": "plant-a", "b1": "plant-b", "b2": "plant-b", "b3": "plant-b"}
    nodes: dict[str, NodeProc] = {}
    for name, body in configs.items():
        extra = ["--config", str(write_config(tmp_path, name, body)), "--site", sites[name]]
        join = [] if name == "a1" else [nodes["a1"].addr]
        nodes[name] = mesh.node(name).start(join=join, extra=extra)
    everyone = set(nodes)
    mesh.wait_until(
        "every node knows every summary",
        lambda: all((h := health_of(n)).keys() == everyone and h["a2"] == "critical" for n in nodes.values()),
        30,
    )
    a1 = nodes["a1"]

    doc = a1.get("/v1/health?summary=site&timeout=5s")
    assert doc["timed_out"] is False
    assert set(doc["sites"]) == {"plant-a", "plant-b"}
    plant_a = doc["sites"]["plant-a"]
    assert plant_a == {
        "nodes": 2,
        "passing": 1,
        "warning": 0,
        "critical": 1,
        "missing": [],
        "failing": [{"name": "a2", "status": "critical", "checks": ["broken"]}],
    }
    assert doc["sites"]["plant-b"]["passing"] == 3
    # filters still apply
    assert set(a1.get("/v1/health?summary=site&site=plant-b")["sites"]) == {"plant-b"}
    assert a1.status_code("/v1/health?summary=node") == 400

    res = a1.meshctl("health", "--summary")
    assert res.returncode == 2, res.stdout + res.stderr  # a2 is critical
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["SITE", "NODES", "PASSING", "WARNING", "CRITICAL", "MISSING"]
    assert lines[1].split() == ["plant-a", "2", "1", "0", "1", "0"]
    assert any(ln.split()[:4] == ["plant-a", "a2", "critical", "broken"] for ln in lines)
    res = a1.meshctl("health", "--summary", "--site", "plant-b", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["sites"]["plant-b"]["nodes"] == 3

    # A killed node is missing in its own site's summary, not counted as passing.
    nodes["b2"].signal(signal.SIGKILL)
    nodes["b2"].wait_exit()
    doc = nodes["b1"].get("/v1/health?summary=site&timeout=3s")
    plant_b = doc["sites"]["plant-b"]
    assert plant_b["missing"] == ["b2"]
    assert plant_b["passing"] == 2
    assert plant_b["nodes"] == 3
    res = nodes["b1"].meshctl("health", "--summary", "--site", "plant-b", "--timeout", "3s")
    assert res.returncode == 2, res.stdout + res.stderr
    assert any(ln.split()[:3] == ["plant-b", "b2", "missing"] for ln in res.stdout.splitlines())
