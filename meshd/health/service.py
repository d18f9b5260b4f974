"""Health in the running daemon: the checks' summary in the node's metadata, health events on
the event stream, and the answers to the queries this node matches.

The daemon builds it from the config (`from_config`: bad [[check]] / [[query_handler]] tables
raise ConfigError naming the table), `attach`es it to the runtime, `start`s it before joining
(every check has run once, so the first gossiped summary means something) and `stop`s it on
shutdown. The summary goes into meta["health"], merged into the node's current metadata
(other features keep their own keys there), so every member learns it by gossip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from meshd.config import NodeConfig
from meshd.core.messages import MemberState
from meshd.core.node import MemberEvent
from meshd.core.query import QueryAction
from meshd.health.config import parse_checks, parse_query_handlers
from meshd.health.monitor import HealthMonitor
from meshd.health.spec import STATUSES, CheckSpec, HandlerSpec, Status
from meshd.metrics import Exposition
from meshd.runtime import NodeEvent, NodeRuntime

log = logging.getLogger("meshd.health")

HEALTH_META_KEY = "health"


def parse_health_config(
    checks: Sequence[Mapping[str, Any]], handlers: Sequence[Mapping[str, Any]], data_dir: str
) -> tuple[list[CheckSpec], dict[str, HandlerSpec]]:
    """The [[check]] and [[query_handler]] tables; ConfigError names the check or handler."""
    return parse_checks(checks, data_dir), parse_query_handlers(handlers)


class HealthService:
    """Glue between HealthMonitor and the runtime (summary -> meta, events, query answers)."""

    def __init__(self, monitor: HealthMonitor, name: str, site: str) -> None:
        self.monitor = monitor
        self.name = name
        self.site = site
        self._runtime: NodeRuntime | None = None
        self._known: dict[str, str] = {}  # member -> last health seen in its metadata
        monitor.on_change = self._on_summary

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> HealthService:
        checks, handlers = parse_health_config(cfg.checks, cfg.query_handlers, cfg.data_dir)
        return cls(HealthMonitor(checks, handlers), cfg.name, cfg.site)

    def attach(self, runtime: NodeRuntime) -> None:
        self._runtime = runtime
        runtime.set_query_answerer(self.answer)
        runtime.add_listener(self._on_member_event)

    async def start(self) -> None:
        await self.monitor.start()
        self._publish_summary(self.monitor.summary())
        log.info(
            "health checks running (%d): summary %s, query handlers: %s",
            len(self.monitor.checks()),
            self.monitor.summary(),
            ", ".join(sorted(self.monitor.handlers)) or "none",
        )

    async def stop(self) -> None:
        await self.monitor.stop()

    async def reconfigure(self, checks: Sequence[CheckSpec], handlers: Mapping[str, HandlerSpec]) -> None:
        """New checks and query handlers (a configuration reload, parsed by parse_health_config):
        unchanged checks keep their state, new ones run once first; the summary is re-gossiped
        if it changed."""
        await self.monitor.reconfigure(checks, handlers)
        log.info(
            "health checks now (%d): summary %s, query handlers: %s",
            len(self.monitor.checks()),
            self.monitor.summary(),
            ", ".join(sorted(self.monitor.handlers)) or "none",
        )

    def collect_metrics(self, out: Exposition) -> None:
        """meshd_health_checks: the local checks by status; meshd_health_checks_hung_total."""
        checks = self.monitor.checks()
        out.labelled(
            "meshd_health_checks",
            "gauge",
            "local checks by status",
            [({"status": s}, sum(1 for c in checks if c["status"] == s)) for s in STATUSES],
        )
        out.counter(
            "meshd_health_checks_hung_total",
            "check runs refused because the check's previous blocking call (statvfs) had not returned",
            sum(self.monitor.hung_runs().values()),
        )

    async def answer(self, action: QueryAction) -> bytes:
        query = action.query
        return await self.monitor.answer(query.name, query.payload, node=self.name, site=self.site)

    # summary -> metadata

    def _on_summary(self, status: Status) -> None:
        log.info("health summary is now %s", status)
        self._publish_summary(status)

    def _publish_summary(self, status: Status) -> None:
        runtime = self._runtime
        if runtime is None:
            return
        meta = runtime.node.meta  # a copy of the current metadata: merge, never replace
        if meta.get(HEALTH_META_KEY) == status:
            return
        meta[HEALTH_META_KEY] = status
        runtime.set_meta(meta)

    # member events -> health events

    def _on_member_event(self, ev: MemberEvent) -> None:
        m = ev.member
        if ev.kind in ("reap",):
            self._known.pop(m.name, None)
            return
        if m.state != MemberState.ALIVE:
            return
        health = m.meta.get(HEALTH_META_KEY)
        if health is None:
            return
        before = self._known.get(m.name)
        self._known[m.name] = health
        if before == health or self._runtime is None:
            return
        if before is not None or m.name == self.name:
            log.info("health of %s: %s -> %s", m.name, before or "unknown", health)
        site = m.meta.get("site", "default")
        member = {
            "name": m.name,
            "id": m.node_id,
            "addr": m.addr,
            "site": site,
            "state": m.state.name.lower(),
            "health": health,
        }
        payload = {
            "kind": "health",
            "name": m.name,
            "site": site,
            "health": health,
            "previous": before or "unknown",
            "member": member,
        }
        # After the member event itself has reached every subscriber.
        runtime = self._runtime
        asyncio.get_running_loop().call_soon(runtime.publish, NodeEvent("health", m, payload))
