"""Which `Host` and `Origin` the operator API answers: its own origin only.

DNS rebinding: a page on evil.example, opened in a browser on the gateway, makes evil.example
resolve to 127.0.0.1 and then reads http://evil.example:7789/v1/health as same-origin. The
browser still sends `Host: evil.example:7789`, so the API answers only Host names that denote
it: loopback names, the address it is bound to or the connection arrived at (an IP literal
cannot be rebound), and names the operator configured (--api-allow-host). A cross-site page
sends its own `Origin`; that origin must pass the same check. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from meshd.errors import ConfigError
from meshd.netaddr import is_wildcard
from meshd.units import is_loopback_host

__all__ = ["AllowedHost", "HostPolicy", "parse_allow_host", "split_authority", "split_origin"]

_NAME_RE = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,252})?$")


@dataclass(frozen=True)
class AllowedHost:
    """A configured name; `port` None means "the API's own port, or no port given"."""

    host: str
    port: int | None = None


def _norm_host(host: str) -> str | None:
    """Lower case, one trailing dot dropped, IP literals in their canonical text; None if bad."""
    host = host.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        pass
    return host if _NAME_RE.match(host) and ".." not in host else None


def _port(text: str) -> int | None:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def split_authority(value: str) -> tuple[str, int | None] | None:
    """`host`, `host:port`, `[v6]`, `[v6]:port` -> (normalised host, port); None if malformed."""
    if not value or value != value.strip() or any(c in value for c in "@/\\?#, \t"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if ":" not in host:
            return None
    else:
        if value.count(":") > 1:  # a bare IPv6 address is not a valid Host
            return None
        host, colon, port_text = value.partition(":")
        rest = colon + port_text
    port: int | None = None
    if rest and (not rest.startswith(":") or (port := _port(rest[1:])) is None):
        return None
    norm = _norm_host(host)
    return None if norm is None else (norm, port)


def split_origin(value: str) -> tuple[str, int | None] | None:
    """`http://host[:port]` (an Origin header) -> (host, port); None for "null" and the rest."""
    scheme, sep, authority = value.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    return split_authority(authority)


def parse_allow_host(value: object, where: str) -> AllowedHost:
    """A configured name: `NAME`, `NAME:PORT`, an IP literal or `[v6]:PORT` (ConfigError if not)."""
    text = value.strip() if isinstance(value, str) else ""
    parts = split_authority(text) if text else None
    if parts is None:
        raise ConfigError(f"{where}: expected a host name or address with an optional :PORT, got {value!r}")
    return AllowedHost(*parts)


def is_loopback_name(host: str) -> bool:
    """localhost, *.localhost (RFC 6761: always loopback), 127.0.0.0/8, ::1."""
    return host.endswith(".localhost") or is_loopback_host(host)


class HostPolicy:
    """The names this API answers to. `bound` is set once the server listens."""

    def __init__(self, allowed: Iterable[AllowedHost] = ()) -> None:
        self.allowed = frozenset(allowed)
        self.bound: tuple[str, int] | None = None

    def names_this_api(self, host: str, port: int | None, local: tuple[str, int] | None) -> bool:
        """Whether (host, port) from a Host header or Origin names this API.

        `local` is the address the connection arrived at: its port is the API's own port (a
        port given must match it), its address is a name of the API (a wildcard bind).
        """
        if AllowedHost(host, port) in self.allowed and port is not None:
            return True  # NAME:PORT configured as is (a tunnel or proxy on another port)
        own_port = local[1] if local else (self.bound[1] if self.bound else None)
        if port is not None and own_port is not None and port != own_port:
            return False
        if is_loopback_name(host) or AllowedHost(host) in self.allowed:
            return True
        own = {_norm_host(a[0]) for a in (self.bound, local) if a is not None and not is_wildcard(a[0])}
        return host in own
