"""meshd.reload: which changed settings a reload applies and which need a restart, field by field.

The classification tests fail when a field is added to NodeConfig (or a key to [dist] or
[discovery]) without saying here what a reload does with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meshd.config import DiscoveryConfig, NodeConfig, load_config
from meshd.metrics import Exposition
from meshd.release.config import DistConfig
from meshd.reload import (
    APPLIED_FIELDS,
    BOOKKEEPING_FIELDS,
    DIST_APPLIED,
    RESTART_FIELDS,
    ReloadCounts,
    ReloadPlan,
    effective_config,
    plan_reload,
)

# A value different from the default for every NodeConfig field, and where a reload puts it.
CHANGED: dict[str, tuple[Any, str]] = {
    "name": ("other", "restart"),
    "cluster": ("other", "restart"),
    "bind": ("127.0.0.1:9000", "restart"),
    "advertise": ("127.0.0.1:9001", "restart"),
    "api": ("127.0.0.1:9002", "restart"),
    "registry": ("127.0.0.1:5000", "restart"),
    "registry_upstream": (["http://127.0.0.1:5001"], "restart"),
    "registry_cache_max": (2 * 1024**3, "restart"),
    "registry_pass_tags": (True, "restart"),
    "data_dir": ("/tmp/elsewhere", "restart"),
    "join": (["127.0.0.1:7788"], "restart"),
    "site": ("other-site", "restart"),
    "tags": ({"role": "edge"}, "applied"),
    "mdns": (False, "restart"),
    "mdns_interfaces": (["127.0.0.1"], "restart"),
    "cluster_key_file": ("/tmp/cluster.key", "restart"),
    "insecure": (True, "restart"),
    "profile": ("wan", "restart"),
    "trust_publisher": (["/tmp/pub.pub"], "applied"),
    "log_level": ("debug", "applied"),
    "log_format": ("json", "applied"),
    "api_allow_hosts": (["gw.example"], "restart"),
    "protocol_overrides": ({"probe_interval": 0.5}, "restart"),
    "checks": ([{"name": "web", "url": "http://127.0.0.1:1/"}], "applied"),
    "query_handlers": ([{"name": "uptime", "command": "uptime"}], "applied"),
    "extra": (None, "tables"),  # compared table by table, below
    "source": ("/etc/meshd/other.toml", "none"),
    "sources": (["/etc/meshd/other.toml"], "none"),
}


def base() -> NodeConfig:
    return NodeConfig(name="n1", data_dir="/tmp/n1")


def test_every_config_field_is_classified_once() -> None:
    fields = {f.name for f in dataclasses.fields(NodeConfig)}
    assert set(CHANGED) == fields, "a NodeConfig field without a reload rule: add it to meshd.reload"
    groups = [APPLIED_FIELDS, RESTART_FIELDS, BOOKKEEPING_FIELDS, frozenset({"extra"})]
    assert sum(len(g) for g in groups) == len(fields)
    assert frozenset().union(*groups) == fields


@pytest.mark.parametrize("name", [n for n, (_, where) in CHANGED.items() if where != "tables"])
def test_one_changed_field_lands_where_it_belongs(name: str) -> None:
    value, where = CHANGED[name]
    old = base()
    new = dataclasses.replace(old, **{name: value})
    plan = plan_reload(old, new)
    if where == "applied":
        assert plan == ReloadPlan(applied=(name,))
    elif where == "restart":
        assert plan == ReloadPlan(restart_needed=(name,))
    else:
        assert plan == ReloadPlan()


def test_nothing_changed_is_an_empty_plan() -> None:
    assert plan_reload(base(), base()) == ReloadPlan()


def test_dist_rate_caps_apply_and_its_other_keys_need_a_restart() -> None:
    assert set(DIST_APPLIED) <= set(DistConfig.__struct_fields__)
    samples = {
        "keep": 5,
        "hook": "/bin/true",
        "hook_timeout": "5s",
        "upload_rate": "1MB/s",
        "download_rate": "2MB/s",
        "origin_delay": "1s",
        "fsync": False,
        "announce_interval": "2s",
        "min_free": "1GB",
    }
    assert set(samples) == set(DistConfig.__struct_fields__), "a [dist] key without a sample here"
    for key, value in samples.items():
        new = dataclasses.replace(base(), extra={"dist": {key.replace("_", "-"): value}})
        plan = plan_reload(base(), new)
        if key in DIST_APPLIED:
            assert plan == ReloadPlan(applied=(f"dist.{key}",)), key
        else:
            assert plan == ReloadPlan(restart_needed=(f"dist.{key}",)), key


def test_a_dist_key_spelled_otherwise_with_the_same_value_is_no_change() -> None:
    old = dataclasses.replace(base(), extra={"dist": {"upload-rate": "1MB/s"}})
    new = dataclasses.replace(base(), extra={"dist": {"upload_rate": "1MB"}})
    assert plan_reload(old, new) == ReloadPlan()


def test_discovery_and_other_tables_need_a_restart() -> None:
    for key in DiscoveryConfig.__struct_fields__:
        default = getattr(DiscoveryConfig(), key)
        new = dataclasses.replace(base(), extra={"discovery": {key: default * 2}})
        assert plan_reload(base(), new) == ReloadPlan(restart_needed=(f"discovery.{key}",)), key
    new = dataclasses.replace(base(), extra={"health": {"anything": 1}})
    assert plan_reload(base(), new) == ReloadPlan(restart_needed=("health",))


def test_many_changes_are_sorted_into_both_lists() -> None:
    old = base()
    new = dataclasses.replace(
        old, bind="127.0.0.1:9000", site="s2", tags={"a": "b"}, log_level="debug", extra={"dist": {"keep": 9}}
    )
    assert plan_reload(old, new) == ReloadPlan(
        applied=("log_level", "tags"), restart_needed=("bind", "dist.keep", "site")
    )


def test_effective_config_takes_what_was_applied_and_keeps_the_rest() -> None:
    old = dataclasses.replace(
        base(),
        tags={"a": "1"},
        extra={"dist": {"keep": 2, "upload-rate": "1MB"}, "discovery": {"max_dials": 2}},
    )
    new = dataclasses.replace(
        old,
        bind="127.0.0.1:9000",
        tags={"b": "2"},
        log_format="json",
        extra={"dist": {"keep": 7, "download_rate": "5MB"}, "discovery": {"max_dials": 3}},
        source="/etc/meshd/meshd.toml",
    )
    plan = plan_reload(old, new)
    now = effective_config(old, new, plan)
    assert (now.bind, now.tags, now.log_format) == (old.bind, {"b": "2"}, "json")
    dist = now.dist_config()
    assert (dist.keep, dist.upload_rate, dist.download_rate) == (2, None, 5e6)
    assert now.extra["discovery"] == {"max_dials": 2}
    assert now.source == "/etc/meshd/meshd.toml"
    assert old.tags == {"a": "1"}  # old is left as it was
    # Reloading the same file again still says what needs a restart, and applies nothing more.
    assert plan_reload(now, new) == ReloadPlan(restart_needed=("bind", "discovery.max_dials", "dist.keep"))


def test_a_loaded_file_with_tags_and_checks_plans_as_expected(tmp_path: Any) -> None:
    path = tmp_path / "meshd.toml"
    path.write_text('name = "n1"\ndata_dir = "/tmp/n1"\n[tags]\nrole = "edge"\n')
    old = load_config({}, env={}, config_file=str(path))
    path.write_text(
        'name = "n1"\ndata_dir = "/tmp/n1"\nbind = "127.0.0.1:9000"\n[tags]\nzone = "b"\n'
        '[[check]]\nname = "web"\nurl = "http://127.0.0.1:1/"\n'
    )
    new = load_config({}, env={}, config_file=str(path))
    assert plan_reload(old, new) == ReloadPlan(applied=("checks", "tags"), restart_needed=("bind",))


def test_reload_counts_are_a_labelled_counter() -> None:
    counts = ReloadCounts()
    counts.count(True)
    counts.count(False)
    counts.count(False)
    out = Exposition()
    counts.collect_metrics(out)
    text = out.render()
    assert 'meshd_config_reloads_total{result="ok"} 1' in text
    assert 'meshd_config_reloads_total{result="failed"} 2' in text
    assert "# TYPE meshd_config_reloads_total counter" in text
