"""The composition root: config -> identity, keyring, sockets, core, API -> run -> graceful leave.

The daemon wires the shell modules (net/, api/, discovery, state files, netaddr, systemd) around
the core, which only sees `now`, bytes and an RNG. It is also the API's `Agent` and discovery's
`DiscoveryHost`. Shutdown is a graceful leave, then start() undone in reverse (an AsyncExitStack).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from meshd import PROTOCOL_VERSION, __version__, discovery, state
from meshd.allocator import keep_large_buffers
from meshd.api.app import ApiServer, create_api_app
from meshd.api.openapi import add_openapi_route
from meshd.config import NodeConfig, discovery_config
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.node import MemberEvent, MemberView, Node
from meshd.core.query import QueryEngine, QueryResult, default_timeout
from meshd.crypto import Keyring, NodeIdentity, fingerprint, load_publisher_public
from meshd.discovery import DaemonDiscovery
from meshd.errors import ConfigError, StateError
from meshd.health.service import HealthService, parse_health_config
from meshd.health.summary import summarize as summarize_health
from meshd.live_stats import STATS_INTERVAL, RttWindow, stats_payload
from meshd.logs import setup_logging
from meshd.metrics import Exposition, MetricsSource, TransferStats, daemon_registry
from meshd.net.peer_auth import PeerGate
from meshd.net.peer_http import PeerClient, PeerServer, PeerTraffic, create_peer_app
from meshd.net.udp import UDPEndpoint
from meshd.netaddr import derive_advertise_host, is_wildcard, resolve_hostport
from meshd.registry.api import add_image_routes
from meshd.registry.catalog import HeldRelease, ReleaseImages
from meshd.registry.peer_blobs import add_blob_routes
from meshd.registry.pullthrough import BlobCache, PullThrough
from meshd.registry.server import Registry, RegistryServer
from meshd.registry.site_cache import SiteMember
from meshd.release.api import add_release_routes
from meshd.release.service import ReleaseService
from meshd.reload import ReloadCounts, ReloadPlan, effective_config, plan_reload
from meshd.replay import ReplayGuard, SenderClock
from meshd.runtime import NodeEvent, NodeRuntime, Subscription
from meshd.systemd import reloading_message, sd_notify, watchdog_loop
from meshd.units import format_hostport, is_loopback_host, parse_hostport
from meshd.wire import Codec

log = logging.getLogger("meshd")

SNAPSHOT_INTERVAL = 30.0
ADDRESS_WATCH_INTERVAL = 10.0  # how often a derived advertise address is checked
SNAPSHOT_DEBOUNCE = 1.0
LEAVE_TIMEOUT = 3.0  # Serf's graceful timeout
JOIN_BACKOFF_MAX = 30.0


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
        self.peer_traffic = PeerTraffic()
        # Private: several daemons share a process in the tests (never prometheus' global one).
        self.metrics_registry, self.histograms = daemon_registry(self._collect_sources)
        self._rtt_window = RttWindow()  # probe round trips for the next `stats` event
        self._udp: UDPEndpoint | None = None
        self.data_dir = Path(cfg.data_dir)
        self.keyring: Keyring | None = None
        self.api_url = ""
        self.registry_url = ""  # --registry's bound address, once started
        self.registry: Registry | None = None
        self.images: ReleaseImages | None = None
        self.pull: PullThrough | None = None  # --registry-upstream's site cache
        self._started = time.monotonic()
        self._ready = False
        self._ready_detail = "starting"
        self._stop = asyncio.Event()
        self._leave_on_stop = True
        self._stopping = False
        self._snapshot_dirty = asyncio.Event()
        # What the snapshot records of each member: a metadata-only update (a release's
        # progress, every second while fetching) changes none of it and costs no write.
        self._snapshot_seen: dict[str, tuple[str, str, MemberState]] = {}
        self._exit = contextlib.AsyncExitStack()  # what start() did, undone in reverse by shutdown()
        self._reload_counts = ReloadCounts()  # meshd_config_reloads_total
        self._metrics: list[MetricsSource] = [self.peer_traffic, self.transfer, self._reload_counts]
        self._discovery: DaemonDiscovery | None = None
        self._runtime: NodeRuntime | None = None
        self._snapshot = state.PeerSnapshot()
        self._codec: Codec | None = None
        self._core_keeper = state.CoreStateKeeper(self.data_dir, state.CoreState())
        self._queries: QueryEngine | None = None  # its clock and ring are persisted
        self.release: ReleaseService | None = None
        self.health: HealthService | None = None  # checks, health meta and query answers
        self._reload_lock = asyncio.Lock()  # one reload at a time (SIGHUP and the API)
        self._reloads_running: set[asyncio.Task[dict[str, Any]]] = set()

    # --- Agent protocol (used by the API) and DiscoveryHost (used by mDNS discovery) ------------

    @property
    def runtime(self) -> NodeRuntime:
        assert self._runtime is not None, "daemon not started"
        return self._runtime

    @property
    def mdns_interfaces(self) -> list[str]:
        return self.cfg.mdns_interfaces

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def is_ready(self) -> bool:
        return self._ready

    def readiness_detail(self) -> str:
        return self._ready_detail

    def clock_skew(self) -> dict[str, Any]:
        return self.runtime.node.clock_skew()

    def members(self) -> list[MemberView]:
        return self.runtime.node.members()

    def subscribe(self) -> Subscription:
        return self.runtime.subscribe()

    def _merged_meta(self, updates: Mapping[str, str | None]) -> dict[str, str]:
        """This node's gossiped metadata with `updates` merged in (None deletes a key)."""
        meta = dict(self.runtime.node.meta)
        for k, v in updates.items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
        return meta

    def update_meta(self, updates: dict[str, str | None]) -> None:
        """Merge keys into this node's gossiped metadata (None deletes a key)."""
        try:
            self.runtime.set_meta(self._merged_meta(updates))
        except StateError as e:  # peers would drop it: keep what they can read, say why
            log.error("metadata not updated: %s", e)

    def _on_release_event(self, payload: dict[str, Any]) -> None:
        self.runtime.publish(NodeEvent("release", None, payload))

    async def run_query(
        self,
        name: str,
        payload: bytes,
        filters: QueryFilter,
        timeout: float | None,
        relay_factor: int,
        aggregate: str = "",
    ) -> QueryResult:
        """A gossip query for the API (/v1/health, /v1/query); Serf's default timeout.
        `aggregate="site"`: one summary per site (/v1/health?summary=site)."""
        node = self.runtime.node
        if timeout is None:
            timeout = default_timeout(node.config.gossip_interval, node.num_active())
        started = self.runtime.now()
        result = await self.runtime.ask(name, payload, filters, timeout, relay_factor, aggregate)
        self.histograms.query.observe(self.runtime.now() - started)
        return result

    async def join(self, addrs: list[str], timeout: float | None = None) -> int:
        resolved: list[str] = []
        for a in addrs:
            resolved.extend(await resolve_hostport(a, self._family))
        joined = await self.runtime.join(resolved, timeout)
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
        state.save_keyring(self.data_dir, ring)
        log.info("keyring: %s %s (primary now %s)", op, fingerprint(key), fingerprint(ring.primary))

    def collect_metrics(self, out: Exposition) -> None:
        """Everything on this daemon's registry: its components, histograms, process metrics."""
        out.extend(self.metrics_registry.collect())

    def _collect_sources(self, out: Exposition) -> None:
        out.gauge("meshd_build_info", "meshd version", 1, version=__version__, protocol=str(PROTOCOL_VERSION))
        out.gauge("meshd_uptime_seconds", "seconds since start", self.uptime())
        out.gauge("meshd_ready", "1 once joined or alone by intent", int(self._ready))
        for source in self._metrics:  # each component reports its own
            source.collect_metrics(out)

    # --- start-up pieces -----------------------------------------------------------------------

    @property
    def _family(self) -> int:
        host, _ = self.cfg.bind_hostport
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    def write_snapshot(self) -> None:
        if self._runtime is None:
            return
        node = self._runtime.node
        state.write_snapshot(
            self.data_dir, self.name, self.node_id, self.addr, node.incarnation, node.members()
        )
        codec = self._codec
        if codec is not None:
            marks = codec.guard.export() if codec.guard else {}
            state.write_replay_state(self.data_dir, codec.clock.last, marks)

    def _persist_core(self, node: Node) -> None:
        """Before a core call's effects go out: its incarnation and KeyOp ids are on disk."""
        if not self._core_keeper.behind(node.incarnation, node.last_keyop):
            return  # the usual case, after every datagram: no copy, no write
        keyops = node.seen_keyops()
        if self._core_keeper.keyops_changed(keyops):
            state.save_keyring(self.data_dir, self.keyring)  # the key change first, then its id
        self._core_keeper.sync(node.incarnation, keyops)

    def write_query_state(self) -> None:
        if self._queries is not None:
            state.write_query_state(self.data_dir, self._queries.export_state())

    async def _resolve_advertise(self, bind_host: str, port: int) -> tuple[str, str]:
        if self.cfg.advertise:
            host, aport = parse_hostport(self.cfg.advertise, "--advertise")
            resolved = await resolve_hostport(format_hostport(host, aport), self._family)
            if not resolved:
                raise ConfigError(f"--advertise {self.cfg.advertise}: cannot resolve {host}")
            return resolved[0], "configured (--advertise)"
        if not is_wildcard(bind_host):
            return format_hostport(bind_host, port), "bind address"
        host, how = derive_advertise_host()
        return format_hostport(host, port), how

    def _restore_queries(self, node: Node) -> None:
        # The query clock and ring of the last run: our queries are not "too old" for the mesh,
        # and a query replayed at us after the restart is still a duplicate.
        self._queries = node.queries
        saved = state.read_query_state(self.data_dir)
        if saved is not None:
            node.queries.restore(saved)

    def _set_ready(self, detail: str) -> None:
        if not self._ready:
            log.info("ready: %s", detail)
        self._ready = True
        self._ready_detail = detail

    def _on_event(self, ev: MemberEvent) -> None:
        if ev.kind == "keyring":
            state.save_keyring(self.data_dir, self.keyring)
            return
        m = ev.member
        # Suspicion comes and goes (a busy node answers a probe late, a datagram is lost) and a
        # suspect is still a member: only alive/dead/left are worth a write (three fsyncs) at
        # once; the periodic write still records the suspicion.
        kept = MemberState.ALIVE if m.state == MemberState.SUSPECT else m.state
        seen = (m.node_id, m.addr, kept)
        if self._snapshot_seen.get(m.name) != seen:
            self._snapshot_seen[m.name] = seen
            self._snapshot_dirty.set()
        if ev.kind == "reap":
            self._snapshot_seen.pop(m.name, None)
            self._snapshot_dirty.set()
        if (
            ev.kind in ("join", "alive")
            and ev.member.name != self.name
            and ev.member.state == MemberState.ALIVE
        ):
            self._set_ready("joined")

    def _make_release_service(self, codec: Codec) -> ReleaseService:
        cfg = self.cfg
        trusted = [load_publisher_public(path) for path in cfg.trust_publisher]
        if not trusted:
            log.warning("no --trust-publisher key: this node holds and serves releases but installs none")
        return ReleaseService(
            self.data_dir,
            name=cfg.name,
            site=cfg.site,
            tags=cfg.tags,
            codec=codec,
            trusted=trusted,
            config=cfg.dist_config(),
            set_meta_keys=self.update_meta,
            emit=self._on_release_event,
            transfer=self.transfer,
            histograms=self.histograms,
        )

    # --- run -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the node up; each step that needs undoing pushes its undo on `self._exit`."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.data_dir = state.prepare_data_dir(cfg.data_dir)
        identity = NodeIdentity.load_or_create(self.data_dir)
        self.node_id = identity.node_id
        self.keyring = state.load_keyring(self.data_dir, cfg.insecure, cfg.cluster_key_file)
        self.api_token = state.load_or_create_token(self.data_dir)
        self._snapshot = state.read_snapshot(self.data_dir)
        core_state = state.read_core_state(self.data_dir)
        self._core_keeper = state.CoreStateKeeper(self.data_dir, core_state)
        health = HealthService.from_config(cfg)  # a bad [[check]] fails before any socket
        self.health = health

        bind_host, port = cfg.bind_hostport
        if cfg.insecure and not is_loopback_host(bind_host):  # validated already; belt and braces
            raise ConfigError("--insecure refuses to start unless bound to loopback")
        self.addr, self.addr_source = await self._resolve_advertise(bind_host, port)

        replay = state.read_replay_state(self.data_dir)
        guard = ReplayGuard()
        guard.restore(replay.marks)
        codec = Codec(
            cfg.cluster,
            self.keyring,
            node_id=self.node_id,
            clock=SenderClock(floor=replay.clock_floor),
            guard=guard,
        )
        self._codec = codec
        node = Node(
            cfg.name,
            self.node_id,
            self.addr,
            cfg.protocol(),
            codec,
            random.Random(),
            loop.time(),
            meta=cfg.meta(),
            incarnation=max(self._snapshot.start_incarnation, core_state.start_incarnation),
            seen_keyops=core_state.keyops,
            reducer=summarize_health,  # an aggregator sums up its site's health answers
        )
        self._restore_queries(node)
        runtime = NodeRuntime(node, peer_client=PeerClient(codec, self.peer_traffic.started))
        runtime.before_effects = functools.partial(self._persist_core, node)
        runtime.on_probe_rtt = self._on_probe_rtt
        self._runtime = runtime
        self._metrics += [runtime, health]
        self._exit.push_async_callback(self._close_runtime)
        runtime.add_listener(self._on_event)
        health.attach(runtime)

        udp = UDPEndpoint(runtime.on_datagram)
        try:
            await udp.open(bind_host, port)
        except OSError as e:
            raise ConfigError(f"--bind {cfg.bind}: cannot bind UDP: {e.strerror or e}") from None
        self._exit.callback(udp.close)
        self._metrics.insert(0, udp)
        runtime.udp = udp
        self._udp = udp
        gate = PeerGate(codec, stats=self.peer_traffic.gate)
        peer_app = create_peer_app(runtime, gate, self.peer_traffic.served)
        self.release = self._make_release_service(codec)
        self.release.add_routes(peer_app)
        if cfg.registry and cfg.registry_upstream:
            self.pull = self._make_pull_through(codec, self.release.server.upload_permit)
            add_blob_routes(peer_app, self.pull)
        self._metrics.append(self.release)
        peer_server = PeerServer(peer_app, stats=self.peer_traffic.guard)
        try:
            await peer_server.start(bind_host, port)
        except OSError as e:
            raise ConfigError(f"--bind {cfg.bind}: cannot bind TCP: {e.strerror or e}") from None
        self._exit.push_async_callback(peer_server.stop)

        api_host, api_port = cfg.api_hostport
        if not is_loopback_host(api_host):
            log.warning("operator API on %s is reachable from the network; reads need no token", cfg.api)
        api_app = create_api_app(self, cfg.allowed_api_hosts())
        add_release_routes(api_app, self.release)
        release = self.release
        images = self.images = ReleaseImages(
            lambda: [HeldRelease(m, p) for m, p in release.installed_releases()]
        )
        add_image_routes(api_app, images, self.pull)
        add_openapi_route(api_app)  # last: it describes the routes above
        api = ApiServer(api_app)
        try:
            await api.start(api_host, api_port)
        except OSError as e:
            raise ConfigError(f"--api {cfg.api}: cannot listen: {e.strerror or e}") from None
        self._exit.push_async_callback(api.stop)
        bound = api.bound or (api_host, api_port)
        self.api_url = f"http://{format_hostport(str(bound[0]), int(bound[1]))}"
        await self._start_registry(cfg)

        runtime.start()
        # Listen first: a member announcing a release while the store recovers must not be
        # missed (events before start are recorded and acted on once it has started).
        runtime.add_listener(self.release.handle_member_event)
        self._exit.push_async_callback(self.release.stop)  # safe on a half-started service
        await self.release.start(node.members())
        self._exit.callback(self.write_snapshot)  # the last membership of this run, loops stopped
        self._exit.callback(self.write_query_state)
        ring = (
            f"keyring of {len(self.keyring)} key(s), primary {fingerprint(self.keyring.primary)}"
            if self.keyring
            else "INSECURE (no encryption)"
        )
        log.info(
            "meshd %s node %s id %s cluster %s site %s",
            __version__,
            cfg.name,
            self.node_id,
            cfg.cluster,
            cfg.site,
        )
        log.info(
            "gossip udp+tcp on %s, advertising %s (%s); api %s; %s; profile %s",
            format_hostport(bind_host, port),
            self.addr,
            self.addr_source,
            self.api_url,
            ring,
            cfg.profile,
        )

        self._exit.push_async_callback(health.stop)
        await health.start()  # every check ran once: the mesh learns a real summary on join
        seeds = list(cfg.join)
        snapshot = [a for a in self._snapshot.peers if a != self.addr]
        if seeds or snapshot:
            self._ready_detail = "joining"
            self._spawn(self._join_loop(seeds, snapshot))
        else:
            self._set_ready("alone by intent (no seeds, no peer snapshot)")
        self._spawn(self._snapshot_loop())
        self._spawn(self._stats_loop())
        if not cfg.advertise and is_wildcard(bind_host):
            self._spawn(self._address_watch_loop(port))
        if cfg.mdns:
            self._discovery = await discovery.start(self, discovery_config(cfg))
            self._exit.push_async_callback(self._close_discovery)
            self._metrics.append(self._discovery)
        self._install_signals()  # not undone: a second signal during shutdown still exits at once
        sd_notify(f"READY=1\nSTATUS=node {cfg.name} at {self.addr}")
        self._spawn(watchdog_loop())

    async def _start_registry(self, cfg: NodeConfig) -> None:
        """The OCI registry read endpoint (--registry), off by default."""
        where = cfg.registry_hostport
        if where is None:
            return
        assert self.images is not None
        if self.pull is not None:
            self.pull.start()
            self._exit.push_async_callback(self.pull.close)
            self._metrics.append(self.pull)
        registry = self.registry = Registry(self.images, pull=self.pull)
        server = RegistryServer(registry)
        try:
            await server.start(*where)
        except OSError as e:
            raise ConfigError(f"--registry {cfg.registry}: cannot listen: {e.strerror or e}") from None
        self._exit.push_async_callback(server.stop)
        self._metrics.append(registry)
        bound = server.bound or where
        self.registry_url = f"http://{format_hostport(str(bound[0]), int(bound[1]))}"
        log.info("OCI registry (read-only mirror of image releases) on %s", self.registry_url)
        if self.pull is not None:
            log.info(
                "registry pull-through from %s, site cache of %d bytes at most%s",
                ", ".join(cfg.registry_upstream),
                cfg.registry_cache_max,
                "; unsigned tags passed through" if cfg.registry_pass_tags else "",
            )

    def _make_pull_through(self, codec: Codec, pace: Callable[[int], Awaitable[None]]) -> PullThrough:
        cfg = self.cfg
        cache = BlobCache(self.data_dir / "registry", cfg.registry_cache_max)
        return PullThrough(
            cache,
            me=cfg.name,
            codec=codec,
            upstreams=cfg.registry_upstream,
            pass_tags=cfg.registry_pass_tags,
            site_members=self._site_members,
            set_meta_keys=self.update_meta,
            pace=pace,
        )

    def _site_members(self) -> list[SiteMember]:
        """The other members of this node's site, as the pull-through plans with them."""
        return [
            SiteMember.from_meta(m.name, m.addr, m.node_id, m.state == MemberState.ALIVE, m.meta or {})
            for m in self.runtime.node.members()
            if m.name != self.name and (m.meta or {}).get("site", "default") == self.site
        ]

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
        log.info("stopping%s%s", f" ({reason})" if reason else "", ": leaving the mesh" if leave else "")
        self._leave_on_stop = leave
        self._stop.set()

    async def shutdown(self, leave: bool) -> None:
        """Leave gracefully while everything still runs, then undo start() in reverse."""
        if self._stopping:
            return
        self._stopping = True
        sd_notify("STOPPING=1")
        if leave and self._runtime is not None:
            await self._runtime.leave_and_wait(
                min(LEAVE_TIMEOUT, max(1.0, 10 * self._runtime.node.config.gossip_interval))
            )
        await self._exit.aclose()

    async def _close_runtime(self) -> None:
        await self.runtime.close()
        log.info("stopped")

    async def _close_discovery(self) -> None:
        if self._discovery is not None:
            with contextlib.suppress(Exception):  # goodbyes are best effort
                await self._discovery.close()

    # --- background work -----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._exit.push_async_callback(_cancel, task)

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
            log.warning(
                "join attempt %d: none of %s answered; retrying in %.0fs",
                attempt,
                ", ".join(addrs) or "(no address)",
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, JOIN_BACKOFF_MAX)

    async def _address_watch_loop(self, port: int) -> None:
        """Follow the network: a derived advertise address that changes is re-announced."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), ADDRESS_WATCH_INTERVAL)
            if self._stop.is_set():
                return
            await self.follow_address(*derive_advertise_host(), port)

    async def follow_address(self, host: str, how: str, port: int) -> None:
        new = format_hostport(host, port)
        if new == self.addr:
            return
        log.info("advertise address changed: %s -> %s (%s)", self.addr, new, how)
        self.addr, self.addr_source = new, how
        self.runtime.set_addr(new)
        if self._discovery is not None:
            await self._discovery.readvertise(new)

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
            self.write_query_state()
            last = loop.time()

    def _on_probe_rtt(self, path: str, seconds: float) -> None:
        self.histograms.probe_rtt.labels(path=path).observe(seconds)
        self._rtt_window.add(seconds)

    def stats(self) -> dict[str, Any]:
        """The payload of a `stats` event (meshd.live_stats); starts a new RTT window."""
        udp = self._udp.stats if self._udp is not None else None
        return stats_payload(
            self.runtime.now(),
            gossip_in_bytes=udp.received_bytes if udp else 0,
            gossip_out_bytes=udp.sent_bytes if udp else 0,
            transfer=self.transfer,
            probe_rtt_ms=self._rtt_window.take_mean_ms(),
            members=self.members(),
        )

    async def _stats_loop(self) -> None:
        """The dashboard's live charts: a `stats` event on the event stream every interval."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), STATS_INTERVAL)
            if self._stop.is_set():
                return
            self.runtime.publish(NodeEvent("stats", None, self.stats()))

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
        task = asyncio.get_running_loop().create_task(self.reload_config("SIGHUP"))
        self._reloads_running.add(task)  # a reference, so the task is not collected mid-way
        task.add_done_callback(self._reloads_running.discard)

    async def reload(self) -> dict[str, Any]:
        """POST /v1/reload: the same as SIGHUP."""
        return await self.reload_config("reload")

    async def reload_config(self, via: str) -> dict[str, Any]:
        """Re-read the configuration and apply what can change while running (meshd.reload).

        All or nothing: the new files are read and every part is parsed (checks, publisher keys)
        before anything is applied, so a bad file leaves the node as it was. The outcome goes to
        the log, the event stream (kind "reload") and meshd_config_reloads_total.
        """
        async with self._reload_lock:
            # systemd hears of every reload, a refused one too (Type=notify-reload waits for both).
            sd_notify(reloading_message())
            try:
                plan = await self._reload_once()
            except (ConfigError, StateError) as e:
                log.error("%s: configuration not reloaded, the node keeps its settings: %s", via, e)
                return self._reloaded(False, ReloadPlan(), str(e))
            finally:
                sd_notify("READY=1")
            if plan.restart_needed:
                log.warning("%s: %s changed; restart to apply", via, ", ".join(plan.restart_needed))
            log.info(
                "%s: configuration reloaded; applied: %s", via, ", ".join(plan.applied) or "nothing changed"
            )
            return self._reloaded(True, plan, None)

    async def _reload_once(self) -> ReloadPlan:
        if self._reload is None:
            raise ConfigError("no configuration to reload (the node was not started by `meshd run`)")
        new = self._reload()
        old = self.cfg
        plan = plan_reload(old, new)
        # Everything that can fail, before anything is applied. data_dir is the running one.
        checks, handlers = parse_health_config(new.checks, new.query_handlers, old.data_dir)
        trusted = [load_publisher_public(path) for path in new.trust_publisher]
        dist = new.dist_config()
        if plan.applies("tags"):  # the one step that may be refused (metadata over the limit)
            self._set_tags(old.tags, new.tags)
        if plan.applies("log_level") or plan.applies("log_format"):
            setup_logging(new.log_level, new.log_format)
        if self.health is not None and (plan.applies("checks") or plan.applies("query_handlers")):
            await self.health.reconfigure(checks, handlers)
        if self.release is not None:
            self.release.reconfigure(
                trusted=trusted, tags=new.tags, upload_rate=dist.upload_rate, download_rate=dist.download_rate
            )
        self.cfg = effective_config(old, new, plan)
        return plan

    def _set_tags(self, old: dict[str, str], new: dict[str, str]) -> None:
        """Re-announce the tags (StateError when peers would drop the metadata: nothing changes)."""
        updates: dict[str, str | None] = {f"tag:{k}": None for k in old}
        updates.update({f"tag:{k}": v for k, v in new.items()})
        self.runtime.set_meta(self._merged_meta(updates))

    def _reloaded(self, ok: bool, plan: ReloadPlan, error: str | None) -> dict[str, Any]:
        self._reload_counts.count(ok)
        outcome = {
            "ok": ok,
            "applied": list(plan.applied),
            "restart_needed": list(plan.restart_needed),
            "error": error,
        }
        if self._runtime is not None:
            self._runtime.publish(NodeEvent("reload", None, outcome))
        return outcome


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def run_daemon(cfg: NodeConfig, reload: Callable[[], NodeConfig] | None = None) -> int:
    """Run a node under uvloop until it stops; returns the exit code."""
    import uvloop

    setup_logging(cfg.log_level, cfg.log_format)
    keep_large_buffers()
    daemon = Daemon(cfg, reload)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(daemon.run())
