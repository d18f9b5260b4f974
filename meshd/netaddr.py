"""Which address a node advertises, and host names to addresses.

A node bound to a wildcard address advertises the IPv4 address of its default-route interface,
else of the first non-loopback interface, else 127.0.0.1. The choice is a pure function of the
route table text and the interface list (`choose_advertise_host`), so it is tested without real
interfaces; `derive_advertise_host` reads both from the system (/proc/net/route: ifaddr gives
no routes; ifaddr for the interface addresses).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence

import ifaddr

from meshd.units import format_hostport, parse_hostport

log = logging.getLogger("meshd")

__all__ = [
    "choose_advertise_host",
    "default_route_interface",
    "derive_advertise_host",
    "is_wildcard",
    "resolve_hostport",
]

ROUTE_TABLE = "/proc/net/route"
_RTF_UP = 0x1


def default_route_interface(route_table: str) -> str | None:
    """Interface of the IPv4 default route with the lowest metric (/proc/net/route text)."""
    best: tuple[int, str] | None = None
    for line in route_table.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 8 or parts[1] != "00000000" or parts[7] != "00000000":
            continue
        try:
            flags, metric = int(parts[3], 16), int(parts[6])
        except ValueError:
            continue
        if flags & _RTF_UP and (best is None or metric < best[0]):
            best = (metric, parts[0])
    return best[1] if best else None


def _ipv4_of(adapter: ifaddr.Adapter) -> str | None:
    """The adapter's first IPv4 address that is not loopback (ifaddr: IPv4 as str, IPv6 tuple)."""
    for ip in adapter.ips:
        if isinstance(ip.ip, str) and not ipaddress.IPv4Address(ip.ip).is_loopback:
            return ip.ip
    return None


def choose_advertise_host(route_table: str, adapters: Sequence[ifaddr.Adapter]) -> tuple[str, str]:
    """(address, how it was chosen) for a node bound to a wildcard address."""
    iface = default_route_interface(route_table)
    if iface:
        for adapter in adapters:
            if adapter.name == iface:
                addr = _ipv4_of(adapter)
                if addr:
                    return addr, f"default route interface {iface}"
    for adapter in adapters:
        addr = _ipv4_of(adapter)
        if addr:
            return addr, f"first non-loopback interface {adapter.name}"
    return "127.0.0.1", "loopback (no other interface has an address)"


def derive_advertise_host() -> tuple[str, str]:
    """choose_advertise_host over this host's route table and interfaces."""
    try:
        with open(ROUTE_TABLE) as f:
            route_table = f.read()
    except OSError:
        route_table = ""
    return choose_advertise_host(route_table, list(ifaddr.get_adapters()))


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")  # noqa: S104 - recognises a wildcard, binds nothing


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
