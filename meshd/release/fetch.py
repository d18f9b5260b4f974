"""The Swarm driver: carries out what each release's sans-IO Swarm asks for, over peer HTTP.

One Swarm per release being fetched (meshd.core.swarm decides which chunk to get from whom).
FetchDriver feeds it who holds what (members' announcements, have-bitmaps GET from partial
holders), runs its requests (POST of chunk ids to a peer, or GETs against the manifest's origin
URLs), verifies and stores every chunk (ChunkStore.put), reports the outcomes back, and keeps
its timer armed. Its effects are drained by meshd.core.pump, as the membership core's are.

A chunk that cannot be stored because the disk is full (DiskFullError) is reported to
`on_disk_full` (release/space.py watches free space then) and its source cools down as after
any failure; retry_now() ends those cool-downs once there is room again.

Scarce sources are shared out between the nodes of a site (see `_register_all`), so that about
one copy of a release crosses a site link and leaves a lone seed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from meshd.core.counters import Counters
from meshd.core.pump import drain
from meshd.core.swarm import (
    ORIGIN,
    FetchRequest,
    Outcome,
    Swarm,
    SwarmConfig,
    SwarmEvent,
    make_bitmap,
)
from meshd.errors import IntegrityError
from meshd.loop_timer import DeadlineTimer
from meshd.metrics import Histograms, TransferStats
from meshd.release.announce import RID_PREFIX, Member
from meshd.release.assembly import Assembly
from meshd.release.chunker import FLAG_RAW, HEADER_SIZE
from meshd.release.manifest import Manifest
from meshd.release.peer import PeerProtocolError
from meshd.release.peer_client import PeerFetcher
from meshd.release.store import ChunkStore, DiskFullError, StoreError

log = logging.getLogger("meshd.release")

BITMAP_INTERVAL = 1.0  # at most one bitmap GET per peer and release per interval
WAN_STALL = 5.0  # seconds without a chunk before the share cut on scarce sources is lifted
TICK = 1.0  # how often a fetch checks for a stall
# Members' news is gathered for this long and judged in one pass: every fetching member
# re-announces its progress each second, and one pass per announcement (a share judged over
# every member, a scheduling pass over every missing chunk) made each node's cost grow with
# the square of the site's size (28% of a node's time in gossip handling at 32 hosts).
COALESCE = 0.05
PROGRESS_EVERY = 0.5  # seconds between "still flowing" reports of one answer
HARD_CAP_FACTOR = 4.0  # a flowing answer is still cut at this multiple of its first deadline

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


@dataclass
class ReleaseFetch:
    """One release being fetched: its Swarm and the I/O in flight for it."""

    manifest: Manifest
    swarm: Swarm
    sizes: dict[str, int]
    started: float
    peers: set[str] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    net_phase: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    bitmap_busy: set[str] = field(default_factory=set)
    bitmap_dirty: set[str] = field(default_factory=set)
    raw: dict[str, bytes | None] = field(default_factory=dict)  # peer -> bitmap (None: complete)
    registered: dict[str, bytes | None] = field(default_factory=dict)  # what the swarm was told
    masks: dict[tuple[int, int], bytes] = field(default_factory=dict)
    last_progress: float = 0.0
    widened: bool = False
    tick: asyncio.TimerHandle | None = None
    timer: DeadlineTimer | None = None  # on the swarm's next deadline (made with the fetch)
    closed: bool = False
    error: str | None = None
    disk_failed: set[str] = field(default_factory=set)  # sources whose chunks found no room
    sharers: set[str] = field(default_factory=set)  # site nodes seen needing it (see _share)
    lone_seeds: set[str] = field(default_factory=set)  # site holders once judged the lone seed
    judged: tuple[object, ...] = ()  # what the last full _register_all pass depended on
    news: dict[str, Member] = field(default_factory=dict)  # members changed since the last flush
    flush: asyncio.TimerHandle | None = None  # the pass that judges `news`
    unscheduled: bool = False  # peers updated without a scheduling pass since (see _pump)
    assembly: Assembly | None = None  # where raw chunks are written (release/assembly.py)

    @property
    def rid(self) -> str:
        return self.manifest.release_id


class _SwarmEffects:
    """Carries one fetch's Swarm effects out (a core.swarm.SwarmEffectHandler)."""

    def __init__(self, driver: FetchDriver, fetch: ReleaseFetch) -> None:
        self.driver = driver
        self.fetch = fetch
        self.complete = False

    def send_request(self, req: FetchRequest) -> None:
        fetch = self.fetch
        task = self.driver._spawn(self.driver._run_request(fetch, req))
        fetch.tasks.add(task)
        task.add_done_callback(fetch.tasks.discard)

    def cancel_request(self, request_id: int) -> None:
        net = self.fetch.net_phase.pop(request_id, None)
        if net is not None:
            net.cancel()  # only while still on the network: stored chunks always count

    def swarm_event(self, ev: SwarmEvent) -> None:
        m = self.fetch.manifest
        if ev.kind == "complete":
            self.complete = True
        elif ev.kind == "peer_banned":
            self.driver._count("fetch.bans")
            log.warning(
                "%s %s: peer %s banned: %s",
                m.name,
                m.version,
                ev.peer,
                ev.detail,
                extra={"release": f"{m.name} {m.version}", "peer": ev.peer},
            )
        elif ev.kind == "origin_fallback":
            log.info("%s %s: falling back to the origin (%s)", m.name, m.version, ev.detail)
        else:
            log.debug("%s %s: %s %s %s", m.name, m.version, ev.kind, ev.peer, ev.detail)


class FetchDriver:
    """Every release being fetched on this node, each pumped through its Swarm."""

    def __init__(
        self,
        *,
        name: str,
        site: str,
        members: Mapping[str, Member],
        client: PeerFetcher,
        store: ChunkStore,
        transfer: TransferStats,
        counters: Counters,
        swarm_config: SwarmConfig,
        spawn: Spawn,
        now: Callable[[], float],
        on_complete: Callable[[ReleaseFetch], None],
        on_progress: Callable[[], None],
        on_disk_full: Callable[[ReleaseFetch], None] | None = None,
        histograms: Histograms | None = None,
        assembly_for: Callable[[Manifest], Assembly | None] | None = None,
    ) -> None:
        self.name = name
        self.site = site
        self.members = members  # the service's view, kept current by it
        self.client = client
        self.store = store
        self.transfer = transfer
        self.histograms = histograms or Histograms()
        self.counters = counters
        self.swarm_config = swarm_config
        self._spawn = spawn
        self.now = now
        self._on_complete = on_complete
        self._on_progress = on_progress
        self._on_disk_full = on_disk_full
        self._assembly_for = assembly_for
        self.fetches: dict[str, ReleaseFetch] = {}
        self.closed = False

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    # --- inputs from the service -----------------------------------------------------------------

    def start(self, manifest: Manifest, missing: Sequence[str]) -> None:
        """Fetch the `missing` chunks of `manifest` (none: complete at once)."""
        rid = manifest.release_id
        ids = manifest.unique_chunks()
        lacking = set(missing)
        cfg = self.swarm_config
        if not manifest.origins and cfg.origin_enabled:
            cfg = SwarmConfig(**{**cfg.__dict__, "origin_enabled": False})
        swarm = Swarm(
            [(c, manifest.chunks[c]) for c in ids],
            [c for c in ids if c not in lacking],
            random.Random(),
            self.now(),
            cfg,
        )
        fetch = ReleaseFetch(manifest, swarm, dict(manifest.chunks), self.now(), last_progress=self.now())
        fetch.assembly = self._assembly_for(manifest) if self._assembly_for is not None else None
        self.fetches[rid] = fetch
        fetch.tick = asyncio.get_running_loop().call_later(TICK, self._on_tick, fetch)
        # Same-site peers first: the swarm schedules on every update, and the first requests
        # should not go over the WAN only because a far peer happened to be listed first.
        for mem in sorted(self.members.values(), key=lambda m: (m.site != self.site, m.name)):
            self._note_peer(fetch, mem)
        self._register_all(fetch)
        self._pump(fetch)
        self._on_progress()

    def member_changed(self, mem: Member) -> None:
        """A member's entry or metadata changed: judged with the others that change within
        COALESCE, in one pass (on a timer, so it needs no later event)."""
        for fetch in self.fetches.values():
            if fetch.closed:
                continue
            fetch.news[mem.name] = mem
            if fetch.flush is None:
                fetch.flush = asyncio.get_running_loop().call_later(COALESCE, self.flush, fetch)

    def flush(self, fetch: ReleaseFetch) -> None:
        """Judge the members' news gathered for `fetch` (normally run by its timer)."""
        if fetch.flush is not None:
            fetch.flush.cancel()
            fetch.flush = None
        news, fetch.news = fetch.news, {}
        if fetch.closed or self.closed or not news:
            return
        for mem in sorted(news.values(), key=lambda m: (m.site != self.site, m.name)):
            self._note_peer(fetch, mem)
        self._register_all(fetch, only=news.keys())
        self._pump(fetch)

    def cancel(self, rid: str) -> None:
        """Stop fetching `rid` (a newer release of its name superseded it); stored chunks stay."""
        fetch = self.fetches.get(rid)
        if fetch is not None:
            self._close_fetch(fetch)

    def lost(self, fetch: ReleaseFetch, ids: Iterable[str]) -> None:
        """Chunks of a release being fetched were dropped from the store: get them again."""
        fetch.swarm.lost(ids, self.now())
        self._pump(fetch)

    def retry_now(self, fetch: ReleaseFetch) -> None:
        """The disk has room again: ask the sources that failed for lack of it at once, not
        after their back-off."""
        if fetch.closed or self.closed:
            return
        fetch.error = None
        fetch.swarm.retry_now(self.now(), sorted(fetch.disk_failed))
        fetch.disk_failed.clear()
        self._pump(fetch)

    def close(self) -> None:
        """Stop every fetch (the service is stopping): timers off, requests cancelled."""
        self.closed = True
        for fetch in list(self.fetches.values()):
            self._close_fetch(fetch)

    def swarm_counters(self) -> dict[str, int]:
        """Swarm counters summed over the releases being fetched."""
        out: dict[str, int] = {}
        for fetch in self.fetches.values():
            for k, v in fetch.swarm.counters.items():
                out[k] = out.get(k, 0) + v
        return out

    # --- who may serve us what -----------------------------------------------------------------

    def _note_peer(self, fetch: ReleaseFetch, mem: Member) -> None:
        """What `mem` holds of the release, as it announces it; judged by _register_all."""
        if fetch.closed:
            return
        entry = mem.entries.get(fetch.rid[:RID_PREFIX])
        n = len(fetch.sizes)
        if not mem.up or entry is None or entry.have == 0 or entry.total != n:
            if mem.name in fetch.peers:
                fetch.peers.discard(mem.name)
                fetch.raw.pop(mem.name, None)
                fetch.registered.pop(mem.name, None)
                fetch.swarm.peer_gone(mem.name, self.now(), schedule=False)
                fetch.unscheduled = True
        elif entry.complete:
            fetch.peers.add(mem.name)
            fetch.raw[mem.name] = None
        else:
            fetch.peers.add(mem.name)
            gossiped = mem.bitmaps.get(fetch.rid[:RID_PREFIX])
            if gossiped is not None and len(gossiped) == (n + 7) // 8:
                fetch.raw[mem.name] = gossiped  # it came with the announcement: no GET
            else:
                self._want_bitmap(fetch, mem.name)

    def _share(self, fetch: ReleaseFetch) -> tuple[int, int]:
        """(k, rank): same-site nodes that need this release (targeted, not complete when first
        seen), and our place among them. Judged from membership and the manifest's target, not
        from their announcements, so that every node of the site agrees before the first
        request. A node that completes stays in the group while it is up: were it dropped,
        every share would be dealt again and the scarce source asked again for chunks another
        node is still getting from it (origin egress 1.15x instead of about 1.0x)."""
        rid16 = fetch.rid[:RID_PREFIX]
        group = [self.name]
        for m in self.members.values():
            if m.up and m.site == self.site and fetch.manifest.matches(m.site, m.tags):
                e = m.entries.get(rid16)
                if e is None or not e.complete:
                    fetch.sharers.add(m.name)
                    group.append(m.name)
                elif m.name in fetch.sharers:
                    group.append(m.name)
        group.sort()
        return len(group), group.index(self.name)

    def _mask(self, fetch: ReleaseFetch, k: int, rank: int) -> bytes:
        key = (k, rank)
        mask = fetch.masks.get(key)
        if mask is None:
            n = len(fetch.sizes)
            mask = fetch.masks[key] = make_bitmap(range(rank, n, k), n)
        return mask

    def _register_all(self, fetch: ReleaseFetch, only: str | Iterable[str] | None = None) -> None:
        """Tell the swarm what each peer may serve us.

        Scarce sources are shared out: the chunks a peer of another site (the WAN) or the only
        complete holder of our site (a lone seed) serves us are cut to our share, chunk index
        modulo the number of same-site nodes fetching the release; the others' shares then
        come over the LAN from them. About one copy crosses a site link and leaves a seed.
        When nothing arrives for `WAN_STALL` seconds, the cut is lifted for this release.

        `only`: the peers whose news this is; the others are judged again only when what
        their views depend on (share, seeds, widening) changed. Every member's announcement
        changes every second while it fetches: judging every peer on each made the cost grow
        with the square of the site's size. The swarm is told without a scheduling pass;
        _pump runs one.
        """
        k, rank = self._share(fetch)
        local_seeds = [
            p for p in fetch.peers if fetch.raw.get(p, b"") is None and self.members[p].site == self.site
        ]
        now = self.now()
        judged = (k, rank, frozenset(local_seeds), frozenset(fetch.lone_seeds), fetch.widened)
        peers: Iterable[str] = fetch.peers
        if only is not None and judged == fetch.judged:
            names = [only] if isinstance(only, str) else only
            peers = [p for p in names if p in fetch.peers]
        fetch.judged = judged
        for peer in sorted(peers, key=lambda p: (self.members[p].site != self.site, p)):
            if peer not in fetch.raw:
                continue  # partial peer whose bitmap has not come yet
            mem = self.members[peer]
            raw = fetch.raw[peer]
            same = mem.site == self.site
            # The lone seed (the publisher) stays scarce when others complete: its uplink is
            # what the site shares; the nodes that completed serve the rest.
            if raw is None and same and len(local_seeds) == 1:
                fetch.lone_seeds.add(peer)
            scarce = not same or (raw is None and peer in fetch.lone_seeds)
            view: bytes | None = raw
            if scarce and k > 1 and not fetch.widened:
                mask = self._mask(fetch, k, rank)
                if raw is None:
                    view = mask
                else:  # one big-int AND, not a Python loop per byte (this runs per update)
                    view = (int.from_bytes(raw, "big") & int.from_bytes(mask, "big")).to_bytes(
                        len(mask), "big"
                    )
            if peer in fetch.registered and fetch.registered[peer] == view:
                continue
            fetch.registered[peer] = view
            fetch.unscheduled = True
            if view is None:
                fetch.swarm.peer_update(
                    peer, now, site=mem.site, same_site=same, complete=True, schedule=False
                )
            else:
                seed = raw is None  # complete, cut to our share
                fetch.swarm.peer_update(
                    peer, now, site=mem.site, same_site=same, bitmap=view, seed=seed, schedule=False
                )

    def _on_tick(self, fetch: ReleaseFetch) -> None:
        """Once a second while fetching: lift the share cut when nothing arrives."""
        fetch.tick = None
        if fetch.closed or self.closed:
            return
        # A stall, not a wait: nothing on the network either. Requests still in flight (a
        # busy publisher sharing its uplink between many nodes' first pieces) are waited for;
        # widening then sent every node to the publisher for everything (3.5x its egress at
        # 32 hosts). A hung request ends at its deadline, and the stall is judged then.
        stalled = not fetch.net_phase and self.now() - fetch.last_progress > WAN_STALL
        if not fetch.widened and stalled:
            fetch.widened = True
            self._count("fetch.widened")
            log.info(
                "%s %s: no progress for %.0fs; asking every peer for everything",
                fetch.manifest.name,
                fetch.manifest.version,
                WAN_STALL,
            )
            self._register_all(fetch)
            self._pump(fetch)
        fetch.tick = asyncio.get_running_loop().call_later(TICK, self._on_tick, fetch)

    def _want_bitmap(self, fetch: ReleaseFetch, peer: str) -> None:
        if peer in fetch.bitmap_busy:
            fetch.bitmap_dirty.add(peer)
            return
        fetch.bitmap_busy.add(peer)
        task = self._spawn(self._bitmap_loop(fetch, peer))
        fetch.tasks.add(task)
        task.add_done_callback(fetch.tasks.discard)

    async def _bitmap_loop(self, fetch: ReleaseFetch, peer: str) -> None:
        try:
            while not fetch.closed:
                fetch.bitmap_dirty.discard(peer)
                mem = self.members.get(peer)
                if mem is None or not mem.up:
                    return
                started = self.now()
                try:
                    bitmap = await self.client.bitmap(mem.addr, fetch.rid, len(fetch.sizes), to=mem.node_id)
                except (PeerProtocolError, aiohttp.ClientError, TimeoutError, OSError) as e:
                    self._count("bitmap.errors")
                    log.debug("bitmap of %s from %s: %s", fetch.rid[:16], peer, e)
                    bitmap = None
                if bitmap is not None and not fetch.closed and peer in fetch.peers:
                    fetch.raw[peer] = bitmap
                    self._register_all(fetch, only=peer)
                    self._pump(fetch)
                if peer not in fetch.bitmap_dirty:
                    return
                await asyncio.sleep(max(0.0, BITMAP_INTERVAL - (self.now() - started)))
        finally:
            fetch.bitmap_busy.discard(peer)

    # --- the pump ------------------------------------------------------------------------------

    def _pump(self, fetch: ReleaseFetch) -> None:
        """Carry out what the swarm asked for, then re-arm its timer."""
        if fetch.closed or self.closed:
            return
        if fetch.unscheduled:
            fetch.unscheduled = False
            fetch.swarm.reschedule(self.now())
        effects = _SwarmEffects(self, fetch)
        drain(fetch.swarm, effects)
        if effects.complete:
            self._close_fetch(fetch, cancel_requests=True)
            self._on_complete(fetch)
            return
        self._arm(fetch)
        self._on_progress()

    def _arm(self, fetch: ReleaseFetch) -> None:
        deadline = fetch.swarm.get_timer()
        if fetch.timer is None:
            fetch.timer = DeadlineTimer(functools.partial(self._on_timer, fetch))
        if deadline is None:
            fetch.timer.cancel()
        else:
            fetch.timer.arm(deadline)

    def _on_timer(self, fetch: ReleaseFetch) -> None:
        if fetch.closed:
            return
        fetch.swarm.handle_timer(self.now())
        self._pump(fetch)

    def _close_fetch(self, fetch: ReleaseFetch, cancel_requests: bool = True) -> None:
        fetch.closed = True
        for handle in (fetch.timer, fetch.tick, fetch.flush):
            if handle is not None:
                handle.cancel()
        fetch.timer = fetch.tick = fetch.flush = None
        fetch.news.clear()
        if cancel_requests:
            for task in list(fetch.net_phase.values()):
                task.cancel()
            fetch.net_phase.clear()
        if self.fetches.get(fetch.rid) is fetch:
            del self.fetches[fetch.rid]

    # --- requests ------------------------------------------------------------------------------

    async def _run_request(self, fetch: ReleaseFetch, req: FetchRequest) -> None:
        result: tuple[Outcome, list[str]] | None
        try:
            if req.peer == ORIGIN:
                result = await self._origin_request(fetch, req)
            else:
                result = await self._peer_request(fetch, req)
        except asyncio.CancelledError:
            return  # the swarm cancelled it (or we are stopping): nothing to report
        if result is None or fetch.closed:
            return
        outcome, received = result
        if received:
            fetch.last_progress = self.now()
        fetch.swarm.fetch_done(req.request_id, outcome, self.now(), received=received)
        self._pump(fetch)

    def _progress_reporter(self, fetch: ReleaseFetch, request_id: int) -> Callable[[], None]:
        """Tells the swarm an answer is still flowing, at most every PROGRESS_EVERY seconds."""
        last = [-PROGRESS_EVERY]

        def on_data() -> None:
            now = self.now()
            if now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                fetch.swarm.answer_flowing(request_id, now)

        return on_data

    async def _peer_request(self, fetch: ReleaseFetch, req: FetchRequest) -> tuple[Outcome, list[str]] | None:
        mem = self.members.get(req.peer)
        if mem is None or not mem.up:
            return Outcome.ERROR, []
        task = asyncio.current_task()
        assert task is not None
        fetch.net_phase[req.request_id] = task
        # The swarm's deadline moves while the answer flows (Swarm.answer_flowing) and it cancels
        # this task when that deadline passes; the client's own bounds are only a backstop.
        timeout = HARD_CAP_FACTOR * (max(1.0, req.deadline - self.now()) + 1.0)
        source = "site" if mem.site == self.site else "remote_site"
        started = self.now()
        try:
            stored = await self.client.chunks(
                mem.addr,
                req.chunks,
                [fetch.sizes[c] for c in req.chunks],
                timeout,
                to=mem.node_id,
                on_data=self._progress_reporter(fetch, req.request_id),
            )
        except PeerProtocolError as e:
            log.info("chunk request to %s failed: %s", req.peer, e, extra={"peer": req.peer})
            return Outcome.ERROR, []
        except TimeoutError:
            self._count("fetch.timeouts")
            return Outcome.TIMEOUT, []
        except (aiohttp.ClientError, OSError) as e:
            self._count("fetch.errors")
            log.debug("chunk request to %s failed: %r", req.peer, e)
            return Outcome.ERROR, []
        finally:
            fetch.net_phase.pop(req.request_id, None)
        got = sum(len(s) for s in stored if s)
        self.transfer.received(fetch.rid, source, got)
        self._count("fetch.bytes.same_site" if mem.site == self.site else "fetch.bytes.other_site", got)
        pairs = list(zip(req.chunks, stored, strict=True))
        received, bad, err, full = await asyncio.to_thread(self._store_piece, pairs, fetch.assembly)
        self.histograms.chunk_fetch.labels(source=source).observe(self.now() - started)
        if err:
            fetch.error = err
        if full:
            self._disk_full(fetch, req.peer)
        if bad:
            self._count("fetch.bad_hash", bad)
            log.warning(
                "%s sent %d chunk(s) with a wrong hash for %s %s",
                req.peer,
                bad,
                fetch.manifest.name,
                fetch.manifest.version,
            )
            return Outcome.BAD_HASH, received
        if len(received) < len(req.chunks):
            self._count("fetch.short")
        return Outcome.OK, received

    def _disk_full(self, fetch: ReleaseFetch, source: str) -> None:
        fetch.disk_failed.add(source)
        if self._on_disk_full is not None and not fetch.closed:
            self._on_disk_full(fetch)

    def _store_piece(
        self, pairs: list[tuple[str, memoryview | None]], assembly: Assembly | None = None
    ) -> tuple[list[str], int, str | None, bool]:
        """Verify and store (thread): raw chunks written into the release being assembled
        (ChunkStore.put_placed; made durable with the whole release, see release/assembly.py),
        the others in a pack, one barrier per piece (put_many).
        (stored ids, bad hashes, store error, the disk is full)."""
        placed: list[tuple[str, memoryview]] = []
        packed: list[tuple[str, bytes | memoryview]] = []
        for cid, stored in pairs:
            if stored is None:
                continue
            if (
                assembly is not None
                and len(stored) > HEADER_SIZE
                and stored[0] == FLAG_RAW
                and assembly.fits(cid, len(stored) - HEADER_SIZE)
            ):
                placed.append((cid, stored))
            else:
                packed.append((cid, stored))
        res = self.store.put_many(packed)
        if assembly is not None and placed:
            more = self.store.put_placed(placed, assembly.place)
            res.stored += more.stored
            res.bad += more.bad
            res.error = res.error or more.error
        err: str | None = None
        full = False
        if res.error is not None:
            e = res.error
            err = str(e)
            full = isinstance(e, DiskFullError)
            self._count("store.errors")
            # A full disk is reported once by whoever watches free space, not per request.
            log.log(logging.DEBUG if full and self._on_disk_full else logging.ERROR, "%s", e)
        return res.stored, len(res.bad), err, full

    async def _origin_request(self, fetch: ReleaseFetch, req: FetchRequest) -> tuple[Outcome, list[str]]:
        received: list[str] = []
        bad = failed = False
        timeout = max(2.0, req.deadline - self.now())
        for cid in req.chunks:
            started = self.now()
            data: bytes | None = None
            for base in fetch.manifest.origins:
                url = base.rstrip("/") + f"/chunks/{cid[:2]}/{cid[2:]}"
                try:
                    data = await self.client.origin_chunk(url, timeout)
                except (PeerProtocolError, aiohttp.ClientError, TimeoutError, OSError) as e:
                    self._count("origin.errors")
                    log.debug("origin %s: %r", url, e)
                    continue
                if data is not None:
                    break
            if data is None:
                failed = True
                continue
            try:
                await asyncio.to_thread(self.store.put, cid, data)
            except IntegrityError:
                self._count("origin.bad_hash")
                bad = True
                continue
            except StoreError as e:
                fetch.error = str(e)
                full = isinstance(e, DiskFullError)
                log.log(logging.DEBUG if full and self._on_disk_full else logging.ERROR, "%s", e)
                failed = True
                if full:
                    self._disk_full(fetch, ORIGIN)
                break
            self.transfer.received(fetch.rid, "origin", len(data))
            self.histograms.chunk_fetch.labels(source="origin").observe(self.now() - started)
            received.append(cid)
        if bad:
            return Outcome.BAD_HASH, received
        return (Outcome.ERROR if failed else Outcome.OK), received
