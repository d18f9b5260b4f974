"""Node configuration: defaults < TOML file < MESHD_* environment < command-line flags.

Every flag of `meshd run` is also a TOML key (the flag name without `--`, `-` or `_` alike) and
an environment variable `MESHD_<KEY>` (upper case, `-` as `_`). Lists in the environment are
comma-separated. The `[protocol]` table (env `MESHD_PROTOCOL__<FIELD>`, flag `--protocol K=V`)
overrides single fields of the chosen profile. Every error names the key, flag or variable.

Each layer (the file's top level, the environment, the flags) is decoded by the same NodeTable
Struct (meshd.config_tables), so a value is checked alike wherever it comes from; the layers are
then applied in order onto a NodeConfig. The [[check]], [[query_handler]], [dist], [health] and
[discovery] tables are kept as written and decoded by their owners (NodeConfig.dist_config(),
meshd.health.config).

The file is read with its drop-ins: `--config /etc/meshd/meshd.toml` also reads
`/etc/meshd/meshd.d/*.toml` in lexical order of their names (systemd's and Consul's habit, so a
package or a fleet tool can add a file without editing the operator's). A later file wins key by
key: tables ([protocol], [dist], tags, ...) are merged key by key, [[check]] and [[query_handler]]
entries add up, any other value is replaced whole. Each file is checked on its own before the
merge, so an error names the file and key that caused it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

import msgspec

from meshd.api.guard import AllowedHost, parse_allow_host
from meshd.config_tables import Label, Parsed, Table, canonical_key, decode, table_keys
from meshd.core.config import PRESETS, ProtocolConfig
from meshd.errors import ConfigError
from meshd.logs import LOG_FORMATS
from meshd.release.config import DistConfig
from meshd.units import (
    format_hostport,
    is_ascii_int,
    is_loopback_host,
    parse_duration,
    parse_hostport,
    parse_size,
)

__all__ = [
    "DEFAULT_API",
    "DEFAULT_BIND",
    "DEFAULT_DATA_DIR",
    "DEFAULT_PORT",
    "DiscoveryConfig",
    "NodeConfig",
    "discovery_config",
    "drop_in_files",
    "load_config",
]

DEFAULT_PORT = 7788
DEFAULT_API_PORT = 7789
DEFAULT_BIND = f"0.0.0.0:{DEFAULT_PORT}"
DEFAULT_API = f"127.0.0.1:{DEFAULT_API_PORT}"
DEFAULT_DATA_DIR = "/var/lib/meshd"
LOG_LEVELS = ("debug", "info", "warning", "error")
_MAX_CONFIG_FILE = 1024 * 1024

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class NodeConfig:
    """Everything `meshd run` needs; see DESIGN.md for the meaning of each field."""

    name: str = field(default_factory=lambda: _default_name())
    cluster: str = "default"
    bind: str = DEFAULT_BIND
    advertise: str | None = None
    api: str = DEFAULT_API
    registry: str | None = None  # OCI registry read endpoint for containerd mirrors (off: None)
    # Pull-through (meshd/registry/pullthrough.py): upstream registry base URLs (none: off), the
    # site cache's size cap, and whether unsigned tags from upstream are passed through.
    registry_upstream: list[str] = field(default_factory=list)
    registry_cache_max: int = 10 * 1024**3
    registry_pass_tags: bool = False
    data_dir: str = DEFAULT_DATA_DIR
    join: list[str] = field(default_factory=list)
    site: str = "default"
    tags: dict[str, str] = field(default_factory=dict)
    mdns: bool = True
    mdns_interfaces: list[str] = field(default_factory=list)
    cluster_key_file: str | None = None
    insecure: bool = False
    profile: str = "lan"
    trust_publisher: list[str] = field(default_factory=list)
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (meshd.logs)
    # Names the operator API answers to besides loopback names and its own address (a reverse
    # proxy, a DNS name of the gateway): "NAME" (the API's port) or "NAME:PORT".
    api_allow_hosts: list[str] = field(default_factory=list)
    protocol_overrides: dict[str, float | int] = field(default_factory=dict)
    # Tables kept as written, decoded by their owners (meshd.health.config, dist_config()).
    checks: list[dict[str, Any]] = field(default_factory=list)
    query_handlers: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # config file path, for messages
    sources: list[str] = field(default_factory=list)  # that file and its drop-ins, in the order read

    @property
    def bind_hostport(self) -> tuple[str, int]:
        return parse_hostport(self.bind, "bind")

    @property
    def api_hostport(self) -> tuple[str, int]:
        return parse_hostport(self.api, "api", allow_zero=True)

    @property
    def registry_hostport(self) -> tuple[str, int] | None:
        return parse_hostport(self.registry, "registry", allow_zero=True) if self.registry else None

    def allowed_api_hosts(self) -> list[AllowedHost]:
        return [parse_allow_host(h, "api_allow_hosts") for h in self.api_allow_hosts]

    def protocol(self) -> ProtocolConfig:
        """The profile's preset with the [protocol] overrides applied."""
        base = PRESETS[self.profile]
        return base.replace(**self.protocol_overrides) if self.protocol_overrides else base

    def meta(self) -> dict[str, str]:
        """Member metadata gossiped with this node: site and tags (as "tag:<k>")."""
        meta = {"site": self.site}
        meta.update({f"tag:{k}": v for k, v in self.tags.items()})
        return meta

    def dist_config(self) -> DistConfig:
        """The [dist] table (keep, hook, hook_timeout, upload_rate, download_rate, origin_delay,
        min_free)."""

        source = f"{self.source}: [dist]" if self.source else "[dist]"
        return DistConfig.from_table(self.extra.get("dist"), source)

    def validate(self) -> None:
        """Checks across fields (single values are checked while loading)."""
        self.dist_config()
        discovery_config(self)
        host, _ = self.bind_hostport
        if self.insecure and not is_loopback_host(host):
            raise ConfigError(
                f"--insecure refuses to start unless bound to loopback (bind is {self.bind}); "
                "use --cluster-key-file for anything else"
            )


# --- [discovery]: how far mDNS offers may make this node dial (hostile site networks) ---------


class DiscoveryConfig(Table, frozen=True):
    """The [discovery] table: limits on what mDNS offers can make this node dial.

    Offers are retried per address, not per service name, so these bound a spoofer's reach.
    """

    max_offers: Annotated[int, msgspec.Meta(ge=1)] = 256  # mDNS service names tracked
    max_addresses: Annotated[int, msgspec.Meta(ge=1)] = 64  # IP:port candidates tracked
    max_dials: Annotated[int, msgspec.Meta(ge=1)] = 4  # join attempts in flight at once
    dial_rate: Annotated[float, msgspec.Meta(gt=0)] = 1.0  # new addresses dialed per second
    dial_burst: Annotated[int, msgspec.Meta(ge=1)] = 4  # ... and at once after a quiet spell
    dial_timeout: Annotated[float, Parsed(parse_duration), msgspec.Meta(gt=0)] = 5.0
    retry_base: Annotated[float, Parsed(parse_duration), msgspec.Meta(gt=0)] = 2.0
    retry_max: Annotated[float, Parsed(parse_duration), msgspec.Meta(gt=0)] = 300.0
    give_up_after: Annotated[int, msgspec.Meta(ge=1)] = 8  # failures; then only a new offer revives it

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, where: str = "[discovery]") -> DiscoveryConfig:
        return super().from_table(table, where)


def discovery_config(cfg: NodeConfig) -> DiscoveryConfig:
    """The node's [discovery] table, decoded."""
    return DiscoveryConfig.from_table(
        cfg.extra.get("discovery"), f"{cfg.source}: [discovery]" if cfg.source else "[discovery]"
    )


def _default_name() -> str:
    name = socket.gethostname().split(".")[0] or "meshd"
    return name if _NAME_RE.match(name) else "meshd"


# --- value parsers: (raw value, where) -> typed value ---------------------------------------


def _as_str(value: object, where: str) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")


def _as_name(value: object, where: str) -> str:
    text = _as_str(value, where)
    if not _NAME_RE.match(text):
        raise ConfigError(f"{where}: {text!r} is not a valid name (letters, digits, '.', '_', '-'; max 63)")
    return text


def _as_hostport(value: object, where: str) -> str:
    host, port = parse_hostport(value, where)
    return format_hostport(host, port)


def _as_api(value: object, where: str) -> str:
    host, port = parse_hostport(value, where, allow_zero=True)
    return format_hostport(host, port)


def _as_join(value: object, where: str) -> str:
    host, port = parse_hostport(value, where, default_port=DEFAULT_PORT)
    return format_hostport(host, port)


def _as_allow_host(value: object, where: str) -> str:
    allowed = parse_allow_host(value, where)
    host = f"[{allowed.host}]" if ":" in allowed.host else allowed.host
    return host if allowed.port is None else f"{host}:{allowed.port}"


def _as_upstream_url(value: object, where: str) -> str:
    """An upstream registry's base URL: http(s)://host[:port][/path], no query or credentials."""
    text = _as_str(value, where).rstrip("/")
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a URL") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {text!r}")
    if url.query or url.fragment or url.username or url.password:
        raise ConfigError(f"{where}: {text!r}: no query, fragment or credentials in an upstream URL")
    if port == 0:
        raise ConfigError(f"{where}: {text!r}: port 0")
    return text


def _as_cache_size(value: object, where: str) -> int:
    size = parse_size(value, where)
    if size < 1024 * 1024:
        raise ConfigError(f"{where}: at least 1MiB, got {value!r}")
    return size


def _as_bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _as_profile(value: object, where: str) -> str:
    text = _as_str(value, where).lower()
    if text not in PRESETS:
        raise ConfigError(f"{where}: unknown profile {text!r} (one of {', '.join(PRESETS)})")
    return text


def _as_log_level(value: object, where: str) -> str:
    text = _as_str(value, where).lower()
    if text not in LOG_LEVELS:
        raise ConfigError(f"{where}: unknown log level {text!r} (one of {', '.join(LOG_LEVELS)})")
    return text


def _as_log_format(value: object, where: str) -> str:
    text = _as_str(value, where).lower()
    if text not in LOG_FORMATS:
        raise ConfigError(f"{where}: unknown log format {text!r} (one of {', '.join(LOG_FORMATS)})")
    return text


def _as_path(value: object, where: str) -> str:
    return os.path.expanduser(_as_str(value, where))


def _as_ip(value: object, where: str) -> str:
    text = _as_str(value, where)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{where}: expected an interface IP address, got {text!r}") from None
    return text


def _split_tag(item: object, where: str) -> tuple[str, str]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{where}: expected KEY=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    k = k.strip()
    if not _TAG_KEY_RE.match(k):
        raise ConfigError(f"{where}: bad tag key {k!r} (letters, digits, '_', '.', '-')")
    return k, v.strip()


def _as_tags(value: object, where: str) -> dict[str, str]:
    """A TOML table {k = "v"}, a list of "k=v", or (env) a comma-separated "k=v,k2=v2"."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                raise ConfigError(f"{where}.{k}: tag values are strings, got {v!r}")
            k2, v2 = _split_tag(f"{k}={v}", where)
            out[k2] = v2
        return out
    items = _as_list(value, where)
    return dict(_split_tag(i, where) for i in items)


def _as_list(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list) and all(isinstance(i, str) for i in value):
        return [i.strip() for i in value if i.strip()]
    raise ConfigError(f"{where}: expected a list of strings, got {value!r}")


def _list_of(parse: Callable[[object, str], str]) -> Callable[[object, str], list[str]]:
    def parse_list(value: object, where: str) -> list[str]:
        return [parse(i, where) for i in _as_list(value, where)]

    return parse_list


def _table_list(value: object, where: str) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(i, dict) for i in value):
        return list(value)
    raise ConfigError(f"{where}: expected an array of tables ([[...]])")


_Unset = msgspec.UnsetType
_UNSET = msgspec.UNSET
_Name = Annotated[str | _Unset, Parsed(_as_name)]
_HostPort = Annotated[str | _Unset, Parsed(_as_hostport)]
_Path = Annotated[str | _Unset, Parsed(_as_path)]
_Switch = Annotated[bool | _Unset, Parsed(_as_bool)]
_Tables = Annotated[list[dict[str, Any]] | _Unset, Parsed(_table_list)]


class NodeTable(Table, frozen=True):
    """One layer of the node configuration: the file's top level, the MESHD_* environment or the
    flags. Every value is parsed the same way whatever its source; a key left out is UNSET (a
    lower layer or the default decides)."""

    name: _Name = _UNSET
    cluster: _Name = _UNSET
    bind: _HostPort = _UNSET
    advertise: _HostPort = _UNSET
    api: Annotated[str | _Unset, Parsed(_as_api)] = _UNSET
    registry: Annotated[str | _Unset, Parsed(_as_api)] = _UNSET
    registry_upstream: Annotated[list[str] | _Unset, Parsed(_list_of(_as_upstream_url))] = _UNSET
    registry_cache_max: Annotated[int | _Unset, Parsed(_as_cache_size)] = _UNSET
    registry_pass_tags: _Switch = _UNSET
    data_dir: _Path = _UNSET
    join: Annotated[list[str] | _Unset, Parsed(_list_of(_as_join))] = _UNSET
    site: _Name = _UNSET
    tags: Annotated[dict[str, str] | _Unset, Parsed(_as_tags)] = _UNSET  # also spelled "tag"
    mdns: _Switch = _UNSET
    no_mdns: _Switch = _UNSET
    mdns_interfaces: Annotated[list[str] | _Unset, Parsed(_list_of(_as_ip))] = _UNSET
    cluster_key_file: _Path = _UNSET
    insecure: _Switch = _UNSET
    profile: Annotated[str | _Unset, Parsed(_as_profile)] = _UNSET
    trust_publisher: Annotated[list[str] | _Unset, Parsed(_list_of(_as_path))] = _UNSET
    log_level: Annotated[str | _Unset, Parsed(_as_log_level)] = _UNSET
    log_format: Annotated[str | _Unset, Parsed(_as_log_format)] = _UNSET
    api_allow_hosts: Annotated[list[str] | _Unset, Parsed(_list_of(_as_allow_host))] = _UNSET
    # Tables (file only). [protocol] is decoded by ProtocolTable; the others are kept as written
    # for their owners: [[check]], [[query_handler]] (meshd.health.config), [dist], [health],
    # [discovery] (NodeConfig.extra).
    protocol: dict[str, Any] | _Unset = _UNSET
    check: _Tables = _UNSET
    query_handler: _Tables = _UNSET
    dist: Any = _UNSET
    health: Any = _UNSET
    discovery: Any = _UNSET


_ALIASES = {"tag": "tags", "mdns_interface": "mdns_interfaces", "api_allow_host": "api_allow_hosts"}
_TABLES = ("protocol", "check", "query_handler", "dist", "health", "discovery")
_PASSTHROUGH = ("dist", "health", "discovery")
# Tables whose keys are spelled either way (max-dials, max_dials): merged on the canonical key.
_CANONICAL_TABLES = ("dist", "health", "discovery")
# Keys the environment and flags may set (all but no_mdns are NodeConfig attributes).
_SCALAR_KEYS = tuple(k for k in table_keys(NodeTable) if k not in _TABLES)


def _count(value: object, where: str) -> int:
    """A non-negative integer: a TOML integer or (environment, flags) its digits."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and is_ascii_int(value.strip().lstrip("-")):
        number = int(value)
    else:
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if number < 0:
        raise ConfigError(f"{where}: must not be negative")
    return number


def _protocol_field(kind: object) -> object:
    if kind in ("int", int):
        return Annotated[int | _Unset, Parsed(_count)]
    return Annotated[float | _Unset, Parsed(parse_duration)]


# The [protocol] table: any field of ProtocolConfig, overriding the profile's preset.
ProtocolTable = cast(
    "type[Table]",
    msgspec.defstruct(
        "ProtocolTable",
        [(f.name, _protocol_field(f.type), _UNSET) for f in dataclasses.fields(ProtocolConfig)],
        bases=(Table,),
        frozen=True,
        module=__name__,
    ),
)


def _set_values(table: Table) -> dict[str, Any]:
    return {k: v for k in table_keys(type(table)) if (v := getattr(table, k)) is not _UNSET}


@dataclass
class _Layer:
    """What one source sets: NodeTable keys and [protocol] overrides, already parsed."""

    values: dict[str, Any]
    protocol: dict[str, float | int]


def _layer(
    values: Mapping[str, Any], protocol: Mapping[str, Any], label: Label, protocol_label: Label
) -> tuple[NodeTable, _Layer]:
    table = decode(values, NodeTable, label)
    settings = _set_values(table)
    for key in _TABLES:
        settings.pop(key, None)
    if "no_mdns" in settings:
        settings["mdns"] = not settings.pop("no_mdns")
    overrides = _set_values(decode(protocol, ProtocolTable, protocol_label))
    return table, _Layer(settings, overrides)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CONFIG_FILE + 1)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from None
    if len(data) > _MAX_CONFIG_FILE:
        raise ConfigError(f"config file {path}: larger than {_MAX_CONFIG_FILE} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def drop_in_files(path: str) -> list[str]:
    """FILE's drop-ins: `<dir>/<stem>.d/*.toml` (meshd.toml -> meshd.d/), in lexical order of
    their names; none when the directory is absent."""
    main = Path(path)
    folder = main.with_name(f"{main.stem}.d")
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".toml") and e.is_file())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"config directory {folder}: {e.strerror or e}") from None
    return [str(folder / n) for n in names if not n.startswith(".")]


@dataclass
class _Doc:
    """One file's keys, canonical, with where each was last set (for error messages)."""

    values: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # key or "protocol.key" -> "FILE: key 'k'"


def _doc(path: str) -> _Doc:
    doc = _Doc()
    for raw_key, value in _read_toml(path).items():
        key = canonical_key(raw_key)
        key = _ALIASES.get(key, key)
        if key == "protocol":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: key '{raw_key}': expected a [protocol] table")
            for pk, pv in value.items():
                doc.protocol[canonical_key(pk)] = pv
                doc.origin[f"protocol.{canonical_key(pk)}"] = f"{path}: key 'protocol.{pk}'"
            continue
        doc.values[key] = value
        doc.origin[key] = f"{path}: key '{raw_key}'"
    return doc


def _check_alone(path: str, doc: _Doc) -> None:
    """A file is checked on its own first, so a bad drop-in is named, not the merged result."""
    _layer(doc.values, doc.protocol, lambda k: doc.origin.get(k, f"{path}: key '{k}'"), _protocol_label(doc))
    DistConfig.from_table(doc.values.get("dist"), f"{path}: [dist]")
    DiscoveryConfig.from_table(doc.values.get("discovery"), f"{path}: [discovery]")


def _protocol_label(doc: _Doc) -> Label:
    return lambda k: doc.origin.get(f"protocol.{k}", f"key 'protocol.{k}'")


def _merge(base: _Doc, over: _Doc) -> None:
    """Later keys win; tables are merged key by key; [[check]] and [[query_handler]] add up."""
    for key, value in over.values.items():
        old = base.values.get(key)
        if key in ("check", "query_handler") and old is not None:
            base.values[key] = _as_tables(old) + _as_tables(value)
        elif isinstance(old, dict) and isinstance(value, dict):
            base.values[key] = _merged_tables(old, value, canonical=key in _CANONICAL_TABLES)
        else:
            base.values[key] = value
    base.protocol.update(over.protocol)
    base.origin.update(over.origin)


def _as_tables(value: object) -> list[Any]:
    return [value] if isinstance(value, dict) else list(value) if isinstance(value, list) else [value]


def _merged_tables(old: dict[str, Any], new: dict[str, Any], canonical: bool) -> dict[str, Any]:
    """`new` over `old`; with `canonical`, max-dials replaces max_dials (the later spelling stays,
    for messages)."""
    out = dict(old)
    for k, v in new.items():
        if canonical:
            same = [o for o in out if canonical_key(o) == canonical_key(k)]
            prev = out.pop(same[0]) if same else None
        else:
            prev = out.get(k)
        out[k] = _merged_tables(prev, v, canonical) if isinstance(prev, dict) and isinstance(v, dict) else v
    return out


def _file_layer(path: str) -> tuple[_Layer, NodeConfig]:
    """FILE then its drop-ins, merged into one layer; the NodeConfig carries the passthrough
    tables and the list of files read."""
    merged = _Doc()
    sources = [path, *drop_in_files(path)]
    for source in sources:
        doc = _doc(source)
        _check_alone(source, doc)
        _merge(merged, doc)
    table, layer = _layer(
        merged.values,
        merged.protocol,
        lambda key: merged.origin.get(key, f"{path}: key '{key}'"),
        _protocol_label(merged),
    )
    holder = NodeConfig(name="meshd")
    if table.check is not _UNSET:
        holder.checks = table.check
    if table.query_handler is not _UNSET:
        holder.query_handlers = table.query_handler
    holder.extra = {k: v for k in _PASSTHROUGH if (v := getattr(table, k)) is not _UNSET}
    holder.sources = sources
    return layer, holder


def _env_layer(env: Mapping[str, str]) -> _Layer:
    """MESHD_<KEY> variables. Unknown MESHD_* names are left alone: meshctl shares the prefix."""
    names: dict[str, str] = {}
    values: dict[str, str] = {}
    protocol_names: dict[str, str] = {}
    protocol: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith("MESHD_"):
            continue
        key = name[len("MESHD_") :].lower()
        key = _ALIASES.get(key, key)
        if key.startswith("protocol__"):
            pkey = key[len("protocol__") :]
            protocol_names[pkey], protocol[pkey] = name, value
        elif key in _SCALAR_KEYS:
            names[key], values[key] = name, value
    _, layer = _layer(
        values,
        protocol,
        lambda key: f"environment variable {names.get(key, key)}",
        lambda key: f"environment variable {protocol_names.get(key, key)}",
    )
    return layer


# Flag name (argparse dest) -> config key, for `meshd run` flags.
FLAG_KEYS: dict[str, str] = {
    "name": "name",
    "cluster": "cluster",
    "bind": "bind",
    "advertise": "advertise",
    "api": "api",
    "registry": "registry",
    "registry_upstream": "registry_upstream",
    "registry_cache_max": "registry_cache_max",
    "data_dir": "data_dir",
    "join": "join",
    "site": "site",
    "tag": "tag",
    "mdns_interface": "mdns_interface",
    "cluster_key_file": "cluster_key_file",
    "profile": "profile",
    "trust_publisher": "trust_publisher",
    "log_level": "log_level",
    "log_format": "log_format",
    "api_allow_host": "api_allow_host",
}


def _flag_layer(flags: Mapping[str, Any]) -> _Layer:
    """Flags as parsed by argparse; None (or an empty repeatable list) means not given."""
    flag_names: dict[str, str] = {}
    values: dict[str, Any] = {}
    for dest, key in FLAG_KEYS.items():
        value = flags.get(dest)
        if value is None or value == []:
            continue
        key = _ALIASES.get(key, key)
        flag_names[key], values[key] = f"--{dest.replace('_', '-')}", value
    for switch in (
        "no_mdns",
        "insecure",
        "registry_pass_tags",
    ):  # store_true flags: only "given" says something
        if flags.get(switch):
            flag_names[switch], values[switch] = f"--{switch.replace('_', '-')}", True
    protocol_names: dict[str, str] = {}
    protocol: dict[str, str] = {}
    for item in flags.get("protocol") or []:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"--protocol: expected KEY=VALUE, got {item!r}")
        pk, pv = item.split("=", 1)
        pkey = canonical_key(pk)
        protocol_names[pkey], protocol[pkey] = f"--protocol {pk}", pv.strip()
    _, layer = _layer(
        values, protocol, lambda key: flag_names.get(key, key), lambda key: protocol_names.get(key, key)
    )
    return layer


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> NodeConfig:
    """Merge defaults, the TOML file, the environment and flags (later wins) and validate."""
    flags = flags or {}
    env = os.environ if env is None else env
    path = config_file or flags.get("config") or env.get("MESHD_CONFIG") or None
    layers: list[_Layer] = []
    cfg = NodeConfig()
    if path:
        file_layer, holder = _file_layer(str(path))
        layers.append(file_layer)
        cfg.checks, cfg.query_handlers = holder.checks, holder.query_handlers
        cfg.extra = holder.extra
        cfg.source = str(path)
        cfg.sources = holder.sources
    layers.append(_env_layer(env))
    layers.append(_flag_layer(flags))
    for layer in layers:
        for attr, value in layer.values.items():
            setattr(cfg, attr, value)
        cfg.protocol_overrides.update(layer.protocol)
    cfg.validate()
    try:
        cfg.protocol()
    except (TypeError, ValueError) as e:  # dataclasses.replace on a bad override
        raise ConfigError(f"protocol: {e}") from None
    return cfg


def data_path(cfg: NodeConfig, *parts: str) -> Path:
    return Path(cfg.data_dir).joinpath(*parts)
