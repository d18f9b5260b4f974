"""Units people write in flags, TOML, query strings and JSON: durations, rates, host:port.

One module so every parser of configuration and requests spells and checks them alike.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from meshd.errors import ConfigError

__all__ = [
    "format_hostport",
    "is_ascii_int",
    "is_ip_port",
    "is_loopback_host",
    "parse_duration",
    "parse_hostport",
    "parse_ip_port",
    "parse_rate",
    "parse_size",
]

_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(i?)(b|byte|bytes)?\s*$", re.I)
_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([kmg]?)(i?)(b|bit|byte|bytes)?(?:/s)?\s*$", re.I)


def _amount(value: object, where: str, pattern: re.Pattern[str], prefixes: str, what: str) -> float:
    """A number, or text `pattern` reads as <number><prefix><i><unit>: k/M/G/T in 1000s, with
    "i" in 1024s; a unit "bit" counts eighths. `what` names it in errors ("rate like 10MB")."""
    noun = what.split()[0]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: expected a {what}, got {value!r}")
    if isinstance(value, str):
        m = pattern.match(value)
        if not m:
            raise ConfigError(f"{where}: expected a {what}, got {value!r}")
        num, prefix, binary, unit = m.groups()
        amount = float(num) * (1024 if binary else 1000) ** prefixes.index(prefix.lower() or " ")
        if unit and unit.lower() == "bit":
            amount /= 8
    else:
        amount = float(value)
    if amount < 0 or amount != amount or amount == float("inf"):
        raise ConfigError(f"{where}: {noun} must be finite and not negative")
    return amount


def parse_rate(value: object, where: str) -> float | None:
    """Bytes per second: a number, or text like '10MB', '5MiB/s', '100mbit'. 0 = unlimited."""
    if value is None or value == "" or value is False:
        return None
    return _amount(value, where, _RATE_RE, " kmg", "rate like 10MB or 100mbit") or None


def parse_size(value: object, where: str) -> int:
    """Bytes: a number, or text like '32MiB', '1.5GB', '500k' (k/M/G/T: 1000s, Ki/Mi/Gi/Ti: 1024s)."""
    return int(_amount(value, where, _SIZE_RE, " kmgt", "size like 32MiB or 1GB"))


def parse_duration(value: object, where: str = "duration") -> float:
    """'250ms', '3s', '1m', '1h' or a bare number (seconds) -> seconds as float."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 250ms, 3s or 1m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ConfigError(f"{where}: expected a duration like 250ms, 3s or 1m, got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{where}: expected a duration like 250ms, 3s or 1m, got {value!r}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"{where}: duration must be a finite non-negative value")
    return seconds


def parse_hostport(
    value: object, where: str = "address", default_port: int | None = None, allow_zero: bool = False
) -> tuple[str, int]:
    """'host:port', '[v6]:port' (or 'host' when default_port is given) -> (host, port)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    text = value.strip()
    # meshctl's MESHD_API is a URL; accept that spelling here too so one variable serves both.
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme) :].rstrip("/")
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{where}: unbalanced '[' in {value!r}")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{where}: expected [HOST]:PORT, got {value!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") == 0:
        host, port_text = text, None
    else:
        raise ConfigError(f"{where}: IPv6 addresses need brackets, like [::1]:7788; got {value!r}")
    if not host:
        raise ConfigError(f"{where}: missing host in {value!r}")
    if port_text is None or port_text == "":
        if default_port is None:
            raise ConfigError(f"{where}: missing port in {value!r} (expected HOST:PORT)")
        return host, default_port
    if not is_ascii_int(port_text):
        raise ConfigError(f"{where}: bad port {port_text!r} in {value!r}")
    port = int(port_text)
    if port > 65535 or (port == 0 and not allow_zero):
        raise ConfigError(f"{where}: port {port} out of range in {value!r}")
    return host, port


MAX_IP_PORT_LEN = 53  # "[" + the longest IPv6 text (45, with a dotted tail) + "]:65535"


_BROADCAST = ipaddress.IPv4Address(0xFFFFFFFF)  # the limited broadcast address


def parse_ip_port(value: object) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """A literal 'a.b.c.d:port' or '[v6]:port' from the network -> (ip, port); ValueError else.

    Stricter than parse_hostport on purpose: gossip addresses are dialled by every node, so no
    host names (a DNS lookup per message), no scope ids, paths, schemes or port 0, and nothing
    that cannot be a peer (unspecified, multicast, broadcast).
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_IP_PORT_LEN or not value.isascii():
        raise ValueError(f"not an IP:port: {value!r}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not is_ascii_int(port_text) or len(port_text) > 5:
        raise ValueError(f"missing or bad port in {value!r}")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if host.startswith("[") and host.endswith("]"):
        ip = ipaddress.IPv6Address(host[1:-1])  # ValueError on garbage
        if ip.scope_id is not None:
            raise ValueError(f"scoped IPv6 address in {value!r}")
    else:
        ip = ipaddress.IPv4Address(host)  # ValueError on names, bare IPv6, paths
    if ip.is_unspecified or ip.is_multicast or ip == _BROADCAST:
        raise ValueError(f"not a peer's address: {value!r}")
    return ip, port


@functools.lru_cache(maxsize=65536)
def is_ip_port(value: str) -> bool:
    """parse_ip_port accepts `value`. Remembered: the core checks the addresses of every
    message it handles, and a mesh has few (bounded, so garbage cannot grow it)."""
    try:
        parse_ip_port(value)
    except ValueError:
        return False
    return True


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ascii_int(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit() alone admits "²", which int() refuses


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
