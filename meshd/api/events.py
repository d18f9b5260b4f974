"""The event stream's memory: ids, the replay ring, and the fan-out to open streams.

Every event GET /v1/events sends gets an id "<boot>-<seq>": seq counts up within one run of the
API, boot changes with every run, so an id from an earlier run is never taken for one of this
run. The last RING_SIZE events are kept (not the EPHEMERAL_KINDS: periodic figures are not worth
replaying); a client that comes back with the id of the last event it saw (Last-Event-ID) gets
what it missed first. When that cannot be done (another run, an id older than the ring, an id
not of this form) the stream says so with a reset, and the client reloads its state.

`EventLog` is the sans-IO part; `EventHub` holds the one subscription to the agent and hands
each event, with its id, to every open stream's bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from meshd.api.agent import EventLike, SubscriptionLike

__all__ = ["EPHEMERAL_KINDS", "RING_SIZE", "EventHub", "EventLog", "Opening", "Reader"]

RING_SIZE = 1024
READER_QUEUE = 1024  # events waiting for one stream's client; beyond that the stream ends
EPHEMERAL_KINDS = frozenset({"stats"})

T = TypeVar("T")


class EventLog(Generic[T]):
    """Numbers events and keeps the last `capacity` replayable ones."""

    def __init__(self, boot: str, capacity: int = RING_SIZE) -> None:
        self.boot = boot
        self.seq = 0
        self._ring: deque[tuple[int, T]] = deque(maxlen=capacity)
        self._forgotten = 0  # the seq of the newest replayable event the ring let go

    def id_of(self, seq: int) -> str:
        return f"{self.boot}-{seq}"

    @property
    def last_id(self) -> str:
        return self.id_of(self.seq)

    def record(self, ev: T, replayable: bool = True) -> str:
        """The event's id; a replayable one is kept for clients that come back."""
        self.seq += 1
        if replayable:
            if len(self._ring) == self._ring.maxlen:
                self._forgotten = self._ring[0][0]
            self._ring.append((self.seq, ev))
        return self.id_of(self.seq)

    def since(self, last_id: str) -> list[tuple[str, T]] | None:
        """The kept events after `last_id`, oldest first; None when what came after it is not
        all here (an id of another run, older than the ring, or not an id at all)."""
        boot, _, seq_text = last_id.strip().rpartition("-")
        if boot != self.boot or not seq_text.isascii() or not seq_text.isdigit():
            return None
        seq = int(seq_text)
        if seq > self.seq or seq < self._forgotten:
            return None
        return [(self.id_of(s), ev) for s, ev in self._ring if s > seq]


@dataclass(eq=False)  # one per stream, kept in a set by identity
class Reader:
    """One open stream: its queue of (id, event), and whether it fell behind."""

    queue: asyncio.Queue[tuple[str, EventLike]] = field(default_factory=lambda: asyncio.Queue(READER_QUEUE))
    lost: bool = False

    def put(self, item: tuple[str, EventLike]) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # The stream ends; its client comes back with the id it got to and resumes.
            self.lost = True


@dataclass(frozen=True)
class Opening:
    """What a new stream sends before live events."""

    hello_id: str | None  # the id to start from (a fresh stream, or after a reset)
    backlog: list[tuple[str, EventLike]]  # missed events, resuming
    reset: str | None  # why the stream cannot resume (None: it can, or was not asked to)


class EventHub:
    """One subscription to the agent, started by the first stream, kept until `close()`."""

    def __init__(
        self, subscribe: Callable[[], SubscriptionLike], boot: str, capacity: int = RING_SIZE
    ) -> None:
        self._subscribe = subscribe
        self.log: EventLog[EventLike] = EventLog(boot, capacity)
        self.readers: set[Reader] = set()
        self._sub: SubscriptionLike | None = None
        self._task: asyncio.Task[None] | None = None

    def open(self, last_id: str | None) -> tuple[Reader, Opening]:
        """A reader for a new stream, and what to send first. Synchronous: no event falls
        between the backlog and the queue."""
        self._start()
        reader = Reader()
        self.readers.add(reader)
        if last_id is None:
            return reader, Opening(self.log.last_id, [], None)
        backlog = self.log.since(last_id)
        if backlog is None:
            return reader, Opening(self.log.last_id, [], "events since that id are not all kept")
        return reader, Opening(None, backlog, None)

    def close_reader(self, reader: Reader) -> None:
        self.readers.discard(reader)

    def deliver(self, ev: EventLike) -> None:
        event_id = self.log.record(ev, replayable=ev.kind not in EPHEMERAL_KINDS)
        for reader in list(self.readers):
            reader.put((event_id, ev))

    def _start(self) -> None:
        if self._task is None:
            self._sub = self._subscribe()
            self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        assert self._sub is not None
        while True:
            self.deliver(await self._sub.get())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            self._sub.close()
        self._task = self._sub = None
