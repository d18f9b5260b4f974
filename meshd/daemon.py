"""The composition root: config -> identity, keyring, sockets, core, API -> run -> graceful leave.

Everything with a side effect lives here or below (net/, api/); the core only sees `now`,
bytes and an RNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import ipaddress
import logging
import os
import random
import secrets
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from meshd import PROTOCOL_VERSION, __version__
from meshd.api.app import ApiServer, create_api_app
from meshd.config import NodeConfig
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.node import MemberEvent, MemberView, Node
from meshd.core.query import QueryResult, default_timeout
from meshd.crypto import (
    Keyring,
    NodeIdentity,
    fingerprint,
    load_publisher_public,
    read_key_file,
    write_private,
)
from meshd.errors import ConfigError, StateError
from meshd.health_service import HealthService
from meshd.metrics import Exposition, TransferStats
from meshd.net.peer_http import PeerClient, PeerServer, TCPStats, create_peer_app
from meshd.net.udp import UDPEndpoint
from meshd.release.api import add_release_routes
from meshd.release.service import ReleaseService
from meshd.runtime import NodeEvent, NodeRuntime, Subscription
from meshd.units import format_hostport, is_loopback_host, parse_hostport
from meshd.wire import Codec

log = logging.getLogger("meshd")

KEYRING_FILE = "keyring.json"
TOKEN_FILE = "api-token"
SNAPSHOT_FILE = "peers.json"
SNAPSHOT_INTERVAL = 30.0
ADDRESS_WATCH_INTERVAL = 10.0  # how often a derived advertise address is checked
SNAPSHOT_DEBOUNCE = 1.0
SNAPSHOT_MAX_PEERS = 128
LEAVE_TIMEOUT = 3.0  # Serf's graceful timeout
JOIN_BACKOFF_MAX = 30.0


# --- small OS helpers --------------------------------------------------------------------------


def sd_notify(message: str) -> bool:
    """Tell systemd about our state (READY=1, STOPPING=1, ...); a no-op without systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        target = "\0" + target[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall(message.encode())
    except OSError as e:
        log.debug("sd_notify failed: %s", e)
        return False
    return True


def prepare_data_dir(path: str) -> Path:
    d = Path(path)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(d.stat().st_mode)
        if mode & 0o077 and d.stat().st_uid == os.getuid():
            os.chmod(d, 0o700)  # it holds the node key and the API token
    except OSError as e:
        raise ConfigError(f"--data-dir {path}: {e.strerror or e}") from None
    if not os.access(d, os.W_OK):
        raise ConfigError(f"--data-dir {path}: not writable")
    return d


def load_or_create_token(data_dir: Path) -> str:
    path = data_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="ascii", errors="replace").strip()
        if len(token) >= 16:
            return token
        log.warning("%s is too short; writing a new token", path)
    token = secrets.token_urlsafe(32)
    write_private(path, (token + "\n").encode())
    return token


def _iface_ipv4(name: str) -> str | None:
    """IPv4 address of an interface (SIOCGIFADDR), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        return socket.inet_ntoa(res[20:24])
    except OSError:
        return None


def _default_route_iface() -> str | None:
    """Interface of the IPv4 default route with the lowest metric (from /proc/net/route)."""
    best: tuple[int, str] | None = None
    try:
        with open("/proc/net/route") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or parts[1] != "00000000" or parts[7] != "00000000":
            continue
        try:
            flags, metric = int(parts[3], 16), int(parts[6])
        except ValueError:
            continue
        if flags & 0x1 and (best is None or metric < best[0]):  # RTF_UP
            best = (metric, parts[0])
    return best[1] if best else None


def derive_advertise_host(bind_host: str) -> tuple[str, str]:
    """(address, how it was chosen) for a node bound to a wildcard address."""
    iface = _default_route_iface()
    if iface:
        addr = _iface_ipv4(iface)
        if addr and not ipaddress.ip_address(addr).is_loopback:
            return addr, f"default route interface {iface}"
    with contextlib.suppress(OSError):
        for _, name in socket.if_nameindex():
            addr = _iface_ipv4(name)
            if addr and not ipaddress.ip_address(addr).is_loopback:
                return addr, f"first non-loopback interface {name}"
    return "127.0.0.1", "loopback (no other interface has an address)"


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


async def resolve_hostport(addr: str, family: int = socket.AF_INET) -> list[str]:
    """'host:port' -> ['ip:port', ...] (IP literals pass through; names are looked up now)."""
    host, port = parse_hostport(addr, "address")
    try:
        ipaddress.ip_address(host)
        return [format_hostport(host, port)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except OSError as e:
        log.warning("cannot resolve %s: %s", host, e)
        return []
    out: list[str] = []
    for info in infos:
        ip = str(info[4][0])
        hp = format_hostport(ip, port)
        if hp not in out:
            out.append(hp)
    return out


def setup_logging(level: str) -> None:
    """Concise lines on stderr; journald gets a <N> priority prefix and no timestamp."""
    journal = False
    stream = os.environ.get("JOURNAL_STREAM", "")
    if stream:
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(sys.stderr.fileno())
            dev, ino = stream.split(":")
            journal = int(dev) == st.st_dev and int(ino) == st.st_ino
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s",
                              "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


class _JournalFormatter(logging.Formatter):
    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                 logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


# --- the daemon ----------------------------------------------------------------------------------


class Daemon:
    """One meshd node: owns the sockets, the core, the API and the data dir."""

    def __init__(self, cfg: NodeConfig, reload: Callable[[], NodeConfig] | None = None) -> None:
        self.cfg = cfg
        self._reload = reload
        self.name = cfg.name
        self.cluster = cfg.cluster
        self.site = cfg.site
        self.node_id = ""
        self.addr = ""
        self.addr_source = ""
        self.api_token = ""
        self.transfer = TransferStats()
        self.data_dir = Path(cfg.data_dir)
        self.keyring: Keyring | None = None
        self.tcp_stats = TCPStats()
        self.client_stats = TCPStats()
        self.api_url = ""
        self._started = time.monotonic()
        self._ready = False
        self._ready_detail = "starting"
        self._stop = asyncio.Event()
        self._leave_on_stop = True
        self._stopping = False
        self._snapshot_dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._discovery: Any = None
        self._runtime: NodeRuntime | None = None
        self._udp: UDPEndpoint | None = None
        self._peer_server: PeerServer | None = None
        self._api: ApiServer | None = None
        self._snapshot_peers: list[str] = []
        self._start_incarnation = 0  # above what the mesh may remember of our last run
        self.dist: ReleaseService | None = None
        self.health: HealthService | None = None  # checks, health meta and query answers

    # --- Agent protocol (used by the API) --------------------------------------------------

    @property
    def runtime(self) -> NodeRuntime:
        assert self._runtime is not None, "daemon not started"
        return self._runtime

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def is_ready(self) -> bool:
        return self._ready

    def readiness_detail(self) -> str:
        return self._ready_detail

    def members(self) -> list[MemberView]:
        return self.runtime.node.members()

    def subscribe(self) -> Subscription:
        return self.runtime.subscribe()

    def update_meta(self, updates: dict[str, str | None]) -> None:
        """Merge keys into this node's gossiped metadata (None deletes a key)."""
        meta = dict(self.runtime.node.meta)
        for k, v in updates.items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
        self.runtime.set_meta(meta)

    def _on_release_event(self, payload: dict[str, Any]) -> None:
        self.runtime.publish(NodeEvent("release", None, payload))

    async def run_query(
        self,
        name: str,
        payload: bytes,
        filters: QueryFilter,
        timeout: float | None,
        relay_factor: int,
    ) -> QueryResult:
        """A gossip query for the API (/v1/health, /v1/query); Serf's default timeout."""
        node = self.runtime.node
        if timeout is None:
            timeout = default_timeout(node.config.gossip_interval, node.num_active())
        return await self.runtime.ask(name, payload, filters, timeout, relay_factor)

    def _collect_query_metrics(self, out: Exposition) -> None:
        """Query engine counters (query.match, response.accepted, ...), health, answering."""
        rt = self.runtime
        out.core_counters({f"queries.{k}": v for k, v in rt.node.queries.counters.items()})
        out.gauge("meshd_queries_in_flight", "queries this node asked, not finished yet",
                  rt.node.queries.in_flight())
        out.counter("meshd_queries_busy_total", "queries answered busy (too many running)",
                    rt.queries_busy)
        if self.health is not None:
            out.labelled("meshd_health_checks", "gauge", "local checks by status",
                         [({"status": s}, sum(1 for c in self.health.monitor.checks()
                                              if c["status"] == s))
                          for s in ("passing", "warning", "critical")])

    async def join(self, addrs: list[str]) -> int:
        resolved: list[str] = []
        for a in addrs:
            resolved.extend(await resolve_hostport(a, self._family))
        joined = await self.runtime.join(resolved)
        if joined:
            self._set_ready("joined")
        return joined

    def request_leave(self) -> None:
        """Leave the mesh and stop (as Serf's `leave`), after the HTTP answer went out."""
        asyncio.get_running_loop().call_later(0.1, self.stop, True, "leave requested by API")

    def keys(self) -> tuple[list[str], str] | None:
        ring = self.keyring
        if ring is None:
            return None
        return ring.fingerprints(), fingerprint(ring.primary)

    def key_op(self, op: str, key: bytes) -> None:
        ring = self.keyring
        if ring is None:
            raise StateError("insecure node: no keyring")
        self.runtime.key_op(op, key)  # StateError when it does not fit this keyring
        self._save_keyring()
        log.info("keyring: %s %s (primary now %s)", op, fingerprint(key), fingerprint(ring.primary))

    def collect_metrics(self, out: Exposition) -> None:
        node = self.runtime.node
        out.gauge("meshd_build_info", "meshd version", 1, version=__version__,
                  protocol=str(PROTOCOL_VERSION))
        out.gauge("meshd_uptime_seconds", "seconds since start", self.uptime())
        out.gauge("meshd_ready", "1 once joined or alone by intent", int(self._ready))
        counts = dict.fromkeys((s.name.lower() for s in MemberState), 0)
        for m in node.members():
            counts[m.state.name.lower()] += 1
        out.labelled("meshd_members", "gauge", "members by state",
                     [({"state": s}, n) for s, n in counts.items()])
        out.gauge("meshd_health_score", "Lifeguard local health (0 = healthy)",
                  node.awareness.score)
        out.gauge("meshd_broadcast_queue", "messages waiting to be gossiped", len(node.broadcasts))
        if self._udp is not None:
            u = self._udp.stats
            out.counter("meshd_udp_sent_packets_total", "UDP packets sent", u.sent)
            out.counter("meshd_udp_sent_bytes_total", "UDP bytes sent", u.sent_bytes)
            out.counter("meshd_udp_received_packets_total", "UDP packets received", u.received)
            out.counter("meshd_udp_received_bytes_total", "UDP bytes received", u.received_bytes)
            out.counter("meshd_udp_send_errors_total", "UDP send failures", u.send_errors)
        s, c = self.tcp_stats, self.client_stats
        out.counter("meshd_tcp_accepted_total", "peer exchanges served", s.accepted)
        out.counter("meshd_tcp_received_bytes_total", "peer TCP bytes received",
                    s.received_bytes + c.received_bytes)
        out.counter("meshd_tcp_sent_bytes_total", "peer TCP bytes sent",
                    s.sent_bytes + c.sent_bytes)
        out.counter("meshd_tcp_connects_total", "peer exchanges started", c.connects)
        out.counter("meshd_tcp_connect_errors_total", "peer exchanges failed", c.connect_errors)
        out.counter("meshd_transfer_sent_bytes_total", "release bytes sent to peers",
                    self.transfer.sent_bytes)
        out.counter("meshd_transfer_received_bytes_total", "release bytes received from peers",
                    self.transfer.received_bytes)
        out.counter("meshd_transfer_origin_bytes_total", "release bytes fetched from the origin",
                    self.transfer.origin_bytes)
        out.counter("meshd_runtime_errors_total", "core exceptions caught by the shell",
                    self.runtime.errors)
        out.counter("meshd_events_dropped_total", "events lost by slow subscribers",
                    self.runtime.events_dropped)
        out.gauge("meshd_event_subscribers", "open event streams", self.runtime.subscriber_count)
        out.core_counters(node.counters)
        self._collect_query_metrics(out)
        if self.dist is not None:
            out.core_counters({f"dist.{k}": v for k, v in self.dist.counters.items()})
            out.core_counters({f"dist.swarm.{k}": v for k, v in self.dist.fetch_counters().items()})
        mdns = getattr(self._discovery, "counters", None)
        if isinstance(mdns, dict):
            out.core_counters({f"mdns.{k}": v for k, v in mdns.items()})

    # --- start-up pieces -----------------------------------------------------------------------

    @property
    def _family(self) -> int:
        host, _ = self.cfg.bind_hostport
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    def _load_keyring(self) -> Keyring | None:
        if self.cfg.insecure:
            log.warning("running --insecure: gossip and peer traffic are NOT encrypted")
            return None
        path = self.data_dir / KEYRING_FILE
        if path.exists():
            ring = Keyring.load(path)
            if self.cfg.cluster_key_file:
                key = read_key_file(self.cfg.cluster_key_file)
                if key not in ring:
                    log.warning("--cluster-key-file %s is not in %s; the keyring file wins "
                                "(it carries rotations)", self.cfg.cluster_key_file, path)
            return ring
        if not self.cfg.cluster_key_file:
            raise ConfigError(
                "--cluster-key-file is required unless --insecure "
                "(create one with: meshd keygen cluster --out FILE)"
            )
        ring = Keyring([read_key_file(self.cfg.cluster_key_file)])
        ring.save(path)
        return ring

    def _save_keyring(self) -> None:
        if self.keyring is not None:
            try:
                self.keyring.save(self.data_dir / KEYRING_FILE)
            except OSError as e:
                log.error("cannot save keyring: %s", e)

    def _load_snapshot(self) -> None:
        path = self.data_dir / SNAPSHOT_FILE
        if not path.exists():
            return
        try:
            data = orjson.loads(path.read_bytes())
            peers = data.get("peers", [])
            self._start_incarnation = int(data.get("incarnation", 0)) + 1
            self._snapshot_peers = [
                str(p["addr"]) for p in peers if isinstance(p, dict) and "addr" in p
            ][:SNAPSHOT_MAX_PEERS]
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
            log.warning("ignoring unreadable peer snapshot %s: %s", path, e)

    def write_snapshot(self) -> None:
        if self._runtime is None:
            return
        node = self._runtime.node
        order = {MemberState.ALIVE: 0, MemberState.SUSPECT: 1, MemberState.DEAD: 2}
        peers = sorted(
            (m for m in node.members() if m.name != self.name and m.state in order),
            key=lambda m: (order[m.state], m.name),
        )[:SNAPSHOT_MAX_PEERS]
        doc = {
            "version": 1,
            "name": self.name,
            "node_id": self.node_id,
            "addr": self.addr,
            "incarnation": node.incarnation,
            "saved_at": time.time(),
            "peers": [
                {"name": m.name, "id": m.node_id, "addr": m.addr, "state": m.state.name.lower()}
                for m in peers
            ],
        }
        try:
            write_private(self.data_dir / SNAPSHOT_FILE, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        except OSError as e:
            log.error("cannot write peer snapshot: %s", e)

    async def _resolve_advertise(self, bind_host: str, port: int) -> tuple[str, str]:
        if self.cfg.advertise:
            host, aport = parse_hostport(self.cfg.advertise, "--advertise")
            resolved = await resolve_hostport(format_hostport(host, aport), self._family)
            if not resolved:
                raise ConfigError(f"--advertise {self.cfg.advertise}: cannot resolve {host}")
            return resolved[0], "configured (--advertise)"
        if not _is_wildcard(bind_host):
            return format_hostport(bind_host, port), "bind address"
        host, how = derive_advertise_host(bind_host)
        return format_hostport(host, port), how

    def _set_ready(self, detail: str) -> None:
        if not self._ready:
            log.info("ready: %s", detail)
        self._ready = True
        self._ready_detail = detail

    def _on_event(self, ev: MemberEvent) -> None:
        if ev.kind == "keyring":
            self._save_keyring()
            return
        self._snapshot_dirty.set()
        if (ev.kind in ("join", "alive") and ev.member.name != self.name
                and ev.member.state == MemberState.ALIVE):
            self._set_ready("joined")

    def _make_dist(self, codec: Codec) -> ReleaseService:
        cfg = self.cfg
        trusted = [load_publisher_public(path) for path in cfg.trust_publisher]
        if not trusted:
            log.warning("no --trust-publisher key: this node holds and serves releases but "
                        "installs none")
        return ReleaseService(
            self.data_dir, name=cfg.name, site=cfg.site, tags=cfg.tags, codec=codec,
            trusted=trusted, config=cfg.dist_config(), set_meta_keys=self.update_meta,
            emit=self._on_release_event, transfer=self.transfer,
        )

    # --- run -----------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.data_dir = prepare_data_dir(cfg.data_dir)
        identity = NodeIdentity.load_or_create(self.data_dir)
        self.node_id = identity.node_id
        self.keyring = self._load_keyring()
        self.api_token = load_or_create_token(self.data_dir)
        self._load_snapshot()
        health = HealthService.from_config(cfg)  # a bad [[check]] fails before any socket
        self.health = health

        bind_host, port = cfg.bind_hostport
        if cfg.insecure and not is_loopback_host(bind_host):  # validated already; belt and braces
            raise ConfigError("--insecure refuses to start unless bound to loopback")
        self.addr, self.addr_source = await self._resolve_advertise(bind_host, port)

        codec = Codec(cfg.cluster, self.keyring)
        node = Node(
            cfg.name, self.node_id, self.addr, cfg.protocol(), codec, random.Random(),
            loop.time(), meta=cfg.meta(), incarnation=self._start_incarnation,
        )
        runtime = NodeRuntime(node, peer_client=PeerClient(self.client_stats))
        self._runtime = runtime
        runtime.add_listener(self._on_event)
        health.attach(runtime)

        udp = UDPEndpoint(runtime.on_datagram)
        try:
            await udp.open(bind_host, port)
        except OSError as e:
            raise ConfigError(f"--bind {cfg.bind}: cannot bind UDP: {e.strerror or e}") from None
        self._udp = udp
        runtime.udp = udp
        peer_app = create_peer_app(runtime, self.tcp_stats)
        self.dist = self._make_dist(codec)
        self.dist.add_routes(peer_app)
        self._peer_server = PeerServer(peer_app)
        try:
            await self._peer_server.start(bind_host, port)
        except OSError as e:
            udp.close()
            raise ConfigError(f"--bind {cfg.bind}: cannot bind TCP: {e.strerror or e}") from None

        api_host, api_port = cfg.api_hostport
        if not is_loopback_host(api_host):
            log.warning("operator API on %s is reachable from the network; reads need no token",
                        cfg.api)
        api_app = create_api_app(self)
        add_release_routes(api_app, self.dist)
        self._api = ApiServer(api_app)
        try:
            await self._api.start(api_host, api_port)
        except OSError as e:
            raise ConfigError(f"--api {cfg.api}: cannot listen: {e.strerror or e}") from None
        bound = self._api.bound or (api_host, api_port)
        self.api_url = f"http://{format_hostport(str(bound[0]), int(bound[1]))}"

        runtime.start()
        # Listen first: a member announcing a release while the store recovers must not be
        # missed (events before start are recorded and acted on once it has started).
        runtime.add_listener(self.dist.handle_member_event)
        await self.dist.start(node.members())
        ring = (f"keyring of {len(self.keyring)} key(s), primary {fingerprint(self.keyring.primary)}"
                if self.keyring else "INSECURE (no encryption)")
        log.info("meshd %s node %s id %s cluster %s site %s", __version__, cfg.name,
                 self.node_id, cfg.cluster, cfg.site)
        log.info("gossip udp+tcp on %s, advertising %s (%s); api %s; %s; profile %s",
                 format_hostport(bind_host, port), self.addr, self.addr_source, self.api_url,
                 ring, cfg.profile)

        await health.start()  # every check ran once: the mesh learns a real summary on join
        seeds = list(cfg.join)
        snapshot = [a for a in self._snapshot_peers if a != self.addr]
        if seeds or snapshot:
            self._ready_detail = "joining"
            self._spawn(self._join_loop(seeds, snapshot))
        else:
            self._set_ready("alone by intent (no seeds, no peer snapshot)")
        self._spawn(self._snapshot_loop())
        if not cfg.advertise and _is_wildcard(bind_host):
            self._spawn(self._address_watch_loop(bind_host, port))
        await self._start_discovery()
        self._install_signals()
        sd_notify(f"READY=1\nSTATUS=node {cfg.name} at {self.addr}")
        self._spawn(self._watchdog_loop())

    async def run(self) -> int:
        """Start, serve until a signal or an API leave, then leave gracefully. Exit code."""
        try:
            await self.start()
        except BaseException:
            await self.shutdown(leave=False)
            raise
        await self._stop.wait()
        await self.shutdown(leave=self._leave_on_stop)
        return 0

    def stop(self, leave: bool = True, reason: str = "") -> None:
        if self._stop.is_set():
            return
        log.info("stopping%s%s", f" ({reason})" if reason else "",
                 ": leaving the mesh" if leave else "")
        self._leave_on_stop = leave
        self._stop.set()

    async def shutdown(self, leave: bool) -> None:
        if self._stopping:
            return
        self._stopping = True
        sd_notify("STOPPING=1")
        if leave and self._runtime is not None:
            await self._runtime.leave_and_wait(
                min(LEAVE_TIMEOUT, max(1.0, 10 * self._runtime.node.config.gossip_interval))
            )
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.close()
        if self.health is not None:
            await self.health.stop()
        self.write_snapshot()
        if self._api is not None:
            await self._api.stop()
        if self.dist is not None:
            await self.dist.stop()
        if self._peer_server is not None:
            await self._peer_server.stop()
        if self._udp is not None:
            self._udp.close()
        if self._runtime is not None:
            await self._runtime.close()
            log.info("stopped")

    # --- background work -----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    def _has_alive_peer(self) -> bool:
        return any(m.name != self.name and m.state == MemberState.ALIVE for m in self.members())

    async def _join_loop(self, seeds: list[str], snapshot: list[str]) -> None:
        """Join the seeds (re-resolved each try) and snapshot peers until one answers."""
        delay = 1.0
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            addrs: list[str] = []
            for seed in seeds:
                for a in await resolve_hostport(seed, self._family):
                    if a != self.addr and a not in addrs:
                        addrs.append(a)
            addrs.extend(a for a in snapshot if a not in addrs)
            if not addrs and attempt == 1 and seeds and not snapshot:
                # Every seed is this node (one seed list shared by all nodes): the first node.
                self._set_ready("alone by intent (the only seed is this node)")
                return
            joined = await self.runtime.join(addrs) if addrs else 0
            if joined or self._has_alive_peer():
                log.info("joined the mesh through %d of %d address(es)", joined, len(addrs))
                self._set_ready("joined")
                return
            log.warning("join attempt %d: none of %s answered; retrying in %.0fs",
                        attempt, ", ".join(addrs) or "(no address)", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, JOIN_BACKOFF_MAX)

    async def _address_watch_loop(self, bind_host: str, port: int) -> None:
        """Follow the network: a derived advertise address that changes is re-announced."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), ADDRESS_WATCH_INTERVAL)
            if self._stop.is_set():
                return
            await self.follow_address(*derive_advertise_host(bind_host), port)

    async def follow_address(self, host: str, how: str, port: int) -> None:
        new = format_hostport(host, port)
        if new == self.addr:
            return
        log.info("advertise address changed: %s -> %s (%s)", self.addr, new, how)
        self.addr, self.addr_source = new, how
        self.runtime.set_addr(new)
        readvertise = getattr(self._discovery, "readvertise", None)
        if readvertise is not None:
            await readvertise(new)

    async def _snapshot_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._snapshot_dirty.wait(), SNAPSHOT_INTERVAL)
            # Debounce: a burst of joins becomes one write.
            await asyncio.sleep(max(0.0, SNAPSHOT_DEBOUNCE - (loop.time() - last)))
            self._snapshot_dirty.clear()
            self.write_snapshot()
            last = loop.time()

    async def _watchdog_loop(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return
        interval = max(0.5, int(usec) / 2e6)
        while True:
            await asyncio.sleep(interval)
            sd_notify("WATCHDOG=1")

    async def _start_discovery(self) -> None:
        """Hook for mDNS: `meshd.discovery.start(daemon)` returns a handle with `async close()`.

        The discovery module reads name, node_id, cluster, site, addr and cfg.mdns_interfaces
        from the daemon and calls `await daemon.join([addr])` for same-cluster peers it finds.
        """
        if not self.cfg.mdns:
            return
        try:
            module = importlib.import_module("meshd.discovery")
        except ModuleNotFoundError as e:
            if e.name != "meshd.discovery":
                raise
            log.warning("mDNS discovery is not available in this build; use --join seeds")
            return
        self._discovery = await module.start(self)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        self.stop(True, sig.name)

    def _on_hup(self) -> None:
        if self._reload is None:
            log.info("SIGHUP: nothing to reload")
            return
        try:
            new = self._reload()
        except ConfigError as e:
            log.error("SIGHUP: configuration not reloaded: %s", e)
            return
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        logging.getLogger().setLevel(new.log_level.upper())
        self.cfg.log_level = new.log_level
        log.info("SIGHUP: log level is %s; other settings take effect on restart", new.log_level)
        sd_notify("READY=1")


def run_daemon(cfg: NodeConfig, reload: Callable[[], NodeConfig] | None = None) -> int:
    """Run a node under uvloop until it stops; returns the exit code."""
    import uvloop

    setup_logging(cfg.log_level)
    daemon = Daemon(cfg, reload)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(daemon.run())
