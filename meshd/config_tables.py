"""Configuration tables as msgspec Structs: the one way meshd validates configuration.

Each table (the node's top level, [protocol], [dist], [[check]], [[query_handler]]) is a `Table`
Struct: unknown keys are refused, a key without a default is required. Values people write in units
(durations, rates, host:port, names, ...) are parsed before msgspec checks the types: such a
field is `Annotated[<type>, Parsed(parser)]`, the parser being a `(value, where) -> value`
function like those of meshd.units. msgspec's ValidationError becomes a ConfigError that names
the key the way its source spells it (a file key, an environment variable, a flag).
"""

from __future__ import annotations

import functools
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec

from meshd.errors import ConfigError

__all__ = ["Label", "Parsed", "Table", "canonical_key", "decode", "refuse_unknown_keys", "table_keys"]

T = TypeVar("T", bound="Table")
# How an error names a key of the table: key -> "config.toml: key 'bind'", "--bind", ...
Label = Callable[[str], str]


class Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the configuration tables: read-only values."""

    @classmethod
    def from_table(cls: type[TableT], table: Mapping[str, Any] | None, where: str) -> TableT:
        """The table as written (max-dials or max_dials); errors name `where` and the key."""
        if not table:
            return cls()
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        spelled = {canonical_key(k): str(k) for k in table}
        values = {canonical_key(k): v for k, v in table.items()}
        return decode(values, cls, lambda key: f"{where} {spelled.get(key, key)}")


TableT = TypeVar("TableT", bound=Table)


@dataclass(frozen=True)
class Parsed:
    """Field metadata: `parse(raw value, where)` turns what people write into the field's type."""

    parse: Callable[[Any, str], Any]


def canonical_key(key: object) -> str:
    """Keys are case-insensitive and '-' is '_' (data-dir, data_dir)."""
    return str(key).strip().lower().replace("-", "_")


def table_keys(cls: type[Table]) -> tuple[str, ...]:
    return tuple(cls.__struct_fields__)


def decode(table: Mapping[str, Any], cls: type[T], label: Label) -> T:
    """A table (keys already canonical) -> `cls`; ConfigError names the key through `label`."""
    raw = dict(table)
    for key, parse in _parsers(cls).items():
        if key in raw:
            raw[key] = parse(raw[key], label(key))
    try:
        return msgspec.convert(raw, cls)
    except msgspec.ValidationError as e:
        raise ConfigError(_message(str(e), table, cls, label)) from None


def refuse_unknown_keys(table: Mapping[str, Any], cls: type[Table], label: Label) -> None:
    """What decode() says about unknown keys, for a table that is not decoded (a disabled check)."""
    for key in table:
        if key not in cls.__struct_fields__:
            raise ConfigError(_unknown_key(key, cls, label))


def _unknown_key(key: str, cls: type[Table], label: Label) -> str:
    return f"{label(key)}: unknown key (known: {', '.join(sorted(table_keys(cls)))})"


@functools.cache
def _parsers(cls: type[Table]) -> dict[str, Callable[[Any, str], Any]]:
    parsers = {}
    for f in msgspec.structs.fields(cls):
        if typing.get_origin(f.type) is Annotated:
            for meta in typing.get_args(f.type)[1:]:
                if isinstance(meta, Parsed):
                    parsers[f.name] = meta.parse
    return parsers


_AT_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<key>[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<key>[^`]*)`$")
_EXPECTED_RE = re.compile(r"^Expected `(?P<types>[^`]*)`(?P<rest>.*?)(?:, got `[^`]*`)?$")
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
    "null": "nothing",
}


def _message(error: str, table: Mapping[str, Any], cls: type[Table], label: Label) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.keep`" -> "<label of keep>: expected an integer >= 1,
    got 0"; unknown and missing keys are named the same way."""
    m = _AT_RE.match(error)
    msg, path = (m["msg"], m["path"] or "") if m else (error, "")
    if unknown := _UNKNOWN_RE.match(msg):
        if not path:
            return _unknown_key(unknown["key"], cls, label)
        key, rest = _split_path(path)
        return f"{label(key)}: unknown key {unknown['key']!r} (at {rest or '.'})"
    if missing := _MISSING_RE.match(msg):
        return f"{label(missing['key'])}: missing"
    key, rest = _split_path(path)
    if expected := _EXPECTED_RE.match(msg):
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in expected["types"].split(" | "))
        msg = f"expected {words}{expected['rest']}"
    if rest:  # inside a list or sub-table: msgspec's words and where, not the whole value
        return f"{label(key)}: {msg} (at {rest})"
    return f"{label(key)}: {msg}, got {table.get(key)!r}"


def _split_path(path: str) -> tuple[str, str]:
    """ ".x[0].keep" -> ("x", "[0].keep")."""
    path = path.removeprefix(".")
    end = min((i for i in (path.find("."), path.find("[")) if i >= 0), default=len(path))
    return path[:end], path[end:]
