"""What a health check is: statuses, kinds, limits and the specs the monitor runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

Status = Literal["passing", "warning", "critical"]
STATUSES: Final[tuple[Status, ...]] = ("passing", "warning", "critical")
RANK: Final[Mapping[str, int]] = {s: i for i, s in enumerate(STATUSES)}

CHECK_OUTPUT_LIMIT: Final = 4096  # Consul's default OutputMaxSize
HANDLER_OUTPUT_LIMIT: Final = 32 * 1024
HEALTH_ANSWER_LIMIT: Final = 192 * 1024  # stays below the query engine's max_response_size
DEFAULT_INTERVAL: Final = 10.0
DEFAULT_TIMEOUT: Final = 10.0
MIN_INTERVAL: Final = 0.1
HEALTH_QUERY: Final = "health"  # the built-in query; no handler may take its name

COMMAND, HTTP, TCP, LOAD, MEMORY, DISK, LOOP_LAG = (
    "command",
    "http",
    "tcp",
    "load",
    "memory",
    "disk",
    "loop_lag",
)
KINDS: Final = (COMMAND, HTTP, TCP, LOAD, MEMORY, DISK, LOOP_LAG)
# kind -> (default warning, default critical, True when a higher value is worse)
THRESHOLDS: Final[Mapping[str, tuple[float, float, bool]]] = {
    LOAD: (2.0, 4.0, True),
    LOOP_LAG: (0.1, 0.5, True),
    MEMORY: (10.0, 5.0, False),
    DISK: (10.0, 5.0, False),
}


def worst(statuses: Iterable[str]) -> Status:
    """The worst of some statuses ("passing" when there are none)."""
    rank = max((RANK[s] for s in statuses), default=0)
    return STATUSES[rank]


@dataclass(frozen=True)
class CheckSpec:
    name: str
    kind: str
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    command: tuple[str, ...] | str | None = None  # a string runs through /bin/sh -c
    url: str | None = None
    addr: str | None = None
    path: str | None = None
    warning: float | None = None
    critical: float | None = None


@dataclass(frozen=True)
class HandlerSpec:
    name: str
    command: tuple[str, ...] | str
    timeout: float = DEFAULT_TIMEOUT


def builtin_checks(data_dir: str) -> list[CheckSpec]:
    def spec(name: str, kind: str, path: str | None = None) -> CheckSpec:
        warning, critical, _ = THRESHOLDS[kind]
        return CheckSpec(name, kind, 10.0, 5.0, path=path, warning=warning, critical=critical)

    return [
        spec("load", LOAD),
        spec("memory", MEMORY),
        spec("disk-data", DISK, data_dir),
        spec("disk-root", DISK, "/"),
        spec("loop-lag", LOOP_LAG),
    ]
