"""A site's health in one summary: the reducer aggregators run, and the merge the API shows.

Pure functions (no I/O, no clock), the same in the daemon and the simulator.

`summarize` is the Reducer (meshd.core.aggregate) of the daemon: for the `health` query it keeps
only the nodes that are not passing, each with its non-passing check names; every other node
its aggregator names as answered passed. Because the summary is per name, summaries of one site
from two aggregators merge exactly (`site_doc`: a name counts once). Other queries are not
reduced (raw_reducer).

    summary payload   {"failing": [{"name", "status", "checks": [check names]}]}
    site_doc          {"nodes", "passing", "warning", "critical", "missing": [names],
                       "failing": [{"name", "status", "checks"}]}      (critical counts unknown)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

import orjson

from meshd.core.aggregate import SitePart, raw_reducer
from meshd.health.spec import HEALTH_QUERY

STATUSES: Final = ("passing", "warning", "critical")
MAX_CHECKS: Final = 16  # check names kept per failing node
MAX_CHECK_NAME: Final = 64
_ORDER: Final = {"critical": 0, "unknown": 1, "warning": 2}


def answer_status(payload: bytes) -> tuple[str, list[str]]:
    """(status, non-passing check names) of one node's health answer; "unknown" when unreadable
    or when the node could not answer (busy, failed: the error leads the check names)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "unknown", []
    if not isinstance(doc, dict):
        return "unknown", []
    status = doc.get("status")
    checks = [
        str(c.get("name"))[:MAX_CHECK_NAME]
        for c in doc.get("checks") or ()
        if isinstance(c, dict) and c.get("status") != "passing"
    ]
    if doc.get("error"):
        checks.insert(0, str(doc["error"])[:MAX_CHECK_NAME])
    if status not in STATUSES:
        status = "unknown"
    return str(status), checks[:MAX_CHECKS]


def summarize(query: str, answers: Sequence[tuple[str, bytes]]) -> bytes:
    """The Reducer: a site's health answers -> its non-passing nodes (others: raw)."""
    if query != HEALTH_QUERY:
        return raw_reducer(query, answers)
    failing = []
    for name, payload in answers:
        status, checks = answer_status(payload)
        if status != "passing":
            failing.append({"name": name, "status": status, "checks": checks})
    return orjson.dumps({"failing": failing})


def _failing(payload: bytes) -> dict[str, tuple[str, list[str]]]:
    """name -> (status, checks) from a summary; a damaged one reads as every node unknown."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {}
    out: dict[str, tuple[str, list[str]]] = {}
    entries = doc.get("failing") if isinstance(doc, dict) else None
    for e in entries if isinstance(entries, list) else ():
        if isinstance(e, dict) and isinstance(e.get("name"), str):
            status = e.get("status") if e.get("status") in ("warning", "critical") else "unknown"
            checks = e.get("checks")
            kept = [str(c) for c in checks[:MAX_CHECKS]] if isinstance(checks, list) else []
            out[e["name"]] = (str(status), kept)
    return out


def _readable(payload: bytes) -> bool:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("failing"), list)


def site_doc(parts: Sequence[SitePart], missing: Iterable[str]) -> dict[str, Any]:
    """One site's entry of `GET /v1/health?summary=site`; a name counts once over the parts."""
    statuses: dict[str, tuple[str, list[str]]] = {}
    for part in parts:
        failing = _failing(part.payload)
        fallback = ("passing", []) if _readable(part.payload) else ("unknown", ["unreadable summary"])
        for name in part.answered:
            statuses.setdefault(name, failing.get(name, fallback))
    missing = sorted(set(missing) - statuses.keys())
    counts = dict.fromkeys(STATUSES, 0)
    for status, _ in statuses.values():
        counts["critical" if status == "unknown" else status] += 1
    failing_list = sorted(
        ({"name": n, "status": s, "checks": c} for n, (s, c) in statuses.items() if s != "passing"),
        key=lambda e: (_ORDER.get(str(e["status"]), 1), str(e["name"])),
    )
    return {"nodes": len(statuses) + len(missing), **counts, "missing": missing, "failing": failing_list}
