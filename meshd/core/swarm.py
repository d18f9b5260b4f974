"""Sans-IO chunk-fetch scheduler for one release (no I/O; `now` and a seeded Random passed in).

The shell feeds it peer availability and fetch results, carries out the FetchRequests it emits
(HTTP POST of a batch of chunk ids to the peer, or GETs against the origin URLs), verifies and
stores the chunks, and reports back. After any input, drain take_effects() (requests to send,
requests to cancel, events) and re-arm one timer from get_timer(). Chunks are indexed in the
manifest's first-appearance order (Manifest.unique_chunks()); have-bitmaps use that order, bit 7
of byte 0 = chunk 0.

Rules (each has a test in tests/unit/test_swarm.py):

| rule            | when                                  | what the scheduler does               |
|-----------------|---------------------------------------|---------------------------------------|
| delta           | chunk already in the local store      | never requested                       |
| rarest first    | picking chunks to request             | fewest holders first; rng breaks ties |
| same site first | a ready same-site peer has the chunk  | only same-site peers are asked for it |
| seeds last      | a ready partial peer has the chunk    | complete holders are not asked for it |
|                 |                                       | (even while that peer is busy): the   |
|                 |                                       | publisher's uplink serves each chunk  |
|                 |                                       | about once; the peers do the rest     |
| batching        | building one peer's request           | chunks added until >= piece_target,   |
|                 |                                       | never over piece_max (1-4 MiB)        |
| per-peer bound  | max_requests_per_peer in flight       | nothing more is sent to that peer     |
| total bound     | max_requests_total in flight          | nothing more is sent                  |
| rate cap        | rate_limit set (bytes/s)              | token bucket debited per request;     |
|                 |                                       | get_timer says when it refills        |
| endgame         | nothing new to ask, <= endgame_chunks | duplicates of chunks in flight for    |
|                 | missing                               | >= endgame_after to other holders     |
|                 |                                       | (<= endgame_copies); redundant        |
|                 |                                       | requests are cancelled                |
| timeout         | a request's deadline passes           | cancelled, chunks requeued, peer      |
|                 |                                       | cools down (exponential backoff)      |
| still flowing   | answer_flowing(): bytes of its answer | deadline moved to stall_timeout after |
|                 | arrived                               | them: a slow, moving answer is not    |
|                 |                                       | cancelled and asked again elsewhere   |
| error           | ERROR, or OK missing some chunks      | as timeout                            |
| bad hash        | BAD_HASH                              | peer banned for this release: its     |
|                 |                                       | requests cancelled, updates ignored   |
| origin fallback | no ready peer has a chunk for         | FetchRequest(peer=ORIGIN), at most    |
|                 | origin_delay seconds                  | origin_max_requests; bytes counted    |
|                 |                                       | apart (counters["bytes.origin"])      |
| late result     | answer to a cancelled request         | its verified chunks still count       |
| retry now       | retry_now(): the cause of failures is | the named peers' cool-downs and       |
|                 | gone (disk space came back)           | failure counts are cleared at once    |
| complete        | every chunk had                       | "complete" event once, no requests    |
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshd.core.counters import Counters

MiB = 1024 * 1024
ORIGIN = "@origin"


class Outcome(enum.Enum):
    OK = "ok"
    BAD_HASH = "bad_hash"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass(frozen=True)
class SwarmConfig:
    piece_target: int = 2 * MiB
    piece_max: int = 4 * MiB
    max_requests_per_peer: int = 4
    max_requests_total: int = 16
    timeout_min: float = 4.0  # Kraken: max(4 s, 4 s/MB x size)
    timeout_per_mib: float = 4.0
    # An answer whose bytes are still arriving is not timed out until this long after its last
    # bytes: on a loaded site, fixed deadlines cancelled transfers that were moving, and asking
    # the same chunks again elsewhere added load (a death spiral at 32 hosts on 2 cores).
    stall_timeout: float = 4.0
    backoff_base: float = 2.0  # cool-down after a timeout or error, doubled per failure
    backoff_max: float = 60.0
    origin_delay: float = 30.0
    origin_max_requests: int = 2
    origin_enabled: bool = True
    endgame_chunks: int = 32
    endgame_copies: int = 2
    # Only a request this old is duplicated: a small delta, all of it "the tail", is not
    # fetched twice when its peers answer promptly.
    endgame_after: float = 1.0
    rate_limit: float | None = None  # bytes per second of chunk data, None = unlimited
    rate_burst: int = 4 * MiB  # bucket size; raised to piece_max if smaller


class SwarmEffectHandler(Protocol):
    """What a shell does with a Swarm's effects (meshd.release.fetch); see meshd.core.pump."""

    def send_request(self, req: FetchRequest) -> None: ...

    def cancel_request(self, request_id: int) -> None: ...

    def swarm_event(self, ev: SwarmEvent) -> None: ...


@dataclass(frozen=True)
class FetchRequest:
    request_id: int
    peer: str  # a peer id, or ORIGIN
    chunks: tuple[str, ...]
    size: int  # uncompressed bytes of the chunks
    deadline: float
    endgame: bool = False

    def apply(self, handler: SwarmEffectHandler) -> None:
        handler.send_request(self)


@dataclass(frozen=True)
class SwarmEvent:
    kind: str  # complete | peer_banned | request_timeout | request_error | origin_fallback
    peer: str | None = None
    detail: str = ""

    def apply(self, handler: SwarmEffectHandler) -> None:
        handler.swarm_event(self)


@dataclass(frozen=True)
class CancelRequest:
    """The answer to this request is no longer needed (timed out, banned peer, redundant)."""

    request_id: int

    def apply(self, handler: SwarmEffectHandler) -> None:
        handler.cancel_request(self.request_id)


# What the shell carries out, drained by meshd.core.pump like the membership core's effects.
SwarmEffect = FetchRequest | CancelRequest | SwarmEvent


@dataclass(frozen=True)
class Progress:
    have_chunks: int
    total_chunks: int
    have_bytes: int
    total_bytes: int

    @property
    def fraction(self) -> float:
        return self.have_bytes / self.total_bytes if self.total_bytes else 1.0


@dataclass
class _Peer:
    id: str
    site: str
    same_site: bool
    have: set[int] | None  # None: has every chunk
    outstanding: set[int] = field(default_factory=set)
    seed: bool = False  # holds every chunk (its `have` may be cut to our share of it)
    cooldown_until: float = 0.0
    failures: int = 0

    def has(self, idx: int) -> bool:
        return self.have is None or idx in self.have


@dataclass
class _Request:
    peer: str
    chunks: list[int]
    size: int
    deadline: float
    endgame: bool
    sent: float


def make_bitmap(indices: Iterable[int], n: int) -> bytes:
    out = bytearray((n + 7) // 8)
    for i in indices:
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


# The bits set in each byte value, as offsets from the byte's first chunk (bit 7 = offset 0).
_BYTE_BITS = tuple(tuple(b for b in range(8) if v & (0x80 >> b)) for v in range(256))


def bitmap_indices(bitmap: bytes, n: int) -> set[int] | None:
    """Indices set in a bitmap of n chunks; None when its length or padding is wrong."""
    if len(bitmap) != (n + 7) // 8:
        return None
    if n % 8 and bitmap and bitmap[-1] & (0xFF >> (n % 8)):
        return None  # bits beyond the last chunk
    # By byte, not by bit: every fetching peer's bitmap is read again each time it announces.
    return {base + b for base, v in zip(range(0, n, 8), bitmap, strict=False) if v for b in _BYTE_BITS[v]}


class Swarm:
    """Decides which chunk to fetch from whom, for one release."""

    def __init__(
        self,
        chunks: Sequence[tuple[str, int]],
        have: Iterable[str],
        rng: random.Random,
        now: float,
        config: SwarmConfig | None = None,
    ) -> None:
        self.config = config or SwarmConfig()
        self._rng = rng
        self._ids = [cid for cid, _ in chunks]
        self._sizes = [size for _, size in chunks]
        self._index = {cid: i for i, cid in enumerate(self._ids)}
        if len(self._index) != len(self._ids):
            raise ValueError("chunk ids must be distinct")
        self._tiebreak = [rng.random() for _ in self._ids]
        held = {self._index[c] for c in have if c in self._index}
        self._missing: set[int] = set(range(len(self._ids))) - held
        # Our have-bitmap, kept bit by bit: peers ask for it every second while we fetch.
        self._bits = bytearray(make_bitmap(held, len(self._ids)))
        self._have_bytes = sum(self._sizes[i] for i in held)
        self._total_bytes = sum(self._sizes)
        self._peers: dict[str, _Peer] = {}
        # Holder counts kept incrementally (partial peers per chunk, complete peers apart), so
        # one input costs about the chunks it touches, not chunks x peers.
        n = len(self._ids)
        self._avail = [0] * n
        self._site_avail = [0] * n
        self._n_complete = 0
        self._n_site_complete = 0
        self._order: list[int] | None = None  # missing chunks, rarest first (cached)
        self._banned: set[str] = set()
        self._origin = _Peer(ORIGIN, "", False, None)
        self._requests: dict[int, _Request] = {}
        self._inflight: dict[int, set[int]] = {}  # chunk -> request ids
        self._unavailable_since: dict[int, float] = {}
        self._next_id = 1
        self._now = now
        burst = max(self.config.rate_burst, self.config.piece_max)
        self._bucket_size = float(burst)
        self._tokens = float(burst)
        self._tokens_at = now
        self._blocked_until: float | None = None
        self._origin_announced = False
        self._complete_announced = False
        self._out_requests: list[FetchRequest] = []
        self._out_cancels: list[int] = []
        self._out_events: list[SwarmEvent] = []
        self.counters = Counters(
            {
                "requests": 0,
                "requests.endgame": 0,
                "requests.origin": 0,
                "timeouts": 0,
                "deadlines.extended": 0,
                "errors": 0,
                "bans": 0,
                "cancels": 0,
                "bytes.peers": 0,
                "bytes.origin": 0,
                "chunks.duplicate": 0,
                "results.late": 0,
                "drops.bitmap": 0,
                "retries.now": 0,
            }
        )
        self._schedule(now)

    # --- inputs ------------------------------------------------------------------------------

    def peer_update(
        self,
        peer: str,
        now: float,
        *,
        site: str = "",
        same_site: bool = False,
        bitmap: bytes | None = None,
        complete: bool = False,
        seed: bool = False,
        schedule: bool = True,
    ) -> bool:
        """What a peer has: complete, or a bitmap. False (counted) for a banned peer or a bad
        bitmap, which are ignored. seed: the peer holds everything but we may ask it only for
        `bitmap` (our share of a scarce source); it is asked after partial holders, as a
        complete one is. schedule=False: only record it; the caller batches several updates
        and calls reschedule() once (a scheduling pass per update made each member's news
        cost a pass over every missing chunk)."""
        if peer in self._banned or peer == ORIGIN:
            return False
        have: set[int] | None = None
        if not complete:
            have = bitmap_indices(bitmap or b"", len(self._ids))
            if have is None:
                self.counters["drops.bitmap"] += 1
                return False
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _Peer(peer, site, same_site, have)
            self._count(p, +1)
        elif p.site == site and p.same_site == same_site and p.have is not None and have is not None:
            # A partial peer's bitmap again (every second while it fetches): only the chunks
            # it gained or lost change the counts and the rarest-first order.
            gained, lost = have - p.have, p.have - have
            if gained or lost:
                self._order = None
            for i in gained:
                self._avail[i] += 1
                if same_site:
                    self._site_avail[i] += 1
            for i in lost:
                self._avail[i] -= 1
                if same_site:
                    self._site_avail[i] -= 1
            p.have = have
        else:
            self._count(p, -1)
            p.site, p.same_site, p.have = site, same_site, have
            self._count(p, +1)
        p.seed = complete or seed
        if schedule:
            self._schedule(now)
        return True

    def peer_gone(self, peer: str, now: float, *, schedule: bool = True) -> None:
        """A peer left or died: forget it, requeue what it was serving (schedule: as in
        peer_update)."""
        p = self._peers.pop(peer, None)
        if p is not None:
            self._count(p, -1)
            self._drop_requests(p)
        if schedule:
            self._schedule(now)

    def reschedule(self, now: float) -> None:
        """One scheduling pass after updates recorded with schedule=False."""
        self._schedule(now)

    def fetch_done(
        self,
        request_id: int,
        outcome: Outcome,
        now: float,
        *,
        received: Iterable[str] | None = None,
    ) -> None:
        """Result of a request. `received`: chunks verified and stored (default for OK: all)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            self.counters["results.late"] += 1
            for cid in received or ():
                self._got(self._index.get(cid), False)
            self._schedule(now)
            return
        peer = self._origin if req.peer == ORIGIN else self._peers.get(req.peer)
        if peer is not None:
            peer.outstanding.discard(request_id)
        if received is None:
            got = set(req.chunks) if outcome is Outcome.OK else set()
        else:
            got = {i for i in (self._index.get(c) for c in received) if i is not None}
        for idx in req.chunks:
            self._unlink(idx, request_id)
        for idx in got:
            self._got(idx, req.peer == ORIGIN)
        short = outcome is Outcome.OK and not set(req.chunks) <= got
        if outcome is Outcome.BAD_HASH:
            self._ban(req.peer, "served a chunk with a wrong hash", now)
        elif outcome in (Outcome.TIMEOUT, Outcome.ERROR) or short:
            kind = "request_timeout" if outcome is Outcome.TIMEOUT else "request_error"
            self._fail(peer, req.peer, kind, now, "short answer" if short else outcome.value)
        elif peer is not None:
            peer.failures = 0
        self._schedule(now)

    def add_have(self, ids: Iterable[str], now: float) -> None:
        """Chunks that reached the store another way (another release, a local publish)."""
        for cid in ids:
            self._got(self._index.get(cid), False, count_bytes=False)
        self._schedule(now)

    def lost(self, ids: Iterable[str], now: float) -> None:
        """Chunks found damaged (and dropped) in the local store: fetch them again."""
        for cid in ids:
            idx = self._index.get(cid)
            if idx is not None and idx not in self._missing:
                self._missing.add(idx)
                self._bits[idx >> 3] &= ~(0x80 >> (idx & 7)) & 0xFF
                self._order = None
                self._have_bytes -= self._sizes[idx]
                self._complete_announced = False
        self._schedule(now)

    def retry_now(self, now: float, peers: Iterable[str] | None = None) -> int:
        """The cause of the failures was local and is gone (the disk had no room, now it has):
        clear the cool-downs and failure counts of `peers` (ORIGIN for the origin; None: every
        peer and the origin) so they are asked again at once instead of after their back-off.
        Banned peers stay banned. Returns how many were cooling down."""
        chosen = self._all_peers() if peers is None else [self._peer_or_origin(p) for p in peers]
        cleared = 0
        for p in chosen:
            if p is None:
                continue
            if p.cooldown_until > now:
                cleared += 1
            p.cooldown_until = 0.0
            p.failures = 0
        self.counters["retries.now"] += cleared
        self._schedule(now)
        return cleared

    def answer_flowing(self, request_id: int, now: float) -> None:
        """Bytes of the answer to `request_id` arrived at `now` (rule "still flowing")."""
        req = self._requests.get(request_id)
        if req is not None and req.deadline < now + self.config.stall_timeout:
            req.deadline = now + self.config.stall_timeout
            self.counters["deadlines.extended"] += 1

    def handle_timer(self, now: float) -> None:
        for rid, req in list(self._requests.items()):
            if req.deadline <= now:
                del self._requests[rid]
                peer = self._origin if req.peer == ORIGIN else self._peers.get(req.peer)
                if peer is not None:
                    peer.outstanding.discard(rid)
                for idx in req.chunks:
                    self._unlink(idx, rid)
                self.counters["timeouts"] += 1
                self._out_cancels.append(rid)
                self._fail(peer, req.peer, "request_timeout", now, f"request {rid}")
        self._schedule(now)

    # --- outputs -----------------------------------------------------------------------------

    def requests_to_send(self) -> list[FetchRequest]:
        out, self._out_requests = self._out_requests, []
        return out

    def requests_to_cancel(self) -> list[int]:
        """Request ids whose answer is no longer needed (timed out, banned peer, redundant)."""
        out, self._out_cancels = self._out_cancels, []
        return out

    def events(self) -> list[SwarmEvent]:
        out, self._out_events = self._out_events, []
        return out

    def take_effects(self) -> list[SwarmEffect]:
        """Everything to carry out since the last call: the requests to send, then the requests
        to cancel, then the events (the order the shell has always handled them in)."""
        effects: list[SwarmEffect] = list(self.requests_to_send())
        effects.extend(CancelRequest(rid) for rid in self.requests_to_cancel())
        effects.extend(self.events())
        return effects

    def get_timer(self) -> float | None:
        """Next absolute time handle_timer should run, or None."""
        if not self._missing:
            return None
        times = [r.deadline for r in self._requests.values()]
        if self._blocked_until is not None:
            times.append(self._blocked_until)
        cooling = [p.cooldown_until for p in self._all_peers() if p.cooldown_until > self._now]
        times.extend(cooling)
        if self.config.origin_enabled:
            times.extend(t + self.config.origin_delay for t in self._unavailable_since.values())
        if len(self._missing) <= self.config.endgame_chunks:
            after = self.config.endgame_after
            times.extend(r.sent + after for r in self._requests.values() if r.sent + after > self._now)
        return min(times) if times else None

    # --- views -------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return not self._missing

    def progress(self) -> Progress:
        n = len(self._ids)
        return Progress(n - len(self._missing), n, self._have_bytes, self._total_bytes)

    def missing_ids(self) -> list[str]:
        return [self._ids[i] for i in sorted(self._missing)]

    def local_bitmap(self) -> bytes:
        """Our own have-bitmap, to serve to peers."""
        return bytes(self._bits)

    def is_banned(self, peer: str) -> bool:
        return peer in self._banned

    def in_flight(self) -> list[FetchRequest]:
        return [
            FetchRequest(rid, r.peer, tuple(self._ids[i] for i in r.chunks), r.size, r.deadline)
            for rid, r in self._requests.items()
        ]

    # --- internals ---------------------------------------------------------------------------

    def _all_peers(self) -> list[_Peer]:
        return [*self._peers.values(), self._origin]

    def _peer_or_origin(self, peer_id: str) -> _Peer | None:
        return self._origin if peer_id == ORIGIN else self._peers.get(peer_id)

    def _unlink(self, idx: int, rid: int) -> None:
        rids = self._inflight.get(idx)
        if rids is not None:
            rids.discard(rid)
            if not rids:
                del self._inflight[idx]

    def _got(self, idx: int | None, from_origin: bool, *, count_bytes: bool = True) -> None:
        if idx is None:
            return
        if idx not in self._missing:
            if count_bytes:
                self.counters["chunks.duplicate"] += 1
            return
        self._missing.discard(idx)
        self._bits[idx >> 3] |= 0x80 >> (idx & 7)
        self._unavailable_since.pop(idx, None)
        self._have_bytes += self._sizes[idx]
        if count_bytes:
            key = "bytes.origin" if from_origin else "bytes.peers"
            self.counters[key] += self._sizes[idx]
        # Other requests for this chunk (endgame duplicates) may now be pointless.
        for rid in list(self._inflight.pop(idx, ())):
            req = self._requests.get(rid)
            if req is not None and not any(i in self._missing for i in req.chunks):
                self._cancel(rid)

    def _cancel(self, rid: int) -> None:
        req = self._requests.pop(rid, None)
        if req is None:
            return
        peer = self._origin if req.peer == ORIGIN else self._peers.get(req.peer)
        if peer is not None:
            peer.outstanding.discard(rid)
        for idx in req.chunks:
            self._unlink(idx, rid)
        self.counters["cancels"] += 1
        self._out_cancels.append(rid)

    def _drop_requests(self, peer: _Peer) -> None:
        for rid in list(peer.outstanding):
            self._cancel(rid)
        peer.outstanding.clear()

    def _fail(self, peer: _Peer | None, peer_id: str, kind: str, now: float, detail: str) -> None:
        if kind == "request_error":
            self.counters["errors"] += 1
        self._out_events.append(SwarmEvent(kind, peer_id, detail))
        if peer is None:
            return
        peer.failures += 1
        backoff = self.config.backoff_base * 2 ** (peer.failures - 1)
        peer.cooldown_until = now + min(self.config.backoff_max, backoff)

    def _ban(self, peer_id: str, why: str, now: float) -> None:
        if peer_id == ORIGIN:
            # The origin cannot be banned (it is the last resort); it cools down instead.
            self._origin.failures += 1
            self._origin.cooldown_until = now + self.config.backoff_max
            self._out_events.append(SwarmEvent("request_error", ORIGIN, why))
            return
        peer = self._peers.pop(peer_id, None)
        self._banned.add(peer_id)
        self.counters["bans"] += 1
        if peer is not None:
            self._count(peer, -1)
            self._drop_requests(peer)
        self._out_events.append(SwarmEvent("peer_banned", peer_id, why))

    def _count(self, p: _Peer, sign: int) -> None:
        self._order = None
        if p.have is None:
            self._n_complete += sign
            if p.same_site:
                self._n_site_complete += sign
            return
        for i in p.have:
            self._avail[i] += sign
            if p.same_site:
                self._site_avail[i] += sign

    def _ordered(self) -> list[int]:
        if self._order is None:
            tb = self._tiebreak
            av = self._avail
            self._order = sorted(self._missing, key=lambda i: (av[i], tb[i]))
        return self._order

    def _refill(self, now: float) -> None:
        if self.config.rate_limit is None:
            self._tokens_at = max(self._tokens_at, now)
            return
        if now > self._tokens_at:
            self._tokens = min(
                self._bucket_size, self._tokens + (now - self._tokens_at) * self.config.rate_limit
            )
            self._tokens_at = now

    def _deadline(self, size: int, now: float) -> float:
        timeout = max(self.config.timeout_min, self.config.timeout_per_mib * size / MiB)
        if self.config.rate_limit:
            timeout += size / self.config.rate_limit
        return now + timeout

    def _issue(self, peer: _Peer, chunks: list[int], now: float, endgame: bool) -> bool:
        """Send one request, if the rate cap allows; False when blocked by the bucket."""
        size = sum(self._sizes[i] for i in chunks)
        if self.config.rate_limit is not None:
            if self._tokens < size:
                wait = (size - self._tokens) / self.config.rate_limit
                self._blocked_until = now + wait
                return False
            self._tokens -= size
        rid = self._next_id
        self._next_id += 1
        deadline = self._deadline(size, now)
        self._requests[rid] = _Request(peer.id, list(chunks), size, deadline, endgame, now)
        peer.outstanding.add(rid)
        for idx in chunks:
            self._inflight.setdefault(idx, set()).add(rid)
        self.counters["requests"] += 1
        if endgame:
            self.counters["requests.endgame"] += 1
        if peer is self._origin:
            self.counters["requests.origin"] += 1
        ids = tuple(self._ids[i] for i in chunks)
        self._out_requests.append(FetchRequest(rid, peer.id, ids, size, deadline, endgame))
        return True

    def _schedule(self, now: float) -> None:
        self._now = max(self._now, now)
        self._refill(now)
        self._blocked_until = None
        if not self._missing:
            if not self._complete_announced:
                self._complete_announced = True
                self._unavailable_since.clear()
                self._out_events.append(SwarmEvent("complete"))
            return
        ready = [p for p in self._peers.values() if p.cooldown_until <= now]
        cooling = [p for p in self._peers.values() if p.cooldown_until > now]
        if self.config.origin_enabled:
            self._origin_clock(cooling, now)
        blocked = self._schedule_peers(ready, cooling, now)
        if not blocked:
            blocked = self._schedule_origin(now)
        if not blocked:
            self._schedule_endgame(ready, now)

    def _origin_clock(self, cooling: list[_Peer], now: float) -> None:
        """Start the origin delay for chunks no ready peer can serve; stop it for the others."""
        for idx in self._missing:
            if idx in self._inflight:
                self._unavailable_since.pop(idx, None)
                continue
            holders = self._n_complete + self._avail[idx]
            if holders and cooling:
                holders -= sum(1 for q in cooling if q.has(idx))
            if holders > 0:
                self._unavailable_since.pop(idx, None)
            else:
                self._unavailable_since.setdefault(idx, now)

    def _free(self, p: _Peer, open_pieces: int) -> bool:
        cfg = self.config
        if len(self._requests) + open_pieces >= cfg.max_requests_total:
            return False
        return len(p.outstanding) < cfg.max_requests_per_peer

    def _schedule_peers(self, ready: list[_Peer], cooling: list[_Peer], now: float) -> bool:
        """Normal pass: rarest first, same site first, batched. True if the bucket blocked."""
        cfg = self.config
        total_free = cfg.max_requests_total - len(self._requests)
        slots = {p.id: cfg.max_requests_per_peer - len(p.outstanding) for p in ready}
        live = [p for p in ready if slots[p.id] > 0]
        if not live or total_free <= 0:
            return False
        cooling_site = [q for q in cooling if q.same_site]
        partial = [q for q in ready if not q.seed]  # busy ones too: a seed is no overflow valve
        open_: dict[str, list[int]] = {}
        open_size: dict[str, int] = {}
        rank = {p.id: self._rng.random() for p in live}

        # Chunks some live peer holds: the pass skips the others with one set lookup instead of
        # asking every peer (a pass ran per input, over every missing chunk times every peer:
        # at 32 hosts that was most of a node's CPU).
        cand: set[int] | None = None
        if all(p.have is not None for p in live):
            cand = set().union(*(p.have for p in live if p.have is not None))

        def close(p: _Peer) -> bool:
            chunks = open_.pop(p.id)
            open_size.pop(p.id)
            return self._issue(p, chunks, now, False)

        for idx in self._ordered():
            if not live:
                break
            if idx in self._inflight or idx not in self._missing:
                continue
            if cand is not None and idx not in cand:
                continue  # no live peer has it
            if self._avail[idx] + self._n_complete == 0:
                continue  # nobody has it: the origin's business
            site_ready = self._n_site_complete + self._site_avail[idx]
            if site_ready and cooling_site:
                site_ready -= sum(1 for q in cooling_site if q.has(idx))
            holders = [p for p in live if p.has(idx) and (p.same_site or site_ready <= 0)]
            if any(p.seed for p in holders) and any(
                q.has(idx) and (q.same_site or site_ready <= 0) for q in partial
            ):
                holders = [p for p in holders if not p.seed]
            if not holders:
                continue
            size = self._sizes[idx]
            best: _Peer | None = None
            for p in holders:
                fits = p.id in open_ and open_size[p.id] + size <= cfg.piece_max
                if fits and (best is None or open_size[p.id] > open_size[best.id]):
                    best = p
            if best is None:
                able = [p for p in holders if slots[p.id] > 0] if total_free > 0 else []
                if not able:
                    continue
                best = min(able, key=lambda p: (p.seed, len(p.outstanding), rank[p.id]))
                if best.id in open_ and not close(best):  # its open piece is full
                    return True
                open_[best.id] = []
                open_size[best.id] = 0
                slots[best.id] -= 1
                total_free -= 1
            open_[best.id].append(idx)
            open_size[best.id] += size
            if open_size[best.id] >= cfg.piece_target:
                if not close(best):
                    return True
            else:
                continue
            live = [p for p in live if slots[p.id] > 0 or p.id in open_]
            if total_free <= 0:
                live = [p for p in live if p.id in open_]
        return any(not close(self._peers[pid]) for pid in list(open_))

    def _schedule_origin(self, now: float) -> bool:
        cfg = self.config
        if not cfg.origin_enabled or self._origin.cooldown_until > now:
            return False
        due = sorted(
            (i for i, t in self._unavailable_since.items() if now - t >= cfg.origin_delay),
            key=lambda i: i,
        )
        piece: list[int] = []
        size = 0
        for idx in due:
            if len(self._origin.outstanding) >= cfg.origin_max_requests:
                break
            if piece and size + self._sizes[idx] > cfg.piece_max:
                if not self._issue_origin(piece, now):
                    return True
                piece, size = [], 0
                if len(self._origin.outstanding) >= cfg.origin_max_requests:
                    break
            piece.append(idx)
            size += self._sizes[idx]
        if piece and len(self._origin.outstanding) < cfg.origin_max_requests:
            return not self._issue_origin(piece, now)
        return False

    def _issue_origin(self, piece: list[int], now: float) -> bool:
        if not self._issue(self._origin, piece, now, False):
            return False
        for idx in piece:
            self._unavailable_since.pop(idx, None)
        if not self._origin_announced:
            self._origin_announced = True
            self._out_events.append(SwarmEvent("origin_fallback", ORIGIN, f"{len(piece)} chunks no peer has"))
        return True

    def _schedule_endgame(self, ready: list[_Peer], now: float) -> None:
        cfg = self.config
        if len(self._missing) > cfg.endgame_chunks:
            return
        if any(i not in self._inflight for i in self._missing):
            return  # something is still waiting for a first request (or for the origin)
        old_enough = {
            i
            for i in self._missing
            if min(self._requests[r].sent for r in self._inflight[i]) + cfg.endgame_after <= now
        }
        if not old_enough:
            return
        peers = sorted(ready, key=lambda p: (len(p.outstanding), p.id))
        for p in peers:
            if not self._free(p, 0):
                continue
            mine = {i for rid in p.outstanding for i in self._requests[rid].chunks}
            cands = [
                i
                for i in old_enough
                if p.has(i)
                and i not in mine
                and len(self._inflight.get(i, ())) < cfg.endgame_copies
                # same site first holds in the endgame too: no WAN copy of a LAN chunk
                and (p.same_site or not any(q.same_site and q.has(i) for q in ready))
                and not (p.seed and any(not q.seed and q.has(i) for q in ready))  # seeds last
            ]
            if not cands:
                continue
            cands.sort(key=lambda i: (len(self._inflight.get(i, ())), self._tiebreak[i]))
            piece: list[int] = []
            size = 0
            for idx in cands:
                if piece and size + self._sizes[idx] > cfg.piece_max:
                    break
                piece.append(idx)
                size += self._sizes[idx]
                if size >= cfg.piece_target:
                    break
            if not self._issue(p, piece, now, True):
                return
