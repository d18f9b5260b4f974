"""mDNS discovery bound to the daemon: join the same-cluster peers it finds.

Shell around the sans-IO Dialer: offers go in by name, dials come out by address, at most
`max_dials` at once, each bounded by `dial_timeout`; a failed address is retried on the Dialer's
backoff (never per name), and one already alive in the membership is not dialed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
from collections.abc import Sequence
from typing import Protocol

from meshd.config import DiscoveryConfig
from meshd.core.messages import MemberState
from meshd.core.node import MemberView
from meshd.discovery.dialer import Dialer
from meshd.discovery.mdns import MAX_LABEL, Discovery, valid_instance_name
from meshd.errors import ConfigError
from meshd.loop_timer import DeadlineTimer
from meshd.metrics import Exposition

log = logging.getLogger("meshd.discovery")


class DiscoveryHost(Protocol):
    """What discovery uses of the daemon: who this node is, and joining what it finds."""

    @property
    def name(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def cluster(self) -> str: ...
    @property
    def site(self) -> str: ...
    @property
    def addr(self) -> str: ...  # "host:port", the advertised gossip address
    @property
    def mdns_interfaces(self) -> list[str]: ...  # IPv4 addresses to confine mDNS to; [] = all
    def members(self) -> Sequence[MemberView]: ...
    async def join(self, addrs: list[str], timeout: float | None = None) -> int: ...  # how many answered


class DaemonDiscovery:
    """Discovery bound to a running daemon: joins what it finds and reports the outcome back."""

    def __init__(
        self,
        daemon: DiscoveryHost,
        config: DiscoveryConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.daemon = daemon
        self.config = config or DiscoveryConfig()
        self.dialer = Dialer(self.config, rng or random.Random())
        host, _, port = daemon.addr.rpartition(":")
        host = host.strip("[]")
        wanted = list(daemon.mdns_interfaces)
        interfaces = [i for i in wanted if _is_ipv4(i)]
        if len(interfaces) != len(wanted):
            log.warning("mDNS: only IPv4 interfaces are used; ignoring the others")
        if wanted and not interfaces:
            raise ConfigError("--mdns-interface: no IPv4 address given")
        addresses = [host] if _is_ipv4(host) and not ipaddress.IPv4Address(host).is_unspecified else []
        if not interfaces and addresses and ipaddress.IPv4Address(host).is_loopback:
            # A node only reachable on loopback has nothing to say on the LAN (demos, tests).
            interfaces = ["127.0.0.1"]
        if not addresses:
            log.warning("mDNS: advertise address %s is not IPv4; browsing only", daemon.addr)
        name = daemon.name
        if not valid_instance_name(name):
            # e.g. a FQDN host name: the mDNS label is only a label, joins go by address and id.
            name = re.sub(r"\.+", "-", name).encode()[:MAX_LABEL].decode(errors="ignore") or "node"
            log.warning("mDNS: node name %r is advertised as %r", daemon.name, name)
        self.discovery = Discovery(
            name=name,
            node_id=daemon.node_id,
            cluster=daemon.cluster,
            site=daemon.site,
            port=int(port),
            addresses=addresses,
            interfaces=interfaces or None,
            on_peer=self._on_peer,
            on_gone=self._on_gone,
            max_services=self.config.max_offers,
        )
        self._joins: dict[str, asyncio.Task[None]] = {}  # by address
        self._timer = DeadlineTimer(self._pump)
        self._closed = False

    @property
    def counters(self) -> dict[str, int]:
        return self.discovery.counters

    def collect_metrics(self, out: Exposition) -> None:
        out.core_counters({f"mdns.{k}": v for k, v in self.discovery.counters.items()})
        out.core_counters(self.dialer.counters)
        out.gauge("meshd_discovery_addresses", "addresses discovery may dial", len(self.dialer.addresses))
        out.gauge("meshd_discovery_dials_in_flight", "discovery join attempts in flight", len(self._joins))

    def retry_delay(self, addr: str) -> float:
        """Seconds until a failed `addr` is dialed again (0 when due, joined or unknown)."""
        return self.dialer.retry_delay(addr, asyncio.get_running_loop().time())

    async def start(self) -> None:
        await self.discovery.start()

    async def readvertise(self, addr: str) -> None:
        """The daemon's address changed: announce the new one (a goodbye for the old)."""
        host = addr.rpartition(":")[0].strip("[]")
        if _is_ipv4(host):
            await self.discovery.update(addresses=[host])

    async def close(self) -> None:
        self._closed = True
        self._timer.cancel()
        for task in list(self._joins.values()):
            task.cancel()
        await asyncio.gather(*self._joins.values(), return_exceptions=True)
        self._joins.clear()
        await self.discovery.stop()

    def _alive_addrs(self) -> set[str]:
        alive = set()
        for m in self.daemon.members():
            if m.state == MemberState.ALIVE and m.name != self.daemon.name:
                alive.add(m.addr)
        return alive

    def _on_peer(self, name: str, addr: str, txt: dict[str, str]) -> None:
        if self.dialer.offer(name, addr, asyncio.get_running_loop().time()):
            self._pump()

    def _on_gone(self, name: str) -> None:
        log.debug("mDNS: %s withdrew its service", name)
        self.dialer.withdraw(name)  # its address is forgotten once nothing else names it
        self._pump()

    def _pump(self) -> None:
        """Start what the Dialer says is due, and wake up when the next thing will be."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for addr in self.dialer.take_due(now, self._alive_addrs()):
            self._joins[addr] = loop.create_task(self._join(addr))
        deadline = self.dialer.next_deadline(now)
        if deadline is None:
            self._timer.cancel()
        else:
            self._timer.arm(deadline)

    async def _join(self, addr: str) -> None:
        timeout = self.config.dial_timeout
        try:
            # The daemon bounds the exchange itself; wait_for also frees the slot if it does not.
            joined = await asyncio.wait_for(self.daemon.join([addr], timeout=timeout), timeout + 1.0)
        except asyncio.CancelledError:
            self._joins.pop(addr, None)
            raise
        except Exception as exc:
            log.info("mDNS: join %s failed: %r", addr, exc)
            joined = 0
        self._joins.pop(addr, None)
        loop = asyncio.get_running_loop()
        self.dialer.done(addr, joined > 0, loop.time())
        if joined:
            log.info("mDNS: joined %s", addr)
        else:
            log.info(
                "mDNS: %s did not answer a join; next try in %.0fs",
                addr, self.dialer.retry_delay(addr, loop.time()),
            )  # fmt: skip
        self._pump()


async def start(daemon: DiscoveryHost, config: DiscoveryConfig | None = None) -> DaemonDiscovery:
    """The daemon's hook: advertise it, browse, and join same-cluster peers as they appear."""
    handle = DaemonDiscovery(daemon, config)
    await handle.start()
    return handle


def _is_ipv4(addr: str) -> bool:
    try:
        ipaddress.IPv4Address(addr)
    except ValueError:
        return False
    return True
