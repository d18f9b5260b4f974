"""Rollout progress per site, from what gossip already carries (GET /v1/rollout).

Every member announces the releases it holds or fetches in its `rel:` metadata
(release/announce.py). Summed per site, that is how far each release has spread, without asking
any node. Only alive members count toward a percentage: a dead node would hold it back for
good, so it is listed by name (`down`) instead. A member that announces nothing for a release
(not a target, or not started yet) counts as `waiting`; a release is known here as soon as one
member, alive or not, announces it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshd.core.messages import MemberState
from meshd.release.announce import Announce, parse_announcements

__all__ = ["RolloutMember", "rollout"]


class RolloutMember(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def state(self) -> MemberState: ...
    @property
    def meta(self) -> dict[str, str]: ...


@dataclass
class _Site:
    nodes: int = 0  # alive members of the site
    complete: int = 0
    fetching: int = 0
    current: int = 0
    have_chunks: int = 0
    total_chunks: int = 0
    down: list[str] = field(default_factory=list)

    def add(self, entry: Announce) -> None:
        self.have_chunks += entry.have
        self.total_chunks += entry.total
        if entry.complete:
            self.complete += 1
        else:
            self.fetching += 1
        if entry.current:
            self.current += 1

    def json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "complete": self.complete,
            "fetching": self.fetching,
            "waiting": self.nodes - self.complete - self.fetching,
            "current": self.current,
            "have_chunks": self.have_chunks,
            "total_chunks": self.total_chunks,
            "percent": _percent(self.have_chunks, self.total_chunks),
            "down": sorted(self.down),
        }


def _percent(have: int, total: int) -> float:
    return round(100.0 * have / total, 1) if total else 0.0


def _site(meta: Mapping[str, str]) -> str:
    return meta.get("site", "default")


def rollout(members: Iterable[RolloutMember]) -> list[dict[str, Any]]:
    """One row per release any member announces, newest last within a name:
    {"name", "version", "id" (its first 16 hex digits, as gossiped), "seq", "chunks",
    "sites": {site: {"nodes", "complete", "fetching", "waiting", "current", "have_chunks",
    "total_chunks", "percent", "down"}}, "nodes", "complete", "percent"}."""
    members = list(members)
    alive_per_site: dict[str, int] = {}
    for m in members:
        if m.state == MemberState.ALIVE:
            alive_per_site[_site(m.meta)] = alive_per_site.get(_site(m.meta), 0) + 1

    releases: dict[str, Announce] = {}  # rid16 -> one entry naming it (the highest total)
    sites: dict[str, dict[str, _Site]] = {}  # rid16 -> site -> counts
    for m in members:
        site = _site(m.meta)
        alive = m.state == MemberState.ALIVE
        for rid16, entry in parse_announcements(m.meta).items():
            known = releases.get(rid16)
            if known is None or entry.total > known.total:
                releases[rid16] = entry
            per_site = sites.setdefault(rid16, {})
            counts = per_site.get(site)
            if counts is None:
                counts = per_site[site] = _Site(nodes=alive_per_site.get(site, 0))
            if alive:
                counts.add(entry)
            else:
                counts.down.append(m.name)

    rows = []
    order = sorted(releases.items(), key=lambda kv: (kv[1].name, kv[1].seq, kv[1].version, kv[0]))
    for rid16, entry in order:
        per_site = sites[rid16]
        have = sum(s.have_chunks for s in per_site.values())
        total = sum(s.total_chunks for s in per_site.values())
        rows.append(
            {
                "name": entry.name,
                "version": entry.version,
                "id": rid16,
                "seq": entry.seq,
                "chunks": entry.total,
                "sites": {name: per_site[name].json() for name in sorted(per_site)},
                "nodes": sum(s.complete + s.fetching for s in per_site.values()),
                "complete": sum(s.complete for s in per_site.values()),
                "percent": _percent(have, total),
            }
        )
    return rows
