"""The shipped Grafana dashboard names only metrics meshd exports: it cannot drift from them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from meshd.config import NodeConfig
from meshd.crypto import PublisherKey
from meshd.daemon import Daemon
from meshd.metrics import Exposition
from meshd.net.udp import UDPEndpoint
from meshd.release.publish import publish_tree
from meshd.release.service import ReleaseService
from meshd.runtime import NodeRuntime
from meshd.wire import Codec
from tests.cluster import make_cluster
from tests.metrics_text import samples

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "meshd-fleet.json"
# PromQL words that look like names: functions are followed by "(", these are not always.
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
_LABELS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (labels, ranges, groupings, functions off)."""
    bare = _GROUPING.sub(" ", _RANGE.sub(" ", _LABELS.sub(" ", expr)))
    return {name for name in _IDENT.findall(bare) if name not in KEYWORDS}


def exprs(doc: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert inner is not None, var["definition"]
            found.append(inner.group(1))
    return found


def exported_names(tmp_path: Path) -> set[str]:
    """Sample names of a daemon's registry with the components that report into it."""
    _net, nodes = make_cluster(2)
    daemon = Daemon(NodeConfig(name="me", data_dir=str(tmp_path / "d")))
    release = ReleaseService(tmp_path / "r", name="me", site="s", tags={}, codec=Codec("c", None))
    src = tmp_path / "app.bin"
    src.write_bytes(b"x" * 1000)
    manifest = publish_tree(release.store, src, "app", "1.0", PublisherKey(bytes(32))).manifest
    release._manifests[manifest.release_id] = manifest  # a release held: its series exist
    daemon._metrics += [NodeRuntime(nodes[0]), UDPEndpoint(lambda data, addr: None), release]
    out = Exposition()
    daemon.collect_metrics(out)
    return {name for name, _ in samples(out.render())}


def test_metric_names_are_found_in_promql() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(meshd_probe_rtt_seconds_bucket{path="x"}[5m])))'
    assert metric_names(expr) == {"meshd_probe_rtt_seconds_bucket"}
    assert metric_names("a_total / on (instance) b > 0") == {"a_total", "b"}


def test_every_dashboard_expression_names_exported_metrics(tmp_path: Path) -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 39
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in doc["templating"]["list"])
    exported = exported_names(tmp_path)
    used: set[str] = set()
    for expr in exprs(doc):
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
        used |= names
    for wanted in ("meshd_members", "meshd_probe_rtt_seconds_bucket", "meshd_release_received_bytes_total"):
        assert wanted in used
