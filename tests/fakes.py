"""Test doubles shared by the API, CLI and discovery tests, built on the real types.

Members are the core's own `MemberView`; `FakeAgent` is the daemon as the API sees it (the
`meshd.api.agent.Agent` protocol, plus `run_query` for the query routes); `FakeHost` is the
daemon as mDNS discovery sees it (`meshd.discovery.DiscoveryHost`); `StandInCore` and
`SentDatagrams` are the membership core and the UDP socket as the runtime sees them;
`FakeReleases` is the release service as the peer routes see it (`meshd.release.peer.PeerBackend`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshd.core.aggregate import SiteResult
from meshd.core.config import LOCAL
from meshd.core.counters import Counters
from meshd.core.effects import MembershipEffect, SendDatagram
from meshd.core.messages import MemberState, QueryFilter
from meshd.core.node import MemberView
from meshd.core.query import QueryAnswer, QueryResult
from meshd.errors import StateError
from meshd.metrics import Exposition, TransferStats
from meshd.release.peer import piece_buffer
from meshd.release.serve import UploadSlots
from meshd.release.store import ChunkStore, DiskFullError, Place, PutResult
from meshd.wire import Codec


class Midpoint(random.Random):
    """A random source without jitter: uniform(a, b) is the middle, so back-offs are nominal."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


class FakeDisk:
    """An injected free-space function (release/space.py FreeSpace): `free` bytes whatever the
    path; counts its calls, so a test can see the watch poll."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, path: object) -> int:
        self.calls += 1
        return self.free


TOKEN = "s3cret-token-value-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def member(
    name: str,
    state: MemberState = MemberState.ALIVE,
    *,
    node_id: str | None = None,
    addr: str = "127.0.0.1:1",
    incarnation: int = 1,
    meta: dict[str, str] | None = None,
    site: str | None = None,
    **tags: str,
) -> MemberView:
    """A member as the core reports it; `site` and `tags` go into its gossiped meta."""
    meta = dict(meta or {})
    if site is not None:
        meta["site"] = site
    meta.update({f"tag:{k}": v for k, v in tags.items()})
    return MemberView(name, node_id or name * 4, addr, state, incarnation, meta, 0.0)


@dataclass(frozen=True)
class FakeEvent:
    kind: str
    member: MemberView | None


class FakeSubscription:
    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.queue: asyncio.Queue[FakeEvent] = asyncio.Queue()

    async def get(self) -> FakeEvent:
        return await self.queue.get()

    def close(self) -> None:
        self.agent.subs.remove(self)


@dataclass
class FakeAgent:
    """The daemon behind the operator API: answers from its fields, records what it was asked."""

    name: str = "n1"
    node_id: str = "ab" * 16
    cluster: str = "test"
    site: str = "factory"
    addr: str = "127.0.0.1:7788"
    addr_source: str = "bind address"
    api_token: str = TOKEN
    transfer: TransferStats = field(default_factory=TransferStats)
    people: list[MemberView] = field(default_factory=list)
    uptime_s: float = 1.0
    ready: bool = True
    join_result: int | None = 1  # None: as many as it was given
    joined_with: list[list[str]] = field(default_factory=list)
    leave_requested: int = 0
    reloads: int = 0
    reload_outcome: dict[str, Any] = field(
        default_factory=lambda: {"ok": True, "applied": ["tags"], "restart_needed": [], "error": None}
    )
    ring: list[bytes] | None = None  # None: an --insecure node
    subs: list[FakeSubscription] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)  # core counters for /metrics
    skew: dict[str, Any] = field(default_factory=lambda: {"peers": 0, "max_offset_s": 0.0})
    # run_query
    asked: list[tuple[str, bytes, QueryFilter, float | None, int]] = field(default_factory=list)
    answers: list[QueryAnswer] = field(default_factory=list)
    missing: tuple[str, ...] = ()
    sites: tuple[SiteResult, ...] = ()  # the result's, for an aggregated query
    aggregates: list[str] = field(default_factory=list)  # run_query's aggregate, per call
    raises: Exception | None = None
    gate: asyncio.Event | None = None

    def uptime(self) -> float:
        return self.uptime_s

    def is_ready(self) -> bool:
        return self.ready

    def readiness_detail(self) -> str:
        return "joined" if self.ready else "joining"

    def clock_skew(self) -> dict[str, Any]:
        return self.skew

    def members(self) -> list[MemberView]:
        return self.people

    def subscribe(self) -> FakeSubscription:
        sub = FakeSubscription(self)
        self.subs.append(sub)
        return sub

    async def join(self, addrs: list[str]) -> int:
        self.joined_with.append(addrs)
        return len(addrs) if self.join_result is None else self.join_result

    def request_leave(self) -> None:
        self.leave_requested += 1

    async def reload(self) -> dict[str, Any]:
        self.reloads += 1
        return self.reload_outcome

    def keys(self) -> tuple[list[str], str] | None:
        if self.ring is None:
            return None
        return [k[:4].hex() for k in self.ring], self.ring[0][:4].hex()

    def key_op(self, op: str, key: bytes) -> None:
        assert self.ring is not None
        if op == "install":
            self.ring.append(key)
        elif op == "use":
            if key not in self.ring:
                raise StateError("not installed")
            self.ring.remove(key)
            self.ring.insert(0, key)
        elif op == "remove":
            if key == self.ring[0]:
                raise StateError("primary")
            self.ring.remove(key)

    def collect_metrics(self, out: Exposition) -> None:
        states = [s.name.lower() for s in MemberState]
        out.labelled(
            "meshd_members",
            "gauge",
            "members by state",
            [({"state": s}, sum(1 for m in self.people if m.state.name.lower() == s)) for s in states],
        )
        out.core_counters(self.counters)

    async def run_query(
        self,
        name: str,
        payload: bytes,
        filters: QueryFilter,
        timeout: float | None,
        relay_factor: int,
        aggregate: str = "",
    ) -> QueryResult:
        self.asked.append((name, payload, filters, timeout, relay_factor))
        self.aggregates.append(aggregate)
        if self.gate is not None:
            await self.gate.wait()
        if self.raises is not None:
            raise self.raises
        return QueryResult(
            7,
            name,
            tuple(self.answers),
            self.missing,
            42.25,
            bool(self.missing),
            self.sites if aggregate else (),
        )


@dataclass
class FakeHost:
    """The daemon behind mDNS discovery: who it is, its members, and the joins it was asked for."""

    name: str
    cluster: str
    addr: str
    site: str = "lo"
    node_id: str = ""
    mdns_interfaces: list[str] = field(default_factory=list)
    people: Sequence[MemberView] = ()
    join_result: int = 1
    joins: list[list[str]] = field(default_factory=list)
    join_timeouts: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node_id = self.node_id or f"id-{self.name}"

    def members(self) -> Sequence[MemberView]:
        return self.people

    async def join(self, addrs: list[str], timeout: float | None = None) -> int:
        self.joins.append(addrs)
        self.join_timeouts.append(timeout)
        return self.join_result


class StandInCore:
    """The part of MembershipCore the runtime tests drive: every datagram and every timer queues
    the chosen datagrams. `fail_datagrams`: receive_datagram raises after queuing them;
    `fail_timers`: the first N handle_timer calls raise after queuing them."""

    config = LOCAL
    codec = Codec("stand-in", None)

    def __init__(
        self,
        datagrams: list[tuple[bytes, str]],
        *,
        timer_in: float = 3600.0,
        fail_datagrams: bool = False,
        fail_timers: int = 0,
    ) -> None:
        self.datagrams = datagrams
        self.timer_in = timer_in
        self.fail_datagrams = fail_datagrams
        self.fail_timers = fail_timers
        self.timer_calls = 0
        self.queued: list[MembershipEffect] = []

    def queue_datagrams(self) -> None:
        self.queued += [SendDatagram(data, addr) for data, addr in self.datagrams]

    def receive_datagram(self, data: bytes, addr: str, now: float) -> None:
        self.queue_datagrams()
        if self.fail_datagrams:
            raise RuntimeError("boom")

    def handle_timer(self, now: float) -> None:
        self.timer_calls += 1
        self.queue_datagrams()
        if self.timer_calls <= self.fail_timers:
            raise ValueError("timer boom")

    def take_effects(self) -> list[MembershipEffect]:
        out, self.queued = self.queued, []
        return out

    def get_timer(self) -> float:
        return asyncio.get_running_loop().time() + self.timer_in

    def take_probe_rtts(self) -> list[tuple[str, float]]:
        return []


class SentDatagrams:
    """A UDP endpoint that keeps what it was asked to send; sending to `fail_to` raises."""

    def __init__(self, fail_to: str = "") -> None:
        self.out: list[tuple[bytes, str]] = []
        self.fail_to = fail_to

    def sendto(self, data: bytes, addr: str) -> None:
        if addr == self.fail_to:
            raise ValueError(f"cannot send to {addr}")
        self.out.append((data, addr))


def put_many_through(put: Callable[[str, bytes], int]) -> Callable[[Sequence[tuple[str, bytes]]], PutResult]:
    """ChunkStore.put_many made of a (patched) put: the fetch stores whole pieces with it."""

    def put_many(items: Sequence[tuple[str, bytes]]) -> PutResult:
        res = PutResult()
        for cid, data in items:
            try:
                put(cid, data)
            except DiskFullError as e:
                res.error = e
                break
            res.stored.append(cid)
        return res

    return put_many


def put_placed_through(
    put: Callable[[str, bytes], int],
) -> Callable[[Sequence[tuple[str, memoryview]], Place], PutResult]:
    """ChunkStore.put_placed made of a (patched) put: the chunks a fetch would write into the
    release being assembled go through it too (and into the store, not their places)."""
    many = put_many_through(put)

    def put_placed(items: Sequence[tuple[str, memoryview]], place: Place) -> PutResult:
        return many([(cid, bytes(stored)) for cid, stored in items])

    return put_placed


class FakeReleases:
    """The release service as the peer routes see it: nothing held, no pacing, and its own upload
    slots when given (none: every answer goes at once). Tests override what they exercise."""

    def __init__(self, codec: Codec, slots: UploadSlots | None = None) -> None:
        self.codec = codec
        self.counters = Counters()
        self.slots = slots

    def manifest_document(self, rid: str) -> bytes | None:
        return None

    def bitmap(self, rid: str) -> bytes | None:
        return None

    async def read_piece(self, ids: list[str], room: int, tail: int = 0) -> bytearray:
        return piece_buffer([None] * len(ids), room, tail)

    async def upload_permit(self, nbytes: int) -> None:
        return None

    def count_sent(self, nbytes: int) -> None:
        return None

    def upload_slot(self, source: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.slots.slot(source) if self.slots is not None else contextlib.nullcontext()


def rot_chunk(store: ChunkStore, cid: str) -> None:
    """Bit rot: flip bits of the middle byte of a chunk's stored form, wherever it lies (a
    file of its own or a pack)."""
    path, offset, length = store.locate(cid)
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([byte[0] ^ 0x55]))
