"""A real Prometheus (Debian's `prometheus`) scrapes a mesh of real meshd daemons on loopback
and answers queries about it; `promtool check metrics` accepts what /metrics writes; the
event stream carries the dashboard's `stats` events."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.cli.meshctl import Client
from tests.processes import Mesh, NodeProc, free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
STATS_KEYS = {
    "t",
    "gossip_in_bytes",
    "gossip_out_bytes",
    "transfer_sent_bytes",
    "transfer_received_bytes",
    "transfer_origin_bytes",
    "probe_rtt_ms",
    "members",
}


def _need(binary: str) -> None:
    if not Path(binary).is_file():
        pytest.skip(f"{binary} is not installed (Debian package prometheus; .ci/run installs it)")


@pytest.fixture
def three(mesh: Mesh) -> list[NodeProc]:
    a = mesh.node("a").start()
    b = mesh.node("b").start(join=[a.addr])
    c = mesh.node("c").start(join=[a.addr])
    nodes = [a, b, c]
    mesh.wait_until(
        "all three alive everywhere",
        lambda: all(set(n.states().values()) == {"alive"} and len(n.states()) == 3 for n in nodes),
    )
    return nodes


@contextlib.contextmanager
def prometheus(tmp: Path, targets: list[str]) -> Iterator[str]:
    """Prometheus on loopback scraping `targets` (host:port of the operator APIs) every second."""
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: meshd\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])


def wait_for(what: str, pred: Any, timeout: float = 60.0, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            last = pred()
            if last:
                return last
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{tail}")


def test_prometheus_scrapes_the_mesh_and_answers_queries(three: list[NodeProc], tmp_path: Path) -> None:
    _need(PROMETHEUS)
    targets = [n.api_url.removeprefix("http://") for n in three]
    with prometheus(tmp_path, targets) as base:
        log = tmp_path / "prometheus.log"

        def all_up() -> list[dict[str, Any]] | None:
            up = [r for r in query(base, "up") if r["value"][1] == "1"]
            return up if len(up) == 3 else None

        up = wait_for("every target up", all_up, log=log)
        assert {r["metric"]["instance"] for r in up} == set(targets)
        alive = wait_for("members alive", lambda: query(base, 'meshd_members{state="alive"}'), log=log)
        assert {r["metric"]["instance"] for r in alive} == set(targets)
        assert all(float(r["value"][1]) == 3 for r in alive)
        # Probes run every 200 ms at the local profile: the histogram counts them.
        probes = wait_for(
            "probe round trips counted",
            lambda: [
                r
                for r in query(base, 'meshd_probe_rtt_seconds_count{path="direct"}')
                if float(r["value"][1]) > 0
            ],
            log=log,
        )
        assert len(probes) == 3
        expr = "histogram_quantile(0.99, sum by (le) (rate(meshd_probe_rtt_seconds_bucket[10s])))"
        p99 = wait_for("a probe p99 (two scrapes for a rate)", lambda: query(base, expr), log=log)
        assert 0 < float(p99[0]["value"][1]) < 5  # seconds; generous
        assert query(base, "process_resident_memory_bytes > 0")


def test_promtool_accepts_the_metrics(three: list[NodeProc]) -> None:
    _need(PROMTOOL)
    body = three[0].text("/metrics")
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "", res.stdout  # no lint warnings either
    assert res.stderr.strip() == "", res.stderr


def test_the_event_stream_carries_stats_for_the_dashboard(three: list[NodeProc]) -> None:
    client = Client(three[0].api_url, None)
    seen: list[dict[str, Any]] = []
    for event, data in client.stream_events():
        if event == "stats":
            seen.append(json.loads(data))
            if len(seen) == 2:
                break
    first, second = seen
    assert set(first) == STATS_KEYS
    assert first["members"] == {"alive": 3, "suspect": 0, "dead": 0, "left": 0}
    assert second["t"] > first["t"]
    assert second["gossip_out_bytes"] >= first["gossip_out_bytes"] > 0
    assert second["probe_rtt_ms"] is None or second["probe_rtt_ms"] > 0
