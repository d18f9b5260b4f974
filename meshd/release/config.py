"""The [dist] table of the node configuration: how releases are kept, fetched and served."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from meshd.config_tables import Parsed, Table
from meshd.core.swarm import SwarmConfig
from meshd.errors import ConfigError
from meshd.units import parse_duration, parse_rate, parse_size


def parse_hook(value: object, where: str) -> tuple[str, ...] | None:
    """The activation hook: a command line (one string, run as is) or a list of arguments."""
    if isinstance(value, str):
        return (value,) if value.strip() else None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a command (string or list of strings)")


Duration = Annotated[float, Parsed(parse_duration)]
Rate = Annotated[float | None, Parsed(parse_rate)]  # bytes per second; None: unlimited
Size = Annotated[int, Parsed(parse_size)]  # bytes

MiB = 1024 * 1024


class DistConfig(Table, frozen=True):
    """The [dist] table of the node configuration."""

    keep: Annotated[int, msgspec.Meta(ge=1)] = 3
    hook: Annotated[tuple[str, ...] | None, Parsed(parse_hook)] = None
    hook_timeout: Duration = 60.0
    upload_rate: Rate = None  # bytes per second served to peers
    download_rate: Rate = None  # bytes per second fetched
    origin_delay: Duration = 30.0
    fsync: bool = True
    announce_interval: Duration = 1.0
    # Free space left on the data dir's file system after a release is stored and materialised:
    # a release that would leave less is not fetched until there is room (release/space.py).
    min_free: Size = 32 * MiB

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, where: str = "[dist]") -> DistConfig:
        return super().from_table(table, where)

    def swarm_config(self) -> SwarmConfig:
        return SwarmConfig(origin_delay=self.origin_delay, rate_limit=self.download_rate)
