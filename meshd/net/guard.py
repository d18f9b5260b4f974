"""Connection guard for a TCP server: caps and deadlines that cost an unknown host a fixed amount.

`ConnectionGuard` is the sans-IO part: it admits or refuses a new connection (a global cap and a
cap per source address; when the global cap is full an idle connection of the source holding
the most is dropped instead), and knows each connection's deadline:

    headers  from connect (or from the first byte after an idle spell) until a request reaches
             its handler: `header_timeout`
    active   a request is in its handler: no deadline here (the body deadline is the gate's)
    idle     after a response, waiting for the next request: `idle_timeout`

`GuardedProtocol` / `Guard` are the shell: an asyncio Protocol that wraps aiohttp's request
handler, a middleware that marks "request in handler", and one periodic sweep that closes what
is past its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar, cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from meshd.metrics import Exposition

log = logging.getLogger("meshd.peer")

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class GuardLimits:
    max_conns: int = 512  # open connections in all (the process has ~1024 fds)
    max_per_source: int = 32  # open connections from one source address
    header_timeout: float = 10.0  # connect (or first byte) -> request in its handler
    idle_timeout: float = 15.0  # keep-alive connection with no request


class Phase(Enum):
    HEADERS = "headers"
    ACTIVE = "active"
    IDLE = "idle"


@dataclass
class GuardStats:
    refused_global: int = 0
    refused_per_source: int = 0
    evicted: int = 0
    header_timeouts: int = 0
    idle_timeouts: int = 0
    open: int = 0

    def collect_metrics(self, out: Exposition) -> None:
        out.labelled(
            "meshd_tcp_refused_total",
            "counter",
            "peer TCP connections closed at accept, by reason",
            [
                ({"reason": "global"}, self.refused_global),
                ({"reason": "per_source"}, self.refused_per_source),
            ],
        )
        out.counter(
            "meshd_tcp_evicted_total", "idle peer TCP connections dropped to admit another", self.evicted
        )
        out.labelled(
            "meshd_tcp_timeouts_total",
            "counter",
            "peer TCP connections closed at a deadline, by phase",
            [({"phase": "header"}, self.header_timeouts), ({"phase": "idle"}, self.idle_timeouts)],
        )
        out.gauge("meshd_tcp_connections", "peer TCP connections open now", self.open)


@dataclass
class _Conn:
    source: str
    opened: float
    phase: Phase = Phase.HEADERS
    deadline: float = 0.0


@dataclass
class Admission(Generic[K]):
    admitted: bool
    evict: K | None = None  # close this one first (it was idle, its source held the most)
    reason: str = ""  # why refused: "global" or "per_source"


@dataclass
class ConnectionGuard(Generic[K]):
    """The caps and deadlines of one server's connections, keyed by any hashable handle."""

    limits: GuardLimits = field(default_factory=GuardLimits)
    stats: GuardStats = field(default_factory=GuardStats)
    _conns: dict[K, _Conn] = field(default_factory=dict)
    _by_source: dict[str, dict[K, None]] = field(default_factory=dict)  # insertion order = age

    def __len__(self) -> int:
        return len(self._conns)

    def count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def phase(self, key: K) -> Phase | None:
        c = self._conns.get(key)
        return c.phase if c else None

    def open(self, key: K, source: str, now: float) -> Admission[K]:
        """Admit a new connection (and say which idle one to drop for it) or refuse it."""
        held = self.count(source)
        if held >= self.limits.max_per_source:
            self.stats.refused_per_source += 1
            return Admission(False, reason="per_source")
        victim: K | None = None
        if len(self._conns) >= self.limits.max_conns:
            victim = self._victim(held)
            if victim is None:
                self.stats.refused_global += 1
                return Admission(False, reason="global")
            self.stats.evicted += 1
            self.close(victim)
        self._conns[key] = _Conn(source, now, Phase.HEADERS, now + self.limits.header_timeout)
        self._by_source.setdefault(source, {})[key] = None
        self.stats.open = len(self._conns)
        return Admission(True, evict=victim)

    def _victim(self, newcomer_holds: int) -> K | None:
        """The oldest connection not in a handler, of the source holding the most (and more
        than the newcomer would: a flood from many sources does not churn everyone else)."""
        for _, keys in sorted(self._by_source.items(), key=lambda kv: -len(kv[1])):
            if len(keys) <= newcomer_holds + 1:
                return None
            for key in keys:
                if self._conns[key].phase is not Phase.ACTIVE:
                    return key
        return None

    def data(self, key: K, now: float) -> None:
        """Bytes arrived: an idle connection starts a request and gets the header deadline."""
        c = self._conns.get(key)
        if c is not None and c.phase is Phase.IDLE:
            c.phase = Phase.HEADERS
            c.deadline = now + self.limits.header_timeout

    def request_started(self, key: K) -> None:
        c = self._conns.get(key)
        if c is not None:
            c.phase = Phase.ACTIVE

    def request_done(self, key: K, now: float) -> None:
        c = self._conns.get(key)
        if c is not None and c.phase is Phase.ACTIVE:
            c.phase = Phase.IDLE
            c.deadline = now + self.limits.idle_timeout

    def postpone(self, key: K, now: float) -> None:
        """Still writing a response: the idle clock starts again."""
        c = self._conns.get(key)
        if c is not None and c.phase is Phase.IDLE:
            c.deadline = now + self.limits.idle_timeout

    def close(self, key: K) -> None:
        c = self._conns.pop(key, None)
        if c is None:
            return
        keys = self._by_source.get(c.source)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_source[c.source]
        self.stats.open = len(self._conns)

    def expired(self, now: float) -> list[tuple[K, Phase]]:
        """Connections past their deadline (still tracked: the caller closes them)."""
        return [
            (k, c.phase) for k, c in self._conns.items() if c.phase is not Phase.ACTIVE and c.deadline <= now
        ]

    def timed_out(self, key: K, phase: Phase) -> None:
        """Count and forget a connection closed at its deadline."""
        if phase is Phase.HEADERS:
            self.stats.header_timeouts += 1
        else:
            self.stats.idle_timeouts += 1
        self.close(key)


# --- the asyncio shell ---------------------------------------------------------------------------


def _source(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else "unknown"


class GuardedProtocol(asyncio.Protocol):
    """Wraps the real protocol (aiohttp's RequestHandler): created only once admitted."""

    def __init__(self, guard: Guard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance here.
        transport = cast(asyncio.Transport, transport)
        if not self._guard.admit(transport):
            transport.abort()  # refused: no request handler, no buffers
            return
        self._transport = transport
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None and self._transport is not None:
            self._guard.data(self._transport)
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.lost(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)
        self._inner = None
        self._transport = None


class Guard:
    """The shell of a ConnectionGuard on one event loop: admission, the sweep, the middleware."""

    def __init__(self, limits: GuardLimits | None = None, stats: GuardStats | None = None) -> None:
        self.core: ConnectionGuard[asyncio.Transport] = ConnectionGuard(
            limits or GuardLimits(), stats or GuardStats()
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._middleware = self._make_middleware()

    @property
    def limits(self) -> GuardLimits:
        return self.core.limits

    @property
    def stats(self) -> GuardStats:
        return self.core.stats

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: GuardedProtocol(self, inner)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def admit(self, transport: asyncio.Transport) -> bool:
        verdict = self.core.open(transport, _source(transport), self._now())
        if verdict.evict is not None:
            verdict.evict.abort()
        if not verdict.admitted:
            log.debug("refused a connection from %s (%s)", _source(transport), verdict.reason)
        return verdict.admitted

    def data(self, transport: asyncio.Transport) -> None:
        self.core.data(transport, self._now())

    def lost(self, transport: asyncio.Transport) -> None:
        self.core.close(transport)

    def start(self) -> None:
        lim = self.limits
        # Deadlines are met to within a quarter of the shorter one (and at most a second late).
        tick = min(1.0, max(0.02, min(lim.header_timeout, lim.idle_timeout) / 4))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_every(tick))

    async def _sweep_every(self, tick: float) -> None:
        while True:
            await asyncio.sleep(tick)
            self.sweep()

    def sweep(self) -> None:
        now = self._now()
        for transport, phase in self.core.expired(now):
            if phase is Phase.IDLE and transport.get_write_buffer_size() > 0:
                self.core.postpone(transport, now)  # a reply is still going out
                continue
            self.core.timed_out(transport, phase)
            transport.abort()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    @property
    def middleware(self) -> Middleware:
        """A request reached its handler: no header deadline until it is done (outermost)."""
        return self._middleware

    def _make_middleware(self) -> Middleware:
        @web.middleware
        async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            transport = request.transport
            if transport is None:  # the client is gone already
                return await handler(request)
            self.core.request_started(transport)
            try:
                return await handler(request)
            finally:
                self.core.request_done(transport, self._now())

        return guard_middleware
