"""What a configuration reload (SIGHUP, `meshctl reload`) may apply, as Consul's reload does.

`plan_reload(old, new)` compares two NodeConfigs and sorts every setting that changed into
"applied now" (checks, query handlers, trusted publisher keys, tags, rate limits, log level and
format) or "needs a restart" (addresses, ports, names, data dir, keys, protocol, ...). It is pure:
the daemon loads the new file, asks for a plan, and applies the plan's settings to its
components. Every NodeConfig field (and every key of the [dist] and [discovery] tables) is
classified here; tests/unit/test_reload.py fails when a new field is not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

import msgspec

from meshd.config import DiscoveryConfig, NodeConfig, discovery_config
from meshd.config_tables import canonical_key
from meshd.metrics import Exposition
from meshd.release.config import DistConfig

__all__ = [
    "APPLIED_FIELDS",
    "BOOKKEEPING_FIELDS",
    "DECODED_TABLES",
    "DIST_APPLIED",
    "RESTART_FIELDS",
    "ReloadCounts",
    "ReloadPlan",
    "effective_config",
    "plan_reload",
]

# NodeConfig fields a reload applies to the running node.
APPLIED_FIELDS: Final = frozenset(
    {"tags", "checks", "query_handlers", "trust_publisher", "log_level", "log_format"}
)
# NodeConfig fields only read at start: a change is reported, not applied.
RESTART_FIELDS: Final = frozenset(
    {
        "name",
        "cluster",
        "bind",
        "advertise",
        "api",
        "registry",
        "registry_upstream",
        "registry_cache_max",
        "registry_pass_tags",
        "data_dir",
        "join",
        "site",
        "mdns",
        "mdns_interfaces",
        "cluster_key_file",
        "insecure",
        "profile",
        "api_allow_hosts",
        "protocol_overrides",
    }
)
# Not settings: where the configuration was read from.
BOOKKEEPING_FIELDS: Final = frozenset({"source", "sources"})
# `extra` holds the passthrough tables; each is compared key by key below.
_TABLE_FIELD: Final = "extra"
# [dist] keys a reload applies: the transfer rate caps. The rest shape the store at start.
DIST_APPLIED: Final = frozenset({"upload_rate", "download_rate"})
# The passthrough tables compared key by key (any other table changed needs a restart).
DECODED_TABLES: Final[dict[str, type[msgspec.Struct]]] = {"dist": DistConfig, "discovery": DiscoveryConfig}


@dataclass(frozen=True)
class ReloadPlan:
    """What changed: `applied` names settings to apply now, `restart_needed` the others (both
    sorted; table keys spelled "dist.keep")."""

    applied: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()

    def applies(self, setting: str) -> bool:
        return setting in self.applied


def plan_reload(old: NodeConfig, new: NodeConfig) -> ReloadPlan:
    """Sort the settings that differ between `old` and `new`; both are validated configs."""
    applied: set[str] = set()
    restart: set[str] = set()
    for f in dataclasses.fields(NodeConfig):
        name = f.name
        if name in BOOKKEEPING_FIELDS or name == _TABLE_FIELD:
            continue
        if getattr(old, name) == getattr(new, name):
            continue
        (applied if name in APPLIED_FIELDS else restart).add(name)
    for key in _changed_keys(old.dist_config(), new.dist_config()):
        (applied if key in DIST_APPLIED else restart).add(f"dist.{key}")
    for key in _changed_keys(discovery_config(old), discovery_config(new)):
        restart.add(f"discovery.{key}")
    # Other passthrough tables ([health], or one added later) are read at start only.
    for table in sorted(set(old.extra) | set(new.extra)):
        if table not in DECODED_TABLES and old.extra.get(table) != new.extra.get(table):
            restart.add(table)
    return ReloadPlan(tuple(sorted(applied)), tuple(sorted(restart)))


def effective_config(old: NodeConfig, new: NodeConfig, plan: ReloadPlan) -> NodeConfig:
    """What the node runs with after applying `plan`: `old` with the applied settings of `new`.

    Settings that need a restart keep their running value, so the next reload reports them
    again until the node restarts."""
    out = dataclasses.replace(old, extra=dict(old.extra))
    for name in APPLIED_FIELDS:
        if plan.applies(name):
            setattr(out, name, getattr(new, name))
    caps = [key for key in DIST_APPLIED if plan.applies(f"dist.{key}")]
    if caps:
        dist = {k: v for k, v in (old.extra.get("dist") or {}).items() if canonical_key(k) not in caps}
        dist.update({k: v for k, v in (new.extra.get("dist") or {}).items() if canonical_key(k) in caps})
        out.extra["dist"] = dist
    out.source, out.sources = new.source, list(new.sources)
    return out


class ReloadCounts:
    """meshd_config_reloads_total{result="ok|failed"}."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0

    def count(self, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1

    def collect_metrics(self, out: Exposition) -> None:
        out.labelled(
            "meshd_config_reloads_total",
            "counter",
            "configuration reloads (SIGHUP, POST /v1/reload) by result; a failed one changed nothing",
            [({"result": "ok"}, self.ok), ({"result": "failed"}, self.failed)],
        )


def _changed_keys(old: msgspec.Struct, new: msgspec.Struct) -> list[str]:
    """The keys of a decoded table whose values differ (defaults filled in on both sides)."""
    return [k for k in old.__struct_fields__ if getattr(old, k) != getattr(new, k)]
