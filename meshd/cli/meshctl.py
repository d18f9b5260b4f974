"""`meshctl`: the operator's client for a node's HTTP API (stdlib only, starts fast).

--api URL (env MESHD_API, default http://127.0.0.1:7789); changes need the node's API token:
--token-file FILE (the node's <data-dir>/api-token) or env MESHD_API_TOKEN.
Exit codes: 0 ok, 1 error from meshd or cannot reach it, 2 a bad answer (a node critical or
missing), 64 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from meshd import __version__
from meshd.cli import meshctl_health, meshctl_images, meshctl_rollout
from meshd.cli.options import DEFAULT_API, api_options
from meshd.cli.output import print_json, table

EXIT_ERROR = 1
EXIT_USAGE = 64  # EX_USAGE: 2 means "a node is critical or missing" (DESIGN.md)


class CtlError(Exception):
    """A failure to report as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def normalize_api(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise CtlError("--api: empty URL", EXIT_USAGE)
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise CtlError(f"--api: not an http URL: {url}", EXIT_USAGE)
    return url


class Client:
    def __init__(self, api: str, token: str | None, timeout: float = 30.0) -> None:
        self.api = normalize_api(api)
        self.token = token
        self.timeout = timeout
        self.last_event_id: str | None = None  # of the last event stream_events read

    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.api + path, data=data, headers=headers, method=method)  # noqa: S310 - normalize_api allows http(s) only
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:  # noqa: S310 - normalize_api allows http(s) only
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise CtlError(self._describe_http_error(e)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise CtlError(f"cannot reach meshd at {self.api}: {reason}") from None
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise CtlError(f"meshd at {self.api} sent a non-JSON answer") from None

    def _describe_http_error(self, e: urllib.error.HTTPError) -> str:
        try:
            doc = json.loads(e.read() or b"{}")
        except ValueError:
            doc = {}
        error = doc.get("error") if isinstance(doc, dict) else None
        detail = doc.get("detail") if isinstance(doc, dict) else None
        msg = f"meshd answered {e.code}"
        if error:
            msg += f" {error}"
        if detail:
            msg += f": {detail}"
        if e.code in (401, 403):
            msg += " (give the node's API token: --token-file DATA_DIR/api-token or MESHD_API_TOKEN)"
        return msg

    def get(self, path: str, query: list[tuple[str, str]] | None = None) -> Any:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        return self._request("GET", path)

    def post(self, path: str, body: Any = None, timeout: float | None = None) -> Any:
        return self._request("POST", path, body if body is not None else {}, timeout)

    def stream_events(self) -> Iterator[tuple[str, str]]:
        """Server-sent events as (event, data) pairs until the server closes the stream; a
        second call resumes after the last event this client read (Last-Event-ID)."""
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        req = urllib.request.Request(  # noqa: S310 - normalize_api allows http(s) only
            self.api + "/v1/events", headers=headers
        )
        try:
            resp = urllib.request.urlopen(req, timeout=60)  # noqa: S310 - normalize_api allows http(s) only
        except urllib.error.HTTPError as e:
            raise CtlError(self._describe_http_error(e)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise CtlError(f"cannot reach meshd at {self.api}: {getattr(e, 'reason', e)}") from None
        with resp:
            event, data, event_id = "message", list[str](), None
            for raw in resp:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if event_id is not None:
                        self.last_event_id = event_id  # a frame's id counts once it is whole
                    if data:
                        yield event, "\n".join(data)
                    event, data, event_id = "message", [], None
                elif line.startswith(":"):
                    continue
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())


# --- output ------------------------------------------------------------------------------------


def _tags_text(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()))


# --- commands ----------------------------------------------------------------------------------


def cmd_members(c: Client, args: argparse.Namespace) -> int:
    query: list[tuple[str, str]] = []
    if args.state:
        query.append(("state", args.state))
    if args.site:
        query.append(("site", args.site))
    for t in args.tag:
        if "=" not in t:
            raise CtlError(f"--tag: expected KEY=VALUE, got {t!r}", EXIT_USAGE)
        query.append(("tag", t))
    doc = c.get("/v1/members", query)
    if args.json:
        print_json(doc)
        return 0
    rows = [
        [m["name"], m["addr"], m["state"], m["site"], m["health"], _tags_text(m.get("tags", {}))]
        for m in doc.get("members", [])
    ]
    print(table(rows, ["NAME", "ADDRESS", "STATE", "SITE", "HEALTH", "TAGS"]))
    return 0


def cmd_status(c: Client, args: argparse.Namespace) -> int:
    doc = c.get("/v1/status")
    if args.json:
        print_json(doc)
        return 0
    m, t = doc.get("members", {}), doc.get("transfer", {})
    print(f"name:     {doc.get('name')}")
    print(f"id:       {doc.get('id')}")
    print(f"cluster:  {doc.get('cluster')}")
    print(f"site:     {doc.get('site')}")
    print(f"address:  {doc.get('addr')}" + (f" ({doc['addr_source']})" if doc.get("addr_source") else ""))
    print(f"version:  {doc.get('version')}")
    print(f"uptime:   {_human_duration(float(doc.get('uptime_s', 0)))}")
    print("members:  " + ", ".join(f"{m.get(k, 0)} {k}" for k in ("alive", "suspect", "dead", "left")))
    print(
        f"transfer: sent {t.get('sent_bytes', 0)} B, received {t.get('received_bytes', 0)} B, "
        f"origin {t.get('origin_bytes', 0)} B"
    )
    return 0


def _human_duration(s: float) -> str:
    s = int(s)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{s}s")
    return "".join(parts)


def cmd_join(c: Client, args: argparse.Namespace) -> int:
    doc = c.post("/v1/join", {"addrs": args.addrs}, timeout=max(c.timeout, 60.0))
    if args.json:
        print_json(doc)
    else:
        print(f"joined through {doc.get('joined', 0)} of {len(args.addrs)} address(es)")
    return 0


def cmd_leave(c: Client, args: argparse.Namespace) -> int:
    doc = c.post("/v1/leave")
    if args.json:
        print_json(doc)
    else:
        print("node is leaving the mesh and will stop")
    return 0


def cmd_reload(c: Client, args: argparse.Namespace) -> int:
    doc = c.post("/v1/reload")  # a refused file is a 409 naming the file and key: exit 1
    if args.json:
        print_json(doc)
        return 0
    applied = doc.get("applied") or []
    print(f"configuration reloaded; applied: {', '.join(applied) or 'nothing changed'}")
    if doc.get("restart_needed"):
        print(f"changed, restart to apply: {', '.join(doc['restart_needed'])}")
    return 0


def _read_key_arg(args: argparse.Namespace) -> str:
    if args.key and args.key_file:
        raise CtlError("give either KEY or --key-file, not both", EXIT_USAGE)
    if args.key_file:
        try:
            with open(args.key_file, encoding="ascii", errors="replace") as f:
                return f.read(4096).strip()
        except OSError as e:
            raise CtlError(f"--key-file {args.key_file}: {e.strerror or e}", EXIT_USAGE) from None
    if args.key:
        return str(args.key).strip()
    raise CtlError(f"keys {args.op} needs a key: KEY (base64) or --key-file FILE", EXIT_USAGE)


def cmd_keys(c: Client, args: argparse.Namespace) -> int:
    if args.op == "list":
        doc = c.get("/v1/keys")
    else:
        doc = c.post("/v1/keys", {"op": args.op, "key": _read_key_arg(args)})
    if args.json:
        print_json(doc)
        return 0
    if doc.get("insecure"):
        print("node runs --insecure: no keyring")
        return 0
    rows = [[k["id"], "primary" if k.get("primary") else ""] for k in doc.get("keys", [])]
    print(table(rows, ["KEY ID", "ROLE"]))
    return 0


MONITOR_RETRIES = 5  # reconnections in a row that get no event before monitor gives up
MONITOR_RETRY_S = 2.0


def _monitor_line(event: str, data: str) -> str:
    try:
        doc = json.loads(data)
        if event == "reset":
            return f"{time.strftime('%H:%M:%S')} reset: events were missed ({doc.get('detail')})"
        m = doc.get("member", {})
        line = (
            f"{time.strftime('%H:%M:%S')} {event} {doc.get('kind')}: "
            f"{m.get('name')} {m.get('addr')} {m.get('state')}"
        )
        if event == "release":
            line = (
                f"{time.strftime('%H:%M:%S')} release {doc.get('name')} "
                f"{doc.get('version')}: {doc.get('state')}"
                + (f" ({doc['detail']})" if doc.get("detail") else "")
            )
    except (ValueError, AttributeError):
        line = f"{time.strftime('%H:%M:%S')} {event}: {data}"
    return line


def cmd_monitor(c: Client, args: argparse.Namespace) -> int:
    """Print events as they come; when the stream breaks (the node restarts, the network
    blinks) reconnect and resume after the last event seen (a `reset` line: some were lost)."""
    failures = 0
    while True:
        try:
            for event, data in c.stream_events():
                failures = 0
                if event == "stats":
                    continue  # the dashboard's chart feed, every 2 s: not an event for a person
                print(data if args.json else _monitor_line(event, data), flush=True)
            why = "the node closed the stream"
        except KeyboardInterrupt:
            return 0
        except (OSError, TimeoutError, CtlError) as e:
            why = str(e)
        failures += 1
        if failures > MONITOR_RETRIES:
            raise CtlError(f"event stream from {c.api} ended: {why}")
        print(f"meshctl: {why}; reconnecting", file=sys.stderr, flush=True)
        try:
            time.sleep(MONITOR_RETRY_S)
        except KeyboardInterrupt:
            return 0


def _bar(done: float, total: float, width: int = 30) -> str:
    frac = min(1.0, done / total) if total else 1.0
    fill = int(frac * width)
    return "[" + "#" * fill + "-" * (width - fill) + f"] {frac * 100:5.1f}%"


def cmd_publish(c: Client, args: argparse.Namespace) -> int:
    tags: dict[str, str] = {}
    for t in args.tag:
        if "=" not in t:
            raise CtlError(f"--tag: expected KEY=VALUE, got {t!r}", EXIT_USAGE)
        k, v = t.split("=", 1)
        tags[k.strip()] = v.strip()
    body: dict[str, Any] = {
        "path": os.path.abspath(args.path),
        "name": args.name,
        "version": args.version,
        "key_file": os.path.abspath(args.key),
        "site": args.site,
        "tags": tags,
        "origin_dir": os.path.abspath(args.origin_dir) if args.origin_dir else None,
        "origins": args.origin_url,
    }
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["doc"] = c.post("/v1/releases", body, timeout=max(c.timeout, 3600.0))
        except CtlError as e:
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    tty = sys.stderr.isatty() and not args.json
    while worker.is_alive():
        worker.join(0.25)
        if tty and worker.is_alive():
            with_progress = [
                p for p in _publishing(c) if p.get("name") == args.name and p.get("version") == args.version
            ]
            if with_progress:
                p = with_progress[0]
                sys.stderr.write(
                    f"\rchunking {args.name} {args.version} "
                    + _bar(p.get("done_bytes", 0), p.get("total_bytes", 0))
                )
                sys.stderr.flush()
    if tty:
        sys.stderr.write("\r\033[K")
    if "error" in result:
        raise result["error"]
    doc = result["doc"]
    if args.json:
        print_json(doc)
        return 0
    print(
        f"published {doc['name']} {doc['version']} (seq {doc.get('seq', 0)}) id {doc['id'][:16]}: "
        f"{doc['files']} file(s), "
        f"{doc['size']} bytes, {doc['chunks']} chunks ({doc['new_chunks']} new, "
        f"{doc['stored_bytes']} bytes stored)"
    )
    if doc.get("origin_dir"):
        print(f"origin files in {doc['origin_dir']}")
    if args.wait:
        return _wait_release(c, doc["id"], args.wait)
    return 0


def _publishing(c: Client) -> list[dict[str, Any]]:
    try:
        return list(c.get("/v1/releases").get("publishing", []))
    except CtlError:
        return []


def _wait_release(c: Client, rid: str, timeout: float) -> int:
    """Progress until every alive member that announces the release has it complete."""
    deadline = time.monotonic() + timeout
    tty = sys.stderr.isatty()
    while True:
        rows = [r for r in c.get("/v1/releases").get("releases", []) if r["id"] == rid]
        nodes = rows[0].get("nodes", {}) if rows else {}
        have = total = 0
        for frac in nodes.values():
            h, _, t = str(frac).partition("/")
            have, total = have + int(h or 0), total + int(t or 0)
        done = rows[0].get("nodes_complete", 0) if rows else 0
        if tty:
            sys.stderr.write(f"\rspreading to {len(nodes)} node(s): {done} complete " + _bar(have, total))
            sys.stderr.flush()
        if nodes and done == len(nodes) and len(nodes) > 1:
            if tty:
                sys.stderr.write("\n")
            print(f"{done} node(s) have the release")
            return 0
        if time.monotonic() > deadline:
            if tty:
                sys.stderr.write("\n")
            print(f"timed out: {done} of {len(nodes)} node(s) have the release", file=sys.stderr)
            return EXIT_ERROR
        time.sleep(0.5)


def cmd_releases(c: Client, args: argparse.Namespace) -> int:
    if args.watch or args.until_done:
        return meshctl_rollout.watch(
            lambda: dict(c.get("/v1/rollout")),
            _write_out,
            time.sleep,
            tty=sys.stdout.isatty() and not args.json,
            until_done=args.until_done,
            name=args.name,
            interval=args.interval,
        )
    doc = c.get("/v1/releases")
    if args.json:
        print_json(doc)
        return 0
    rows = []
    for r in doc.get("releases", []):
        current_on = r.get("current_on", [])
        rows.append(
            [
                r["name"],
                r["version"],
                str(r.get("seq", 0)),
                r["id"][:12],
                str(r["size"]),
                r["state"],
                f"{r['have_chunks']}/{r['chunks']}",
                "yes" if r.get("current") else "",
                f"{r.get('nodes_complete', 0)}/{len(r.get('nodes', {}))}",
                ",".join(current_on) if len(current_on) <= 4 else f"{len(current_on)} nodes",
            ]
        )
    print(
        table(
            rows,
            [
                "NAME",
                "VERSION",
                "SEQ",
                "ID",
                "SIZE",
                "STATE",
                "CHUNKS",
                "CURRENT",
                "COMPLETE ON",
                "CURRENT ON",
            ],
        )
    )
    return 0


def _write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_version(c: Client, args: argparse.Namespace) -> int:
    server: str | None
    try:
        server = c.get("/v1/status").get("version")
    except CtlError:
        server = None
    if args.json:
        print_json({"client": __version__, "server": server})
    else:
        print(f"meshctl {__version__}")
        print(f"meshd   {server}" if server else f"meshd   (not reachable at {c.api})")
    return 0


# --- parsing -----------------------------------------------------------------------------------


def _publish_options(p: argparse.ArgumentParser) -> None:
    """What `publish` and `publish-image` share: the release and its targeting."""
    p.add_argument("--name", required=True, help="release name")
    p.add_argument("--version", required=True, help="release version")
    p.add_argument(
        "--key", required=True, metavar="FILE", help="publisher private key (from `meshd keygen publisher`)"
    )
    p.add_argument("--site", help="install only on gateways of this site")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="install only on gateways with this tag; repeatable",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then wait (with progress) until the nodes that want it have it",
    )


def build_parser() -> argparse.ArgumentParser:
    common = api_options(_Parser)
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="request timeout (default 30)",
    )
    parser = _Parser(
        prog="meshctl", parents=[common], description="meshctl: talk to a meshd node's operator API"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("members", parents=[common], help="list members")
    p.add_argument("--state", help="only these states (alive, suspect, dead, left; comma list)")
    p.add_argument("--site", help="only this site")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only members with this tag; repeatable",
    )
    sub.add_parser("status", parents=[common], help="this node's status")
    p = sub.add_parser("join", parents=[common], help="join the mesh through these addresses")
    p.add_argument("addrs", nargs="+", metavar="HOST:PORT")
    sub.add_parser("leave", parents=[common], help="leave the mesh gracefully and stop the node")
    sub.add_parser(
        "reload",
        parents=[common],
        help="re-read the node's configuration files (as SIGHUP); says what needs a restart",
    )
    p = sub.add_parser("keys", parents=[common], help="list or rotate the cluster keyring")
    p.add_argument("op", choices=("list", "install", "use", "remove"))
    p.add_argument("key", nargs="?", help="base64 key (or --key-file)")
    p.add_argument("--key-file", metavar="FILE", help="key file made by `meshd keygen cluster`")
    sub.add_parser("monitor", parents=[common], help="stream member and release events")
    p = sub.add_parser("publish", parents=[common], help="publish a file or directory as a release")
    p.add_argument("path", metavar="PATH", help="file or directory (on the node's host)")
    _publish_options(p)
    p.add_argument(
        "--origin-dir",
        metavar="DIR",
        help="also write the chunks and manifest as plain files for a web server",
    )
    p.add_argument(
        "--origin-url",
        action="append",
        default=[],
        metavar="URL",
        help="origin URL (where --origin-dir will be served) put in the manifest",
    )
    p = sub.add_parser(
        "publish-image",
        parents=[common],
        help="publish a container image as a signed release served by the nodes' --registry",
    )
    meshctl_images.add_publish_image_options(p)
    _publish_options(p)
    sub.add_parser("images", parents=[common], help="images this node serves, and where they are complete")
    p = sub.add_parser(
        "releases",
        parents=[common],
        help="releases: state, progress, nodes that have it, where it is current",
    )
    p.add_argument(
        "--watch", action="store_true", help="rollout progress per site, live (redrawn until Ctrl-C)"
    )
    p.add_argument(
        "--until-done",
        action="store_true",
        help="watch until the newest release of each name is at 100%% in every site",
    )
    p.add_argument("--name", help="with --watch: only releases of this name")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="with --watch: poll interval"
    )
    meshctl_health.register(sub, COMMANDS)
    sub.add_parser("version", parents=[common], help="client and server versions")
    return parser


COMMANDS = {
    "members": cmd_members,
    "status": cmd_status,
    "join": cmd_join,
    "leave": cmd_leave,
    "reload": cmd_reload,
    "keys": cmd_keys,
    "monitor": cmd_monitor,
    "publish": cmd_publish,
    "publish-image": lambda c, args: meshctl_images.cmd_publish_image(c, args, cmd_publish, CtlError),
    "images": meshctl_images.cmd_images,
    "releases": cmd_releases,
    "version": cmd_version,
}


def _token(args: argparse.Namespace) -> str | None:
    path = getattr(args, "token_file", None)
    if path:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read(4096).strip() or None
        except OSError as e:
            raise CtlError(f"--token-file {path}: {e.strerror or e}", EXIT_USAGE) from None
    return os.environ.get("MESHD_API_TOKEN") or None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        api = getattr(args, "api", None) or os.environ.get("MESHD_API") or DEFAULT_API
        client = Client(api, _token(args), getattr(args, "timeout", 30.0))
        return COMMANDS[args.command](client, args)
    except CtlError as e:
        print(f"meshctl: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
