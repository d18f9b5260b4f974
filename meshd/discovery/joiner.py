"""mDNS discovery bound to the daemon: join the same-cluster peers it finds, report back.

A peer whose join fails (another key, an address that does not answer) is offered again only
after Discovery's exponential backoff; one already alive in the membership is marked joined.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import Protocol

from meshd.core.messages import MemberState
from meshd.core.node import MemberView
from meshd.discovery.mdns import MAX_LABEL, Discovery, valid_instance_name
from meshd.errors import ConfigError
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
    async def join(self, addrs: list[str]) -> int: ...  # how many answered


class DaemonDiscovery:
    """Discovery bound to a running daemon: joins what it finds and reports the outcome back."""

    def __init__(self, daemon: DiscoveryHost) -> None:
        self.daemon = daemon
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
        )
        self._joins: dict[str, asyncio.Task[None]] = {}

    @property
    def counters(self) -> dict[str, int]:
        return self.discovery.counters

    def collect_metrics(self, out: Exposition) -> None:
        out.core_counters({f"mdns.{k}": v for k, v in self.discovery.counters.items()})

    async def start(self) -> None:
        await self.discovery.start()

    async def readvertise(self, addr: str) -> None:
        """The daemon's address changed: announce the new one (a goodbye for the old)."""
        host = addr.rpartition(":")[0].strip("[]")
        if _is_ipv4(host):
            await self.discovery.update(addresses=[host])

    async def close(self) -> None:
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
        if addr in self._alive_addrs():
            self.discovery.mark_joined(name)
            return
        if name in self._joins:
            return  # a join with it is already under way
        self._joins[name] = asyncio.create_task(self._join(name, addr))

    async def _join(self, name: str, addr: str) -> None:
        try:
            joined = await self.daemon.join([addr])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("mDNS: join %s at %s failed: %s", name, addr, exc)
            joined = 0
        finally:
            self._joins.pop(name, None)
        if joined:
            self.discovery.mark_joined(name)
            log.info("mDNS: joined %s at %s", name, addr)
        else:
            self.discovery.mark_failed(name)
            log.info(
                "mDNS: %s at %s did not answer a join; next try in %.0fs",
                name, addr, self.discovery.retry_delay(name),
            )  # fmt: skip

    def _on_gone(self, name: str) -> None:
        log.debug("mDNS: %s withdrew its service", name)


async def start(daemon: DiscoveryHost) -> DaemonDiscovery:
    """The daemon's hook: advertise it, browse, and join same-cluster peers as they appear."""
    handle = DaemonDiscovery(daemon)
    await handle.start()
    return handle


def _is_ipv4(addr: str) -> bool:
    try:
        ipaddress.IPv4Address(addr)
    except ValueError:
        return False
    return True
