"""What the operator API needs from the running daemon: the `Agent` protocol and its app key.

Route modules (app.py, queries.py, release/api.py) read the agent through `request.app[AGENT]`;
tests drive them with a fake that satisfies the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from aiohttp import web

from meshd.core.messages import MemberState
from meshd.metrics import Exposition, TransferStats

__all__ = ["AGENT", "Agent", "EventLike", "MemberLike", "SubscriptionLike"]


class MemberLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def addr(self) -> str: ...
    @property
    def state(self) -> MemberState: ...
    @property
    def incarnation(self) -> int: ...
    @property
    def meta(self) -> dict[str, str]: ...


class EventLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def member(self) -> MemberLike | None: ...  # None for shell events that carry a payload


class SubscriptionLike(Protocol):
    async def get(self) -> EventLike: ...
    def close(self) -> None: ...


class Agent(Protocol):
    """What the API needs from the running daemon."""

    name: str
    node_id: str
    cluster: str
    site: str
    addr: str
    addr_source: str
    api_token: str
    transfer: TransferStats

    def uptime(self) -> float: ...
    def is_ready(self) -> bool: ...
    def readiness_detail(self) -> str: ...
    def clock_skew(self) -> dict[str, Any]: ...  # peers whose clocks differ from ours (Node)
    def members(self) -> Sequence[MemberLike]: ...
    def subscribe(self) -> SubscriptionLike: ...
    async def join(self, addrs: list[str]) -> int: ...
    def request_leave(self) -> None: ...
    # Re-read the configuration (as SIGHUP): {"ok", "applied", "restart_needed", "error"}.
    async def reload(self) -> dict[str, Any]: ...
    def keys(self) -> tuple[list[str], str] | None: ...
    def key_op(self, op: str, key: bytes) -> None: ...
    def collect_metrics(self, out: Exposition) -> None: ...


AGENT = web.AppKey("agent", Agent)
