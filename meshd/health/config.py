"""The [[check]] and [[query_handler]] tables -> CheckSpec / HandlerSpec. Errors name the key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from meshd.errors import ConfigError
from meshd.health.spec import (
    COMMAND,
    DEFAULT_TIMEOUT,
    DISK,
    HEALTH_QUERY,
    HTTP,
    KINDS,
    LOAD,
    LOOP_LAG,
    MEMORY,
    MIN_INTERVAL,
    TCP,
    THRESHOLDS,
    CheckSpec,
    HandlerSpec,
    builtin_checks,
)
from meshd.units import parse_duration, parse_hostport

_COMMON_KEYS: Final = frozenset({"name", "kind", "type", "interval", "timeout", "enabled"})
_KIND_KEYS: Final[Mapping[str, frozenset[str]]] = {
    COMMAND: frozenset({"command"}),
    HTTP: frozenset({"url"}),
    TCP: frozenset({"addr"}),
    LOAD: frozenset({"warning", "critical"}),
    MEMORY: frozenset({"warning", "critical"}),
    DISK: frozenset({"path", "warning", "critical"}),
    LOOP_LAG: frozenset({"warning", "critical"}),
}
_KIND_BY_KEY: Final = {"command": COMMAND, "url": HTTP, "addr": TCP}


def _command(value: object, where: str) -> tuple[str, ...] | str:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value) and value[0].strip():
        return tuple(value)
    raise ConfigError(f"{where}: expected a command line (a non-empty string or list of strings)")


def _threshold(kind: str, value: object, where: str) -> float:
    if kind == LOOP_LAG:
        return parse_duration(value, where)
    if isinstance(value, str) and kind in (MEMORY, DISK) and value.strip().endswith("%"):
        value = value.strip()[:-1]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or number != number or number < 0:
        raise ConfigError(f"{where}: expected a non-negative number, got {value!r}")
    if kind in (MEMORY, DISK) and number > 100:
        raise ConfigError(f"{where}: a percentage of free space, 0..100, got {value!r}")
    return number


def _positive_duration(value: object, where: str, minimum: float) -> float:
    seconds = parse_duration(value, where)
    if seconds < minimum:
        raise ConfigError(f"{where}: must be at least {minimum:g}s")
    return seconds


def parse_check(table: Mapping[str, Any], index: int, data_dir: str) -> CheckSpec | None:
    """One [[check]] table -> CheckSpec (None when `enabled = false`). ConfigError names it."""
    raw_name = table.get("name")
    if not isinstance(raw_name, str) or not raw_name.strip():
        raise ConfigError(f"check #{index + 1}: key 'name': every check needs a name")
    name = raw_name.strip()
    label = f"check {name!r}"
    kind_value = table.get("kind", table.get("type"))
    if "kind" in table and "type" in table and table["kind"] != table["type"]:
        raise ConfigError(f"{label}: keys 'kind' and 'type' disagree")
    if kind_value is None:
        present = [k for k in _KIND_BY_KEY if k in table]
        if len(present) != 1:
            hint = f"; {' and '.join(present)} leave it open" if present else ""
            raise ConfigError(f"{label}: key 'kind': missing (one of {', '.join(KINDS)}){hint}")
        kind = _KIND_BY_KEY[present[0]]
    elif isinstance(kind_value, str) and kind_value.replace("-", "_") in KINDS:
        kind = kind_value.replace("-", "_")
    else:
        raise ConfigError(f"{label}: key 'kind': {kind_value!r} is not one of {', '.join(KINDS)}")
    allowed = _COMMON_KEYS | _KIND_KEYS[kind]
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{label}: key {key!r}: not a key of a {kind} check (known: {', '.join(sorted(allowed))})"
            )
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{label}: key 'enabled': expected true or false, got {enabled!r}")
    if not enabled:
        return None
    spec = CheckSpec(name, kind)
    if "interval" in table:
        interval = _positive_duration(table["interval"], f"{label}: key 'interval'", MIN_INTERVAL)
        spec = replace(spec, interval=interval)
    if "timeout" in table:
        timeout = _positive_duration(table["timeout"], f"{label}: key 'timeout'", 0.001)
        spec = replace(spec, timeout=timeout)
    if kind == COMMAND:
        if "command" not in table:
            raise ConfigError(f"{label}: key 'command': missing")
        spec = replace(spec, command=_command(table["command"], f"{label}: key 'command'"))
    elif kind == HTTP:
        url = table.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{label}: key 'url': expected an http:// or https:// URL, got {url!r}")
        spec = replace(spec, url=url)
    elif kind == TCP:
        if "addr" not in table:
            raise ConfigError(f"{label}: key 'addr': missing")
        parse_hostport(table["addr"], f"{label}: key 'addr'")
        spec = replace(spec, addr=str(table["addr"]).strip())
    else:
        warning, critical, higher_is_worse = THRESHOLDS[kind]
        if "warning" in table:
            warning = _threshold(kind, table["warning"], f"{label}: key 'warning'")
        if "critical" in table:
            critical = _threshold(kind, table["critical"], f"{label}: key 'critical'")
        if (warning > critical) if higher_is_worse else (warning < critical):
            relation = "above" if higher_is_worse else "below"
            raise ConfigError(
                f"{label}: key 'critical': must be {relation} or equal to warning"
                f" ({critical:g} vs {warning:g})"
            )
        spec = replace(spec, warning=warning, critical=critical)
        if kind == DISK:
            path = table.get("path", data_dir)
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{label}: key 'path': expected a directory, got {path!r}")
            spec = replace(spec, path=path)
    return spec


def parse_checks(
    tables: Sequence[Mapping[str, Any]], data_dir: str, *, builtins: bool = True
) -> list[CheckSpec]:
    """The [[check]] tables (plus the built-in checks, which a same-named table replaces)."""
    configured: dict[str, CheckSpec | None] = {}
    for index, table in enumerate(tables):
        if not isinstance(table, Mapping):
            raise ConfigError(f"check #{index + 1}: expected a table")
        spec = parse_check(table, index, data_dir)
        name = str(table["name"]).strip()
        if name in configured:
            raise ConfigError(f"check {name!r}: key 'name': defined twice")
        configured[name] = spec
    specs = [s for s in builtin_checks(data_dir) if s.name not in configured] if builtins else []
    specs += [s for s in configured.values() if s is not None]
    return specs


def parse_query_handlers(tables: Sequence[Mapping[str, Any]]) -> dict[str, HandlerSpec]:
    handlers: dict[str, HandlerSpec] = {}
    for index, table in enumerate(tables):
        if not isinstance(table, Mapping):
            raise ConfigError(f"query_handler #{index + 1}: expected a table")
        raw_name = table.get("name")
        if not isinstance(raw_name, str) or not raw_name.strip():
            raise ConfigError(f"query_handler #{index + 1}: key 'name': every handler needs a name")
        name = raw_name.strip()
        label = f"query_handler {name!r}"
        for key in table:
            if key not in ("name", "command", "timeout"):
                raise ConfigError(f"{label}: key {key!r}: unknown (known: command, name, timeout)")
        if name == HEALTH_QUERY:
            raise ConfigError(f"{label}: key 'name': {HEALTH_QUERY!r} is the built-in query")
        if name in handlers:
            raise ConfigError(f"{label}: key 'name': defined twice")
        if "command" not in table:
            raise ConfigError(f"{label}: key 'command': missing")
        command = _command(table["command"], f"{label}: key 'command'")
        timeout = DEFAULT_TIMEOUT
        if "timeout" in table:
            timeout = _positive_duration(table["timeout"], f"{label}: key 'timeout'", 0.001)
        handlers[name] = HandlerSpec(name, command, timeout)
    return handlers
