"""Serving peers: what the peer HTTP routes (meshd.release.peer) call on this node.

PeerUploads answers with the manifest documents and have-bitmaps of the releases this node holds
and the stored forms of chunks, paced by the upload cap (a TokenBucket; with a cap, UploadSlots
bound the uploads queued per peer). A chunk found rotten while being read is dropped by the store
and reported, so that the service fetches it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from typing import Protocol

from aiohttp import web

from meshd.core.counters import Counters
from meshd.errors import IntegrityError
from meshd.metrics import TransferStats
from meshd.release.chunker import MAX_SIZE
from meshd.release.peer import (
    MAX_PIECE_STORED,
    STORED_OVERHEAD,
    UploadBusy,
    add_peer_routes,
    piece_buffer,
    piece_head,
)
from meshd.release.store import ChunkStore, StoreError
from meshd.wire import Codec

log = logging.getLogger("meshd.release")

MAX_STORED = MAX_SIZE + STORED_OVERHEAD  # the largest stored form a chunk can have


class TokenBucket:
    """An asyncio rate cap (bytes per second); take() waits until the bytes may go."""

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.burst = float(burst if burst is not None else max(4 * 1024 * 1024, rate or 0))
        self._tokens = self.burst
        self._clock = clock
        self._sleep = sleep
        self._at = clock()

    def reserve(self, n: int) -> float:
        """Take `n` bytes now (the balance may go negative); seconds until they may go.

        No lock and no await: on one event loop this runs whole, and the reservations made in
        turn are served first come, first served, each sleeping only for its own debt.
        """
        if not self.rate:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.rate)

    async def take(self, n: int) -> None:
        wait = self.reserve(n)
        if wait > 0:
            await self._sleep(wait)  # outside any lock: other takers reserve meanwhile


class UploadSlots:
    """Per source address: `running` uploads at a time and `waiting` more queued; beyond that
    UploadBusy, so one peer cannot pile up work (and the memory of prepared answers)."""

    def __init__(self, running: int = 2, waiting: int = 4) -> None:
        self.running = running
        self.waiting = waiting
        self._held: dict[str, int] = {}  # running + waiting, per source
        self._sems: dict[str, asyncio.Semaphore] = {}

    def held(self, source: str) -> int:
        return self._held.get(source, 0)

    @asynccontextmanager
    async def slot(self, source: str) -> AsyncIterator[None]:
        n = self._held.get(source, 0)
        if n >= self.running + self.waiting:
            raise UploadBusy(f"{source} has {n} uploads running or waiting")
        self._held[source] = n + 1
        sem = self._sems.setdefault(source, asyncio.Semaphore(self.running))
        try:
            async with sem:
                yield
        finally:
            left = self._held[source] - 1
            if left:
                self._held[source] = left
            else:  # nothing kept for sources that went away
                del self._held[source]
                self._sems.pop(source, None)


ALL_SOURCES = "*"
UPLOADS_AT_ONCE = 8  # pieces being read, sealed and sent at once, whoever asks
UPLOADS_QUEUED = 256  # more wait their turn; beyond that a requester is told busy (503)


class Holdings(Protocol):
    """The releases this node holds, as the server needs them."""

    def full_release_id(self, rid: str) -> str | None:
        """The full release id of a held release, given it or a unique prefix of it."""
        ...

    def manifest_bytes(self, rid: str) -> bytes: ...

    def have_bitmap(self, rid: str) -> bytes | None:
        """Which chunks we hold (None: none to serve)."""
        ...


class PeerUploads:
    """The PeerBackend of the peer routes: sealed answers come from here."""

    def __init__(
        self,
        holdings: Holdings,
        *,
        codec: Codec,
        counters: Counters,
        store: ChunkStore,
        transfer: TransferStats,
        upload_rate: float | None,
        on_damaged: Callable[[list[str]], None],
        slots: UploadSlots | None = None,
    ) -> None:
        self.holdings = holdings
        self.codec = codec
        self.counters = counters
        self.store = store
        self.transfer = transfer
        self.upload_bucket = TokenBucket(upload_rate)
        # Only a paced node bounds uploads per requester; unpaced, an answer goes out as fast
        # as it is read.
        self.slots = (slots or UploadSlots()) if upload_rate else None
        # Every node bounds its uploads in flight: a piece is megabytes from its read until its
        # last byte is in the kernel, and 31 requesters at once each got one (BitTorrent's
        # upload slots, Syncthing's bound on incoming requests).
        self.gate = UploadSlots(running=UPLOADS_AT_ONCE, waiting=UPLOADS_QUEUED)
        self._on_damaged = on_damaged

    def set_upload_rate(self, rate: float | None) -> None:
        """A new upload cap (a configuration reload); uploads in flight finish at the new pace."""
        self.upload_bucket = TokenBucket(rate)
        if rate and self.slots is None:
            self.slots = UploadSlots()
        elif not rate:
            self.slots = None  # a held slot is released on its own (UploadSlots.slot's finally)

    def add_routes(self, app: web.Application) -> None:
        add_peer_routes(app, self)

    def manifest_document(self, rid: str) -> bytes | None:
        full = self.holdings.full_release_id(rid)
        return self.holdings.manifest_bytes(full) if full else None

    def bitmap(self, rid: str) -> bytes | None:
        full = self.holdings.full_release_id(rid)
        return self.holdings.have_bitmap(full) if full else None

    async def read_piece(self, ids: list[str], room: int, tail: int = 0) -> bytearray:
        """The piece answering `ids`, read from the chunk files straight into one buffer after
        `room` bytes left for the envelope's header and before `tail` for its tag (a worker
        thread reads and hashes)."""
        buf, damaged = await asyncio.to_thread(self._read_piece, ids, room, tail)
        if damaged:
            self._on_damaged(damaged)
        return buf

    def _read_piece(self, ids: list[str], room: int, tail: int) -> tuple[bytearray, list[str]]:
        # Sizes first (no file held open: a piece may name 1,024 chunks), then one buffer, then
        # each file read into its place.
        sizes: list[int] = []  # 0: not served
        damaged: list[str] = []
        total = 0
        for cid in ids:
            size = self._size_of(cid, damaged) if total < MAX_PIECE_STORED else 0
            sizes.append(size)
            total += size
        head = piece_head(sizes)
        buf = bytearray(room + len(head) + total + tail)
        buf[room : room + len(head)] = head
        view = memoryview(buf)
        pos = room + len(head)
        spans: list[memoryview | None] = []
        whole = True
        for cid, size in zip(ids, sizes, strict=True):
            span = None
            if size:
                span = view[pos : pos + size]
                pos += size
                if not self._fill(cid, span, damaged):
                    span, whole = None, False
            spans.append(span)
        if not whole:
            # A chunk gone, rotten or unreadable when read: its entry goes and the rest is
            # copied into a new buffer (rare; a rotten one is dropped and fetched again).
            buf = piece_buffer(spans, room, tail)
        return buf, damaged

    def _size_of(self, cid: str, damaged: list[str]) -> int:
        try:
            size = self.store.stored_size(cid)
        except KeyError:
            return 0
        except StoreError as e:
            log.error("%s", e)
            return 0
        if size > MAX_STORED or size == 0:  # no chunk is this big (or empty): rotten, not read
            self.store.discard_damaged(cid)
            damaged.append(cid)
            return 0
        return size

    def _fill(self, cid: str, span: memoryview, damaged: list[str]) -> bool:
        """Read a chunk into `span`; False when it is gone, is not the chunk (then the store
        dropped it, and it is listed in `damaged`) or cannot be read."""
        try:
            self.store.read_stored_into(cid, span)
        except KeyError:  # collected since its size was read
            return False
        except IntegrityError:
            damaged.append(cid)
            return False
        except StoreError as e:
            log.error("%s", e)
            return False
        return True

    @asynccontextmanager
    async def upload_slot(self, source: str) -> AsyncIterator[None]:
        per_source = self.slots.slot(source) if self.slots is not None else nullcontext()
        async with per_source, self.gate.slot(ALL_SOURCES):
            yield

    async def upload_permit(self, nbytes: int) -> None:
        await self.upload_bucket.take(nbytes)

    def count_sent(self, nbytes: int) -> None:
        self.transfer.sent_bytes += nbytes
