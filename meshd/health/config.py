"""The [[check]] and [[query_handler]] tables -> CheckSpec / HandlerSpec. Errors name the key.

Each kind of check is its own Table Struct (so a key of another kind is an unknown key); the
kind comes from `kind` (or `type`), or from the one of command/url/addr the table has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final

import msgspec

from meshd.config_tables import Label, Parsed, Table, decode, refuse_unknown_keys
from meshd.errors import ConfigError
from meshd.health.spec import (
    COMMAND,
    DEFAULT_INTERVAL,
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

_KIND_BY_KEY: Final = {"command": COMMAND, "url": HTTP, "addr": TCP}

# --- value parsers: (raw value, where) -> typed value -------------------------------------------


def parse_command(value: object, where: str) -> tuple[str, ...] | str:
    """A list runs as is; a string runs through /bin/sh -c."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value) and value[0].strip():
        return tuple(value)
    raise ConfigError(f"{where}: expected a command line (a non-empty string or list of strings)")


def _at_least(minimum: float) -> Parsed:
    def parse(value: object, where: str) -> float:
        seconds = parse_duration(value, where)
        if seconds < minimum:
            raise ConfigError(f"{where}: must be at least {minimum:g}s")
        return seconds

    return Parsed(parse)


def _http_url(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {value!r}")
    return value


def _addr(value: object, where: str) -> str:
    parse_hostport(value, where)
    return str(value).strip()


def _directory(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a directory, got {value!r}")
    return value


def _number(value: object, where: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or number != number or number < 0:
        raise ConfigError(f"{where}: expected a non-negative number, got {value!r}")
    return number


def _percent(value: object, where: str) -> float:
    """Free space or memory in percent: 20, 20.5 or "20%"."""
    text = value.strip() if isinstance(value, str) else value
    number = _number(text[:-1] if isinstance(text, str) and text.endswith("%") else text, where)
    if number > 100:
        raise ConfigError(f"{where}: a percentage of free space, 0..100, got {value!r}")
    return number


Interval = Annotated[float, _at_least(MIN_INTERVAL)]
Timeout = Annotated[float, _at_least(0.001)]
Command = Annotated[tuple[str, ...] | str, Parsed(parse_command)]

# --- the tables ---------------------------------------------------------------------------------


class _CheckTable(Table, frozen=True):
    """The keys every [[check]] has (name and kind are checked before decoding)."""

    name: str
    kind: str | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET
    interval: Interval = DEFAULT_INTERVAL
    timeout: Timeout = DEFAULT_TIMEOUT
    enabled: bool = True


class CommandCheckTable(_CheckTable, frozen=True, kw_only=True):
    command: Command


class HttpCheckTable(_CheckTable, frozen=True, kw_only=True):
    url: Annotated[str, Parsed(_http_url)]


class TcpCheckTable(_CheckTable, frozen=True, kw_only=True):
    addr: Annotated[str, Parsed(_addr)]


class LoadCheckTable(_CheckTable, frozen=True):
    """Load per core; higher is worse."""

    warning: Annotated[float, Parsed(_number)] = THRESHOLDS[LOAD][0]
    critical: Annotated[float, Parsed(_number)] = THRESHOLDS[LOAD][1]


class MemoryCheckTable(_CheckTable, frozen=True):
    """Available memory in percent; lower is worse."""

    warning: Annotated[float, Parsed(_percent)] = THRESHOLDS[MEMORY][0]
    critical: Annotated[float, Parsed(_percent)] = THRESHOLDS[MEMORY][1]


class DiskCheckTable(_CheckTable, frozen=True):
    """Free space of `path` (default: the data dir) in percent; lower is worse."""

    path: Annotated[str | msgspec.UnsetType, Parsed(_directory)] = msgspec.UNSET
    warning: Annotated[float, Parsed(_percent)] = THRESHOLDS[DISK][0]
    critical: Annotated[float, Parsed(_percent)] = THRESHOLDS[DISK][1]


class LoopLagCheckTable(_CheckTable, frozen=True):
    """The event loop's worst lag since the last run; higher is worse."""

    warning: Annotated[float, Parsed(parse_duration)] = THRESHOLDS[LOOP_LAG][0]
    critical: Annotated[float, Parsed(parse_duration)] = THRESHOLDS[LOOP_LAG][1]


CHECK_TABLES: Final[Mapping[str, type[_CheckTable]]] = {
    COMMAND: CommandCheckTable,
    HTTP: HttpCheckTable,
    TCP: TcpCheckTable,
    LOAD: LoadCheckTable,
    MEMORY: MemoryCheckTable,
    DISK: DiskCheckTable,
    LOOP_LAG: LoopLagCheckTable,
}


class HandlerTable(Table, frozen=True):
    """A [[query_handler]]: the payload goes to `command` on stdin, its output is the answer."""

    name: str
    command: Command
    timeout: Timeout = DEFAULT_TIMEOUT


# --- tables -> specs ----------------------------------------------------------------------------


def _name(table: Mapping[str, Any], what: str, index: int) -> str:
    raw_name = table.get("name")
    if not isinstance(raw_name, str) or not raw_name.strip():
        raise ConfigError(f"{what} #{index + 1}: key 'name': every {what.split('_')[-1]} needs a name")
    return raw_name.strip()


def _key_label(label: str) -> Label:
    return lambda key: f"{label}: key {key!r}"


def _kind(table: Mapping[str, Any], label: str) -> str:
    kind_value = table.get("kind", table.get("type"))
    if "kind" in table and "type" in table and table["kind"] != table["type"]:
        raise ConfigError(f"{label}: keys 'kind' and 'type' disagree")
    if kind_value is None:
        present = [k for k in _KIND_BY_KEY if k in table]
        if len(present) != 1:
            hint = f"; {' and '.join(present)} leave it open" if present else ""
            raise ConfigError(f"{label}: key 'kind': missing (one of {', '.join(KINDS)}){hint}")
        return _KIND_BY_KEY[present[0]]
    if isinstance(kind_value, str) and kind_value.replace("-", "_") in KINDS:
        return kind_value.replace("-", "_")
    raise ConfigError(f"{label}: key 'kind': {kind_value!r} is not one of {', '.join(KINDS)}")


def parse_check(table: Mapping[str, Any], index: int, data_dir: str) -> CheckSpec | None:
    """One [[check]] table -> CheckSpec (None when `enabled = false`). ConfigError names it."""
    name = _name(table, "check", index)
    label = f"check {name!r}"
    kind = _kind(table, label)
    cls = CHECK_TABLES[kind]
    if table.get("enabled") is False:  # a disabled check only has to be a check of its kind
        refuse_unknown_keys(table, cls, _key_label(label))
        return None
    t = decode(table, cls, _key_label(label))
    if not t.enabled:
        return None
    if isinstance(t, CommandCheckTable):
        return CheckSpec(name, kind, t.interval, t.timeout, command=t.command)
    if isinstance(t, HttpCheckTable):
        return CheckSpec(name, kind, t.interval, t.timeout, url=t.url)
    if isinstance(t, TcpCheckTable):
        return CheckSpec(name, kind, t.interval, t.timeout, addr=t.addr)
    assert isinstance(t, LoadCheckTable | MemoryCheckTable | DiskCheckTable | LoopLagCheckTable)
    warning, critical, higher_is_worse = t.warning, t.critical, THRESHOLDS[kind][2]
    if (warning > critical) if higher_is_worse else (warning < critical):
        relation = "above" if higher_is_worse else "below"
        raise ConfigError(
            f"{label}: key 'critical': must be {relation} or equal to warning ({critical:g} vs {warning:g})"
        )
    path = None
    if isinstance(t, DiskCheckTable):
        path = data_dir if isinstance(t.path, msgspec.UnsetType) else t.path
    return CheckSpec(name, kind, t.interval, t.timeout, path=path, warning=warning, critical=critical)


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
    """The [[query_handler]] tables by name; `health` is the built-in query and no handler's."""
    handlers: dict[str, HandlerSpec] = {}
    for index, table in enumerate(tables):
        if not isinstance(table, Mapping):
            raise ConfigError(f"query_handler #{index + 1}: expected a table")
        name = _name(table, "query_handler", index)
        label = f"query_handler {name!r}"
        if name == HEALTH_QUERY:
            raise ConfigError(f"{label}: key 'name': {HEALTH_QUERY!r} is the built-in query")
        if name in handlers:
            raise ConfigError(f"{label}: key 'name': defined twice")
        t = decode(table, HandlerTable, _key_label(label))
        handlers[name] = HandlerSpec(name, t.command, t.timeout)
    return handlers
