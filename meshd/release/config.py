"""The [dist] table of the node configuration: how releases are kept, fetched and served."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshd.core.swarm import SwarmConfig
from meshd.errors import ConfigError
from meshd.units import parse_duration, parse_rate


@dataclass(frozen=True)
class DistConfig:
    """The [dist] table of the node configuration."""

    keep: int = 3
    hook: tuple[str, ...] | None = None
    hook_timeout: float = 60.0
    upload_rate: float | None = None  # bytes per second served to peers
    download_rate: float | None = None  # bytes per second fetched
    origin_delay: float = 30.0
    fsync: bool = True
    announce_interval: float = 1.0

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, where: str = "[dist]") -> DistConfig:
        if not table:
            return cls()
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        out: dict[str, Any] = {}
        for raw, value in table.items():
            key = str(raw).strip().lower().replace("-", "_")
            at = f"{where} {raw}"
            if key == "keep":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{at}: expected an integer >= 1, got {value!r}")
                out["keep"] = value
            elif key == "hook":
                if isinstance(value, str):
                    out["hook"] = (value,) if value.strip() else None
                elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                    out["hook"] = tuple(value)
                else:
                    raise ConfigError(f"{at}: expected a command (string or list of strings)")
            elif key in ("hook_timeout", "origin_delay", "announce_interval"):
                out[key] = parse_duration(value, at)
            elif key in ("upload_rate", "download_rate"):
                out[key] = parse_rate(value, at)
            elif key == "fsync":
                if not isinstance(value, bool):
                    raise ConfigError(f"{at}: expected true or false")
                out["fsync"] = value
            else:
                known = "keep, hook, hook_timeout, upload_rate, download_rate, origin_delay, fsync"
                raise ConfigError(f"{at}: unknown key (known: {known})")
        return cls(**out)

    def swarm_config(self) -> SwarmConfig:
        return SwarmConfig(origin_delay=self.origin_delay, rate_limit=self.download_rate)
