"""`meshctl health` and `meshctl query`: gossip queries through a node's API (GET /v1/health,
POST /v1/query). Registered by meshctl.build_parser (`register`).

    meshctl health [--site S] [--node N]... [--tag K=V]... [--timeout 3s] [--all-checks] [--json]
        a table grouped by site: nodes worst first, each with its failing checks (worst first);
        exit 2 when a node is critical or did not answer, 0 otherwise (warnings included).
    meshctl health --summary [same filters] [--json]
        one row per site (GET /v1/health?summary=site: each site's answers gathered inside the
        site, one summary each), then the failing and missing nodes; the same exit codes.
    meshctl query NAME [PAYLOAD | -] [same filters] [--relay-factor N] [--json]
        each node's answer (a handler's output, or why there is none); exit 2 when a node did
        not answer. PAYLOAD "-" reads it from standard input. Needs the API token.

This module never raises meshctl's CtlError itself (meshctl may run as __main__, a different
module object): client errors pass through from the client; usage errors print and return 64.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import MutableMapping
from typing import Any, Protocol

from meshd.cli.options import api_options
from meshd.cli.output import print_json, table
from meshd.errors import ConfigError
from meshd.units import parse_duration

EXIT_OK = 0
EXIT_BAD_ANSWER = 2  # DESIGN.md: `meshctl health` exits 2 when a node is critical or missing
EXIT_USAGE = 64  # EX_USAGE, apart from the bad-answer code
STATUS_ORDER = {"critical": 0, "unknown": 1, "warning": 2, "passing": 3}
OUTPUT_WIDTH = 60


class ApiClient(Protocol):
    timeout: float

    def get(self, path: str, query: list[tuple[str, str]] | None = None) -> Any: ...
    def post(self, path: str, body: Any = None, timeout: float | None = None) -> Any: ...


def _usage(message: str) -> int:
    print(f"meshctl: {message}", file=sys.stderr)
    return EXIT_USAGE


def _duration_seconds(text: str) -> float | None:
    """'250ms' / '3s' / '1m' / '2' -> seconds, as the server reads it; None when unreadable (the
    server says why)."""
    try:
        return parse_duration(text, "--timeout")
    except ConfigError:
        return None


def _filters(args: argparse.Namespace) -> tuple[list[tuple[str, str]], str | None]:
    """(query string pairs, usage error)."""
    query: list[tuple[str, str]] = []
    if args.site:
        query.append(("site", args.site))
    for n in args.node:
        query.append(("node", n))
    for t in args.tag:
        if "=" not in t:
            return [], f"--tag: expected KEY=VALUE, got {t!r}"
        query.append(("tag", t))
    if args.query_timeout:
        query.append(("timeout", args.query_timeout))
    if args.relay_factor:
        query.append(("relay_factor", str(args.relay_factor)))
    if getattr(args, "summary", False):
        query.append(("summary", "site"))
    return query, None


def _wait_longer(c: ApiClient, args: argparse.Namespace) -> None:
    """The HTTP request must outlive the query."""
    seconds = _duration_seconds(args.query_timeout) if args.query_timeout else None
    if seconds is not None:
        c.timeout = max(c.timeout, seconds + 10.0)


def _one_line(text: object, width: int = OUTPUT_WIDTH) -> str:
    line = " ".join(str(text or "").split())
    return line if len(line) <= width else line[: width - 1] + "…"


# --- health -------------------------------------------------------------------------------------


def _missing_sites(c: ApiClient, missing: list[str]) -> dict[str, str]:
    if not missing:
        return {}
    try:
        members = c.get("/v1/members").get("members", [])
    except Exception:  # only decoration: the answer stands without it
        return {}
    return {str(m.get("name")): str(m.get("site", "?")) for m in members if isinstance(m, dict)}


def health_rows(doc: dict[str, Any], sites: dict[str, str], all_checks: bool) -> list[list[str]]:
    """SITE, NODE, STATUS, CHECK, OUTPUT rows: sites in order, nodes worst first, then their
    failing checks worst first (every check with all_checks)."""
    by_site: dict[str, list[tuple[int, str, list[list[str]]]]] = {}
    for r in doc.get("responses", []):
        status = str(r.get("status", "unknown"))
        checks = [ch for ch in r.get("checks", []) if isinstance(ch, dict)]
        checks.sort(key=lambda ch: (STATUS_ORDER.get(str(ch.get("status")), 1), str(ch.get("name"))))
        shown = checks if all_checks else [ch for ch in checks if ch.get("status") != "passing"]
        lines = [[f"{ch.get('name')} ({ch.get('status')})", _one_line(ch.get("output"))] for ch in shown]
        if r.get("error"):
            lines.insert(0, [str(r["error"]), _one_line(r.get("detail"))])
        site = str(r.get("site") or sites.get(r.get("name", ""), "?"))
        by_site.setdefault(site, []).append(
            (
                STATUS_ORDER.get(status, 1),
                str(r.get("name")),
                [[status, *line] for line in lines] or [[status, "", ""]],
            )
        )
    for name in doc.get("missing", []):
        site = sites.get(name, "?")
        by_site.setdefault(site, []).append((-1, name, [["missing", "", "did not answer"]]))
    rows: list[list[str]] = []
    for site in sorted(by_site):
        for _, name, lines in sorted(by_site[site]):
            for i, (status, check, output) in enumerate(lines):
                rows.append([site, name, status, check, output] if i == 0 else ["", "", "", check, output])
    return rows


def health_exit_code(doc: dict[str, Any]) -> int:
    critical = any(r.get("status") in ("critical", "unknown") for r in doc.get("responses", []))
    return EXIT_BAD_ANSWER if critical or doc.get("missing") else EXIT_OK


def health_summary(doc: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for r in doc.get("responses", []):
        status = str(r.get("status", "unknown"))
        counts[status] = counts.get(status, 0) + 1
    parts = [f"{counts[s]} {s}" for s in ("passing", "warning", "critical", "unknown") if counts.get(s)]
    if doc.get("missing"):
        parts.append(f"{len(doc['missing'])} missing")
    total = len(doc.get("responses", [])) + len(doc.get("missing", []))
    how = "timed out" if doc.get("timed_out") else "every answer in"
    return (
        f"{total} node(s): {', '.join(parts) or 'none matched'} "
        f"({how} {float(doc.get('elapsed_ms', 0)):.0f} ms)"
    )


def _count(site: dict[str, Any], key: str) -> int:
    value = site.get(key)
    return value if isinstance(value, int) else 0


def site_rows(doc: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """(SITE, NODES, PASSING, WARNING, CRITICAL, MISSING rows; SITE, NODE, STATUS, CHECKS rows
    of the failing nodes, worst first, then the missing ones) of a summary=site answer."""
    totals: list[list[str]] = []
    nodes: list[list[str]] = []
    sites = doc.get("sites") or {}
    for name in sorted(sites):
        site = sites[name] if isinstance(sites[name], dict) else {}
        missing = [str(m) for m in site.get("missing") or ()]
        counts = [_count(site, k) for k in ("nodes", "passing", "warning", "critical")]
        totals.append([name, *map(str, counts), str(len(missing))])
        for f in site.get("failing") or ():
            if isinstance(f, dict):
                checks = ", ".join(str(c) for c in f.get("checks") or ())
                nodes.append([name, str(f.get("name")), str(f.get("status", "critical")), _one_line(checks)])
        nodes += [[name, m, "missing", "did not answer"] for m in missing]
    return totals, nodes


def site_exit_code(doc: dict[str, Any]) -> int:
    sites = [s for s in (doc.get("sites") or {}).values() if isinstance(s, dict)]
    bad = any(_count(s, "critical") or s.get("missing") for s in sites)
    return EXIT_BAD_ANSWER if bad else EXIT_OK


def site_summary_line(doc: dict[str, Any]) -> str:
    sites = [s for s in (doc.get("sites") or {}).values() if isinstance(s, dict)]
    parts = [f"{sum(_count(s, k) for s in sites)} {k}" for k in ("passing", "warning", "critical")]
    parts.append(f"{sum(len(s.get('missing') or ()) for s in sites)} missing")
    how = "timed out" if doc.get("timed_out") else "every site in"
    return (
        f"{sum(_count(s, 'nodes') for s in sites)} node(s) in {len(sites)} site(s): {', '.join(parts)} "
        f"({how} {float(doc.get('elapsed_ms', 0)):.0f} ms)"
    )


def _cmd_health_summary(c: ApiClient, args: argparse.Namespace, query: list[tuple[str, str]]) -> int:
    doc = c.get("/v1/health", query)
    if args.json:
        print_json(doc)
        return site_exit_code(doc)
    totals, nodes = site_rows(doc)
    if totals:
        print(table(totals, ["SITE", "NODES", "PASSING", "WARNING", "CRITICAL", "MISSING"]))
    if nodes:
        print()
        print(table(nodes, ["SITE", "NODE", "STATUS", "CHECKS"]))
    print(site_summary_line(doc))
    return site_exit_code(doc)


def cmd_health(c: ApiClient, args: argparse.Namespace) -> int:
    query, problem = _filters(args)
    if problem:
        return _usage(problem)
    _wait_longer(c, args)
    if args.summary:
        return _cmd_health_summary(c, args, query)
    doc = c.get("/v1/health", query)
    if args.json:
        print_json(doc)
        return health_exit_code(doc)
    sites = _missing_sites(c, list(doc.get("missing", [])))
    rows = health_rows(doc, sites, args.all_checks)
    if rows:
        print(table(rows, ["SITE", "NODE", "STATUS", "CHECK", "OUTPUT"]))
    print(health_summary(doc))
    return health_exit_code(doc)


# --- query --------------------------------------------------------------------------------------


def _answer_text(r: dict[str, Any]) -> tuple[str, str]:
    """(headline, body) of one node's answer."""
    if r.get("error") and "exit_code" not in r:
        return f"{r['error']}: {r.get('detail') or ''}".rstrip(": "), ""
    if "exit_code" in r:
        code = r.get("exit_code")
        head = f"exit {code}" if code is not None else str(r.get("error") or "no exit code")
        if r.get("error") and r.get("detail"):
            head += f" ({r['detail']})"
        if r.get("truncated"):
            head += " (output truncated)"
        return head, str(r.get("output") or "")
    if "payload" in r:
        return "answer", str(r["payload"])
    if "status" in r:  # the built-in health query
        return str(r["status"]), "\n".join(
            f"{ch.get('name')}: {ch.get('status')} {_one_line(ch.get('output'))}"
            for ch in r.get("checks", [])
            if isinstance(ch, dict)
        )
    extra = {k: v for k, v in r.items() if k not in ("name", "site", "elapsed_ms")}
    return "answer", str(extra)


def cmd_query(c: ApiClient, args: argparse.Namespace) -> int:
    query, problem = _filters(args)
    if problem:
        return _usage(problem)
    payload = args.payload or ""
    if payload == "-":
        payload = sys.stdin.read()
    body: dict[str, Any] = {"name": args.name, "payload": payload}
    for key, value in query:
        if key == "node":
            body.setdefault("nodes", []).append(value)
        elif key == "tag":
            k, _, v = value.partition("=")
            body.setdefault("tags", {})[k] = v
        elif key == "relay_factor":
            body[key] = int(value)
        else:
            body[key] = value
    _wait_longer(c, args)
    doc = c.post("/v1/query", body, timeout=c.timeout)
    code = EXIT_BAD_ANSWER if doc.get("missing") else EXIT_OK
    if args.json:
        print_json(doc)
        return code
    for r in doc.get("responses", []):
        head, text = _answer_text(r)
        print(f"{r.get('name')} ({r.get('site') or '?'}): {head}")
        for line in text.rstrip("\n").splitlines():
            print(f"  {line}")
    for name in doc.get("missing", []):
        print(f"{name}: did not answer")
    n = len(doc.get("responses", []))
    how = "timed out" if doc.get("timed_out") else "complete"
    print(
        f"{n} answer(s), {len(doc.get('missing', []))} missing ({how} after "
        f"{float(doc.get('elapsed_ms', 0)):.0f} ms)"
    )
    return code


# --- parsing ------------------------------------------------------------------------------------


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", help="only this site (or re:PATTERN, which needs the API token)")
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME",
        help="only these nodes; repeatable or a comma list",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only nodes with this tag (VALUE may be re:PATTERN); repeatable",
    )
    p.add_argument(
        "--timeout",
        dest="query_timeout",
        metavar="DURATION",
        help="how long to wait for answers (250ms, 3s; default: Serf's, from the mesh size)",
    )
    p.add_argument(
        "--relay-factor",
        type=int,
        default=0,
        metavar="N",
        help="each answer also travels through N random members (lossy paths)",
    )


def register(sub: Any, commands: MutableMapping[str, Any]) -> None:
    """Add the `health` and `query` subcommands to meshctl's subparsers and COMMANDS."""
    common = api_options(argparse.ArgumentParser)  # its --timeout is the query's: a duration
    p = sub.add_parser("health", parents=[common], help="ask the matching nodes how healthy they are")
    _add_filters(p)
    p.add_argument("--all-checks", action="store_true", help="list every check, not only the failing ones")
    p.add_argument(
        "--summary",
        action="store_true",
        help="one summary per site, gathered inside each site (for big meshes)",
    )
    p = sub.add_parser("query", parents=[common], help="run a named query on the matching nodes")
    p.add_argument("name", metavar="NAME", help="query name (a [[query_handler]] of the nodes)")
    p.add_argument("payload", nargs="?", metavar="PAYLOAD", help="given to the handlers ('-': stdin)")
    _add_filters(p)
    commands["health"] = cmd_health
    commands["query"] = cmd_query
