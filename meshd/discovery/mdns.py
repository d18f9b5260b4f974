"""mDNS discovery: advertise this node as `_meshd._udp.local.` and offer same-cluster peers.

Shell code (asyncio + python-zeroconf). It only finds candidates; joining them, and retrying per
address, is the daemon's job (joiner.py, dialer.py). A peer is offered once when it appears and
again only when its address changes. Offers are literal IP:port from the A records of the offer
(never a host name to resolve); anything else is counted as malformed. The service table is
capped: anyone on the site network can announce names.

When `interfaces` is given, mDNS is confined to them: multicast goes out only through those
interfaces, the listening socket ignores groups joined elsewhere, and unicast replies to addresses
outside their subnets are dropped (see `_ConfinedZeroconf`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    DNSOutgoing,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshd import PROTOCOL_VERSION
from meshd.core.counters import Counters
from meshd.discovery.dialer import parse_ip_port
from meshd.errors import ConfigError
from meshd.units import format_hostport

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshd._udp.local."
RESOLVE_TIMEOUT_MS = 3000
# Resolution after a lost packet: the browser would not ask again before the PTR refresh (minutes).
RESOLVE_RETRIES = (1.0, 2.0, 4.0)
MAX_SERVICES = 256  # same-cluster services tracked (resolved or resolving); more are counted
MAX_LABEL = 63
# Linux: deliver only the multicast groups joined on this very socket (not on other interfaces).
_IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)

PeerCallback = Callable[[str, str, dict[str, str]], None]
GoneCallback = Callable[[str], None]


@dataclass
class PeerRecord:
    """A resolved same-cluster service."""

    name: str
    addr: str
    txt: dict[str, str]


def interface_networks(interfaces: list[str]) -> list[ipaddress.IPv4Network]:
    """Subnets of the local IPv4 interfaces holding these addresses (/32 when not found)."""
    prefixes: dict[str, int] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                prefixes[ip.ip] = ip.network_prefix
    nets = []
    for addr in interfaces:
        prefix = prefixes.get(addr, 32)
        nets.append(ipaddress.IPv4Network(f"{addr}/{prefix}", strict=False))
    return nets


class _ConfinedZeroconf(Zeroconf):
    """Zeroconf that never sends a unicast reply outside the chosen interfaces' subnets.

    zeroconf answers unicast queries through the wildcard listening socket, whose route may be a
    real interface; confining the multicast interfaces alone does not cover that path.
    """

    def __init__(self, interfaces: list[str], on_drop: Callable[[], None]) -> None:
        self._allowed = interface_networks(interfaces)
        self._on_drop = on_drop
        super().__init__(interfaces=interfaces, ip_version=IPVersion.V4Only)
        listen = getattr(self.engine, "_listen_socket", None)
        if listen is not None and sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):
                listen.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)

    def async_send(
        self,
        out: DNSOutgoing,
        addr: str | None = None,
        port: int = 5353,
        v6_flow_scope: tuple[()] | tuple[int, int] = (),
        transport: Any = None,
    ) -> None:
        if addr is not None and not self._allowed_addr(addr):
            self._on_drop()
            return
        super().async_send(out, addr, port, v6_flow_scope, transport)

    def _allowed_addr(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self._allowed)


def _host_label(name: str, node_id: str) -> str:
    # The SRV target must be a unique, DNS-safe host name even if node names are not.
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "node"
    suffix = re.sub(r"[^a-z0-9]", "", node_id.lower())[:8] or "0"
    return f"{base[: MAX_LABEL - len(suffix) - 1]}-{suffix}"


def valid_instance_name(name: str) -> bool:
    """Whether a node name can be the mDNS instance name as is (1-63 bytes, no dot)."""
    return bool(name) and len(name.encode()) <= MAX_LABEL and "." not in name


def _check_ipv4(addrs: list[str]) -> None:
    for addr in addrs:
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise ConfigError(f"mDNS address {addr!r} is not an IPv4 address") from None


def _decode_txt(props: dict[bytes, bytes | None]) -> dict[str, str]:
    txt = {}
    for key, value in props.items():
        txt[key.decode("utf-8", "replace").lower()] = (
            "" if value is None else value.decode("utf-8", "replace")
        )
    return txt


class Discovery:
    """Advertise this node over mDNS and report same-cluster peers to `on_peer(name, addr, txt)`."""

    def __init__(
        self,
        name: str,
        node_id: str,
        cluster: str,
        site: str,
        port: int,
        addresses: list[str],
        interfaces: list[str] | None,
        on_peer: PeerCallback,
        on_gone: GoneCallback | None = None,
        *,
        max_services: int = MAX_SERVICES,
    ) -> None:
        if not valid_instance_name(name):
            raise ConfigError(f"node name {name!r}: mDNS needs 1-63 bytes without dots")
        _check_ipv4([*addresses, *(interfaces or [])])
        self.name = name
        self.node_id = node_id
        self.cluster = cluster
        self.site = site
        self.port = port
        self.addresses = list(addresses)
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.on_peer = on_peer
        self.on_gone = on_gone
        self.max_services = max_services
        self.peers: dict[str, PeerRecord] = {}
        self.counters = Counters(
            dict.fromkeys(
                (
                    "discovered",
                    "ignored_cluster",
                    "ignored_self",
                    "ignored_malformed",
                    "offers",
                    "removed",
                    "resolve_failed",
                    "name_conflicts",
                    "unicast_dropped",
                    "table_full",
                ),
                0,
            )
        )
        self.advertising = False
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._seen_cluster_other: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- counters the daemon exports -------------------------------------------------------

    @property
    def discovered(self) -> int:
        """Distinct same-cluster peers seen so far."""
        return self.counters["discovered"]

    @property
    def ignored(self) -> int:
        """Distinct services of another cluster seen so far."""
        return self.counters["ignored_cluster"]

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the mDNS sockets, advertise this node and browse for peers."""
        self._loop = asyncio.get_running_loop()
        if self.interfaces is not None:
            local = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips}
            missing = [i for i in self.interfaces if i not in local]
            if missing:
                # Not fatal: at boot an address may come later; zeroconf skips what it cannot bind.
                log.warning("mDNS: no local interface has %s; mDNS is silent there", ", ".join(missing))
            zc: Zeroconf = _ConfinedZeroconf(self.interfaces, self._count_unicast_drop)
        else:
            zc = Zeroconf(ip_version=IPVersion.V4Only)
        self._aiozc = AsyncZeroconf(zc=zc)
        try:
            self._browser = AsyncServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_service_state_change])
            if self.addresses:
                await self._register()
        except BaseException:
            await self.stop()
            raise

    async def close(self) -> None:
        """Alias of stop()."""
        await self.stop()

    async def update(self, addresses: list[str] | None = None, site: str | None = None) -> None:
        """Re-announce after an address or site change."""
        if self._aiozc is None:
            raise RuntimeError("Discovery.update() before start()")
        if addresses is not None:
            _check_ipv4(addresses)
        readvertise = addresses is not None and sorted(addresses) != sorted(self.addresses)
        if addresses is not None:
            self.addresses = list(addresses)
        if site is not None:
            self.site = site
        if not self.addresses:
            if self.advertising and self._info is not None:
                await (await self._aiozc.async_unregister_service(self._info))
                self.advertising = False
        elif self._info is None or not self.advertising:
            await self._register()
        elif readvertise:
            # A goodbye first, so peers drop the old A records instead of caching both for minutes.
            await (await self._aiozc.async_unregister_service(self._info))
            self.advertising = False
            await self._register()
        else:
            self._info = self._build_info()
            await (await self._aiozc.async_update_service(self._info))

    async def stop(self) -> None:
        """Send goodbyes and close the sockets."""
        for task in list(self._resolving.values()):
            task.cancel()
        for task in list(self._resolving.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._resolving.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._aiozc is not None:
            await self._aiozc.async_close()  # unregisters (goodbye) first
            self._aiozc = None
        self.advertising = False

    # ---- internals ---------------------------------------------------------------------------

    def _count_unicast_drop(self) -> None:
        self.counters["unicast_dropped"] += 1

    def _build_info(self) -> AsyncServiceInfo:
        host = _host_label(self.name, self.node_id)
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            port=self.port,
            properties={
                "id": self.node_id,
                "cluster": self.cluster,
                "site": self.site,
                "v": str(PROTOCOL_VERSION),
            },
            server=f"{host}.local.",
            addresses=[socket.inet_aton(a) for a in self.addresses],
        )

    async def _register(self) -> None:
        assert self._aiozc is not None
        self._info = self._build_info()
        # No RFC 6762 probing (zeroconf spends ~1.2 s on it before answering anything): node names
        # are unique by contract, and a clash is still noticed when browsing (see _resolved).
        try:
            await (await self._aiozc.async_register_service(self._info, cooperating_responders=True))
        except NonUniqueNameException:
            self.counters["name_conflicts"] += 1
            log.error("mDNS: name %r is taken by another node; not advertising", self.name)
            return
        self.advertising = True
        log.info("mDNS: advertising %s on %s port %d", self.name, ",".join(self.addresses), self.port)

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        instance = name[: -len(service_type) - 1] if name.endswith("." + service_type) else name
        if state_change is ServiceStateChange.Removed:
            self._dirty.discard(instance)
            task = self._resolving.pop(instance, None)
            if task is not None:
                task.cancel()
            if self.peers.pop(instance, None) is not None:
                self.counters["removed"] += 1
                if self.on_gone is not None:
                    self._call(self.on_gone, instance)
            return
        if instance in self._resolving:
            self._dirty.add(instance)  # resolve again once the running one ends
            return
        if instance not in self.peers and len(self.peers) + len(self._resolving) >= self.max_services:
            self.counters["table_full"] += 1  # a flood of names: no resolving, no offering
            return
        self._resolving[instance] = asyncio.create_task(self._resolve(instance, name))

    async def _resolve(self, instance: str, fqdn: str) -> None:
        try:
            while True:
                self._dirty.discard(instance)
                info = await self._request(fqdn)
                if info is None:
                    self.counters["resolve_failed"] += 1
                    log.debug("mDNS: could not resolve %s", fqdn)
                else:
                    self._resolved(instance, info)
                if instance not in self._dirty:
                    return
        finally:
            if self._resolving.get(instance) is asyncio.current_task():
                del self._resolving[instance]

    async def _request(self, fqdn: str) -> AsyncServiceInfo | None:
        assert self._aiozc is not None
        for pause in (*RESOLVE_RETRIES, None):
            try:
                info = AsyncServiceInfo(SERVICE_TYPE, fqdn)
            except BadTypeInNameException:
                return None
            if await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
                return info
            if pause is None:
                return None
            await asyncio.sleep(pause)
        return None

    def _resolved(self, instance: str, info: AsyncServiceInfo) -> None:
        txt = _decode_txt(info.properties)
        if instance == self.name and txt.get("id") not in (None, self.node_id):
            self.counters["name_conflicts"] += 1
            log.error("mDNS: another node (id %s) also uses the name %r", txt.get("id"), self.name)
            return
        if instance == self.name or txt.get("id") == self.node_id:
            self.counters["ignored_self"] += 1
            return
        if txt.get("cluster") != self.cluster:
            if instance not in self._seen_cluster_other and len(self._seen_cluster_other) < self.max_services:
                self._seen_cluster_other.add(instance)
                self.counters["ignored_cluster"] += 1
            return
        host_port = self._pick_address(info.parsed_addresses(IPVersion.V4Only), info.port)
        if host_port is None or not txt.get("id") or not txt.get("v", "").isdigit():
            self.counters["ignored_malformed"] += 1
            return
        old = self.peers.get(instance)
        if old is None and len(self.peers) >= self.max_services:
            self.counters["table_full"] += 1
            return
        self.peers[instance] = PeerRecord(instance, host_port, txt)
        if old is None:
            self.counters["discovered"] += 1
        elif old.addr == host_port:
            return  # TXT-only change: membership gossip carries meta, no new join needed
        self._offer(instance)

    def _pick_address(self, addrs: list[str], port: int | None) -> str | None:
        """The offer's candidate: a literal IP:port from its A records (one on our subnets first)."""
        candidates = []
        for addr in addrs:
            parsed = parse_ip_port(format_hostport(addr, port or 0))
            if parsed is not None:
                candidates.append(parsed)
        if not candidates:
            return None
        if self.interfaces is not None:
            nets = interface_networks(self.interfaces)
            for ip, p in candidates:
                if any(ipaddress.ip_address(ip) in net for net in nets):
                    return format_hostport(ip, p)
        return format_hostport(*candidates[0])

    def _offer(self, name: str) -> None:
        peer = self.peers[name]
        self.counters["offers"] += 1
        self._call(self.on_peer, name, peer.addr, dict(peer.txt))

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("mDNS: discovery callback failed")
