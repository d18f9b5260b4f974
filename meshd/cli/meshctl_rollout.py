"""`meshctl releases --watch`: rollout progress per site (GET /v1/rollout), live.

On a terminal the table is redrawn every interval until Ctrl-C; elsewhere (a pipe, a log) one
line is printed per release and site whose progress changed, so the output reads as a history.
With --until-done it returns once the newest release of each name (of --name, if given) is at
100% in every site where alive nodes announce it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from meshd.cli.output import table

__all__ = ["bar", "is_done", "site_lines", "table_text", "watch"]

CLEAR = "\033[H\033[2J"
BAR_WIDTH = 20


def bar(percent: float, width: int = BAR_WIDTH) -> str:
    fill = max(0, min(width, int(percent / 100 * width)))
    return "[" + "#" * fill + "-" * (width - fill) + f"] {percent:5.1f}%"


def _releases(doc: dict[str, Any], name: str | None) -> list[dict[str, Any]]:
    return [r for r in doc.get("releases", []) if name is None or r.get("name") == name]


def _site_text(site: dict[str, Any]) -> str:
    text = f"{site['complete']}/{site['nodes']} complete, {site['fetching']} fetching"
    if site.get("down"):
        text += ", down: " + ",".join(site["down"])
    return text


def table_text(doc: dict[str, Any], name: str | None = None) -> str:
    """One row per release and site."""
    rows = []
    for r in _releases(doc, name):
        for site_name, site in r["sites"].items():
            rows.append(
                [r["name"], r["version"], r["id"][:12], site_name, bar(site["percent"]), _site_text(site)]
            )
    if not rows:
        return "no release announced in the mesh" + (f" named {name}" if name else "")
    return table(rows, ["NAME", "VERSION", "ID", "SITE", "PROGRESS", "NODES"])


def site_lines(doc: dict[str, Any], name: str | None = None) -> dict[tuple[str, str], str]:
    """(release id, site) -> its one-line state, for printing what changed."""
    out = {}
    for r in _releases(doc, name):
        for site_name, site in r["sites"].items():
            out[(r["id"], site_name)] = (
                f"{r['name']} {r['version']} site {site_name}: {site['percent']:.1f}% ({_site_text(site)})"
            )
    return out


def is_done(doc: dict[str, Any], name: str | None = None) -> bool:
    """The newest release of each name is complete in every site where alive nodes hold it."""
    newest: dict[str, dict[str, Any]] = {}
    for r in _releases(doc, name):  # the API lists releases of a name oldest first
        newest[r["name"]] = r
    if not newest:
        return False
    return all(
        r["complete"] > 0
        and all(s["percent"] >= 100.0 for s in r["sites"].values() if s["complete"] + s["fetching"] > 0)
        for r in newest.values()
    )


def watch(
    get: Callable[[], dict[str, Any]],
    write: Callable[[str], None],
    sleep: Callable[[float], None],
    *,
    tty: bool,
    until_done: bool = False,
    name: str | None = None,
    interval: float = 1.0,
) -> int:
    """Poll `get` (GET /v1/rollout) every `interval` until Ctrl-C (or done, with until_done)."""
    shown: dict[tuple[str, str], str] = {}
    try:
        while True:
            doc = get()
            if tty:
                write(CLEAR + f"rollout at {time.strftime('%H:%M:%S')} (Ctrl-C to stop)\n\n")
                write(table_text(doc, name) + "\n")
            else:
                lines = site_lines(doc, name)
                for key, line in lines.items():
                    if shown.get(key) != line:
                        write(f"{time.strftime('%H:%M:%S')} {line}\n")
                shown = lines
            if until_done and is_done(doc, name):
                return 0
            sleep(interval)
    except KeyboardInterrupt:
        return 0
