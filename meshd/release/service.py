"""The I/O side of update distribution: announce, discover, fetch, verify, activate, serve.

ReleaseService owns the chunk store, the installed releases and one sans-IO Swarm per release
being fetched, and carries out what each Swarm asks for over peer HTTP (meshd.release.peer),
the way NodeRuntime pumps the membership core.

Gossip carries small facts only. Each node sets, through the `set_meta_keys` callback,

    rel:<name> = "<version> <release id[:16]> <have>/<total>[ current]"[;...]

one entry per release of that name it holds or is fetching, refreshed at most every
`announce_interval` while downloading. When a member announces a release id this node does not
know, it GETs the manifest from that member, verifies the signature against the trusted
publisher keys, checks targeting (site, tags) and that the release is newer than the current
one of that name, then fetches the missing chunks: from complete peers, from partial ones after
a GET of their have-bitmap, from the manifest's origin URLs as the last resort. Every chunk is
hash-verified by ChunkStore.put; a peer that sends a bad one is banned for the release.
On completion: activate (materialise, switch current, hook, rollback), retire old versions,
collect unused chunks, announce, emit a release event.

Resume: verified chunks are on disk; start() creates a Swarm for every stored manifest with
chunks missing, with what the store has as `have`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from meshd.core.counters import Counters
from meshd.core.messages import MemberState
from meshd.core.node import MemberEvent, MemberView
from meshd.core.swarm import ORIGIN, FetchRequest, Outcome, Swarm, SwarmConfig, make_bitmap
from meshd.errors import DecodeError, IntegrityError, StateError
from meshd.metrics import TransferStats
from meshd.release.activate import ActivationError, Releases
from meshd.release.config import DistConfig
from meshd.release.manifest import Manifest
from meshd.release.peer import (
    MAX_PIECE_STORED,
    PeerFetcher,
    PeerProtocolError,
    TokenBucket,
    add_peer_routes,
)
from meshd.release.publish import publish_tree
from meshd.release.store import ChunkStore, StoreError
from meshd.wire import Codec

log = logging.getLogger("meshd.release")

META_PREFIX = "rel:"
RID_PREFIX = 16
MAX_ENTRIES_PER_NAME = 16
REJECT_RETRY = 30.0  # a manifest that failed to fetch or verify is asked for again after this
DISCOVER_RETRY = 3.0  # ... or this, when the peer simply did not answer
BITMAP_INTERVAL = 1.0  # at most one bitmap GET per peer and release per interval
WAN_STALL = 5.0  # seconds without a chunk before the share cut on scarce sources is lifted

SetMetaKeys = Callable[[dict[str, str | None]], None]
Emit = Callable[[dict[str, Any]], None]


# --- announcements in member metadata ------------------------------------------------------------


@dataclass(frozen=True)
class Announce:
    name: str
    version: str
    rid16: str
    have: int
    total: int
    current: bool = False

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.have >= self.total

    def text(self) -> str:
        return f"{self.version} {self.rid16} {self.have}/{self.total}" + (" current" if self.current else "")


_ANN_RE = re.compile(r"^(\S{1,128}) ([0-9a-f]{16}) ([0-9]{1,9})/([0-9]{1,9})( current)?$")


def parse_announcements(meta: Mapping[str, str]) -> dict[str, Announce]:
    """rid16 -> Announce from a member's metadata; malformed entries are skipped."""
    out: dict[str, Announce] = {}
    for key, value in meta.items():
        if not key.startswith(META_PREFIX) or not isinstance(value, str):
            continue
        name = key[len(META_PREFIX) :]
        for item in value.split(";")[:MAX_ENTRIES_PER_NAME]:
            m = _ANN_RE.match(item.strip())
            if m is None:
                continue
            have, total = int(m.group(3)), int(m.group(4))
            if have > total:
                continue
            out[m.group(2)] = Announce(name, m.group(1), m.group(2), have, total, bool(m.group(5)))
    return out


def _natural(version: str) -> tuple[tuple[int, int | str], ...]:
    parts = re.split(r"(\d+)", version, flags=re.ASCII)
    return tuple((0, int(p)) if p.isascii() and p.isdigit() else (1, p) for p in parts if p)


def newer(a: Manifest, b: Manifest) -> bool:
    """Whether `a` was published after `b` (creation time, then natural version order)."""
    return (a.created, _natural(a.version)) > (b.created, _natural(b.version))


# --- state ---------------------------------------------------------------------------------------


@dataclass
class _Member:
    name: str
    addr: str
    site: str
    alive: bool
    entries: dict[str, Announce]
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class _Fetch:
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
    timer: asyncio.TimerHandle | None = None
    timer_at: float = 0.0
    closed: bool = False
    error: str | None = None

    @property
    def rid(self) -> str:
        return self.manifest.release_id


@dataclass
class _Publishing:
    name: str
    version: str
    done: int = 0
    total: int = 0


# --- the service ---------------------------------------------------------------------------------


class ReleaseService:
    """Update distribution on one node. Construct, add_routes(peer_app), then start()."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        name: str,
        site: str,
        tags: Mapping[str, str],
        codec: Codec,
        trusted: Iterable[bytes] = (),
        config: DistConfig | None = None,
        set_meta_keys: SetMetaKeys | None = None,
        emit: Emit | None = None,
        transfer: TransferStats | None = None,
        swarm_config: SwarmConfig | None = None,
    ) -> None:
        self.config = config or DistConfig()
        self.name = name
        self.site = site
        self.tags = dict(tags)
        self.trusted = [bytes(k) for k in trusted]
        # Chunk data is lz4 already: seal without a second compression pass, same keyring.
        self.codec = Codec(codec.cluster, codec.keyring, compress=False)
        self.store = ChunkStore(data_dir, fsync=self.config.fsync)
        self.releases_dir = Releases(
            data_dir, self.store, keep=self.config.keep, hook=self.config.hook,
            hook_timeout=self.config.hook_timeout, fsync=self.config.fsync,
        )
        self.transfer = transfer if transfer is not None else TransferStats()
        self.swarm_config = swarm_config or self.config.swarm_config()
        self.counters = Counters()
        self.fetcher = PeerFetcher(self.codec, self.counters)
        self.upload_bucket = TokenBucket(self.config.upload_rate)
        self._set_meta_keys = set_meta_keys
        self._emit_cb = emit
        self._manifests: dict[str, Manifest] = {}
        self._complete: set[str] = set()
        self._fetches: dict[str, _Fetch] = {}
        self._activating: set[str] = set()
        self._failed: dict[str, str] = {}
        self._members: dict[str, _Member] = {}
        self._ignored: dict[str, str] = {}  # rid16 -> why (not targeted, older)
        self._rejected: dict[str, float] = {}  # rid16 -> retry after (loop time)
        self._discovering: set[str] = set()
        self._publishing: dict[str, _Publishing] = {}
        self._gc_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._announced: dict[str, str] = {}
        self._announce_at = 0.0
        self._announce_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self.loop.time()

    def add_routes(self, app: web.Application) -> None:
        add_peer_routes(app, self)

    async def start(self, members: Iterable[MemberView] = ()) -> None:
        """Recover from a crash, resume downloads, activate what completed, announce."""
        self._loop = asyncio.get_running_loop()
        found = await asyncio.to_thread(self._recover)
        self._started = True
        for manifest, _ in found:
            self._manifests[manifest.release_id] = manifest
        for manifest, missing in found:
            if missing:
                log.info("resuming %s %s: %d of %d chunks to fetch", manifest.name, manifest.version,
                         len(missing), len(manifest.chunks))
            self._start_fetch(manifest, missing)
        for m in members:
            self.member_update(m)
        self._announce(force=True)

    def _recover(self) -> list[tuple[Manifest, list[str]]]:
        removed = self.store.clean_temp()
        if removed:
            log.info("removed %d temp files left by a crash", removed)
        for action in self.releases_dir.recover():
            log.warning("release recovery: %s", action)
        found: list[tuple[Manifest, list[str]]] = []
        for rid in self.store.manifests():
            try:
                manifest = Manifest.from_bytes(self.store.get_manifest(rid))
                if manifest.release_id != rid or manifest.signature is None:
                    raise IntegrityError("manifest does not match its file name or is unsigned")
                manifest.verify([manifest.signature[0]])  # intact; trust is checked at activation
            except (KeyError, DecodeError, IntegrityError) as e:
                log.warning("dropping stored manifest %s: %s", rid[:16], e)
                self.store.delete_manifest(rid)
                continue
            found.append((manifest, self.store.missing(manifest.unique_chunks())))
        return found

    async def stop(self) -> None:
        self._closed = True
        if self._announce_handle is not None:
            self._announce_handle.cancel()
        for fetch in list(self._fetches.values()):
            self._close_fetch(fetch)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.fetcher.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._count("errors")
            log.error("distribution task failed", exc_info=task.exception())

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def _emit(self, manifest: Manifest, state: str, detail: str = "") -> None:
        ev = {"kind": "release", "name": manifest.name, "version": manifest.version,
              "id": manifest.release_id, "state": state, "node": self.name}
        if detail:
            ev["detail"] = detail
        if self._emit_cb is not None:
            try:
                self._emit_cb(ev)
            except Exception:
                log.exception("release event listener failed")

    # --- membership input --------------------------------------------------------------------

    def handle_member_event(self, ev: MemberEvent) -> None:
        """Feed a member event from the runtime (join, update, suspect, dead, left, alive)."""
        if ev.kind == "keyring":
            return
        self.member_update(ev.member)

    def member_update(self, m: MemberView) -> None:
        if m.name == self.name or self._closed:
            return
        alive = m.state == MemberState.ALIVE
        meta = m.meta or {}
        tags = {k[4:]: v for k, v in meta.items() if k.startswith("tag:")}
        mem = _Member(m.name, m.addr, meta.get("site", "default"), alive,
                      parse_announcements(meta) if alive else {}, tags)
        self._members[m.name] = mem
        if not self._started:
            return
        for fetch in list(self._fetches.values()):
            self._refresh_peer(fetch, mem)
        for entry in mem.entries.values():
            self._maybe_discover(entry, mem)

    def _known(self, rid16: str) -> bool:
        return any(rid.startswith(rid16) for rid in self._manifests)

    def _maybe_discover(self, entry: Announce, mem: _Member) -> None:
        rid16 = entry.rid16
        if rid16 in self._discovering or rid16 in self._ignored or self._known(rid16):
            return
        if self._rejected.get(rid16, 0.0) > self.now():
            return
        if entry.have == 0:
            return  # nothing to get from it yet; its manifest comes with its next update
        self._discovering.add(rid16)
        self._spawn(self._discover(entry, mem))

    async def _discover(self, entry: Announce, mem: _Member) -> None:
        rid16 = entry.rid16
        try:
            try:
                doc = await self.fetcher.manifest(mem.addr, rid16)
            except (PeerProtocolError, aiohttp.ClientError, TimeoutError, OSError) as e:
                self._count("discover.errors")
                log.debug("manifest %s from %s: %s", rid16, mem.name, e)
                self._rejected[rid16] = self.now() + DISCOVER_RETRY
                return
            if doc is None:
                self._rejected[rid16] = self.now() + DISCOVER_RETRY
                return
            manifest = self._check_manifest(doc, rid16, mem.name)
            if manifest is None or self._closed or manifest.release_id in self._manifests:
                return
            await self._adopt(manifest)
        finally:
            self._discovering.discard(rid16)

    def _check_manifest(self, doc: bytes, rid16: str, source: str) -> Manifest | None:
        """Parse, verify and judge a manifest a peer served; None (counted) when not for us."""
        try:
            manifest = Manifest.from_bytes(doc)
        except DecodeError as e:
            self._count("manifests.invalid")
            log.warning("manifest %s from %s is malformed: %s", rid16, source, e)
            self._rejected[rid16] = self.now() + REJECT_RETRY
            return None
        if not manifest.release_id.startswith(rid16):
            self._count("manifests.invalid")
            log.warning("%s served manifest %s for release %s", source, manifest.release_id[:16], rid16)
            self._rejected[rid16] = self.now() + REJECT_RETRY
            return None
        try:
            manifest.verify(self.trusted)
        except IntegrityError as e:
            self._count("manifests.refused")
            log.warning("refusing release from %s: %s", source, e)
            self._emit(manifest, "refused", str(e))
            self._rejected[rid16] = self.now() + REJECT_RETRY
            return None
        if not manifest.matches(self.site, self.tags):
            self._count("releases.ignored")
            self._ignored[rid16] = "not targeted at this node"
            log.info("release %s %s is not targeted at this node (site %s); ignored",
                     manifest.name, manifest.version, self.site)
            return None
        current = self._current_manifest(manifest.name)
        if current is not None and not newer(manifest, current):
            self._count("releases.older")
            self._ignored[rid16] = f"not newer than current {current.version}"
            return None
        if self._version_taken(manifest):
            self._count("releases.conflict")
            self._ignored[rid16] = "version already installed with other content"
            log.warning("release %s %s (%s) conflicts with an installed one of the same version",
                        manifest.name, manifest.version, rid16)
            return None
        return manifest

    def _version_taken(self, manifest: Manifest) -> bool:
        return any(
            m.name == manifest.name and m.version == manifest.version and rid != manifest.release_id
            for rid, m in self._manifests.items()
        )

    async def _adopt(self, manifest: Manifest) -> None:
        """Store a verified manifest and start fetching what the store lacks."""
        rid = manifest.release_id

        def prepare() -> list[str]:
            self.store.put_manifest(rid, manifest.to_bytes())
            return self.store.missing(manifest.unique_chunks())

        try:
            missing = await asyncio.to_thread(prepare)
        except StoreError as e:
            log.error("cannot store manifest of %s %s: %s", manifest.name, manifest.version, e)
            self._rejected[rid[:RID_PREFIX]] = self.now() + REJECT_RETRY
            return
        if self._closed or rid in self._manifests:
            return
        self._manifests[rid] = manifest
        log.info("fetching %s %s (%s): %d of %d chunks, %d bytes", manifest.name, manifest.version,
                 rid[:16], len(missing), len(manifest.chunks), manifest.total_size)
        self._emit(manifest, "downloading")
        self._start_fetch(manifest, missing)

    # --- fetching ----------------------------------------------------------------------------

    def _start_fetch(self, manifest: Manifest, missing: Sequence[str]) -> None:
        rid = manifest.release_id
        ids = manifest.unique_chunks()
        lacking = set(missing)
        cfg = self.swarm_config
        if not manifest.origins and cfg.origin_enabled:
            cfg = SwarmConfig(**{**cfg.__dict__, "origin_enabled": False})
        swarm = Swarm([(c, manifest.chunks[c]) for c in ids], [c for c in ids if c not in lacking],
                      random.Random(), self.now(), cfg)
        fetch = _Fetch(manifest, swarm, dict(manifest.chunks), self.now(), last_progress=self.now())
        self._fetches[rid] = fetch
        fetch.tick = self.loop.call_later(1.0, self._on_tick, fetch)
        # Same-site peers first: the swarm schedules on every update, and the first requests
        # should not go over the WAN only because a far peer happened to be listed first.
        for mem in sorted(self._members.values(), key=lambda m: (m.site != self.site, m.name)):
            self._refresh_peer(fetch, mem, pump=False)
        self._pump(fetch)
        self._announce()

    def _refresh_peer(self, fetch: _Fetch, mem: _Member, pump: bool = True) -> None:
        if fetch.closed:
            return
        entry = mem.entries.get(fetch.rid[:RID_PREFIX])
        n = len(fetch.sizes)
        if not mem.alive or entry is None or entry.have == 0 or entry.total != n:
            if mem.name in fetch.peers:
                fetch.peers.discard(mem.name)
                fetch.raw.pop(mem.name, None)
                fetch.registered.pop(mem.name, None)
                fetch.swarm.peer_gone(mem.name, self.now())
        elif entry.complete:
            fetch.peers.add(mem.name)
            fetch.raw[mem.name] = None
        else:
            fetch.peers.add(mem.name)
            self._want_bitmap(fetch, mem.name)
        # Who shares the scarce sources changes with any member: re-judge every peer.
        self._register_all(fetch)
        if pump:
            self._pump(fetch)

    def _share(self, fetch: _Fetch) -> tuple[int, int]:
        """(k, rank): same-site nodes that need this release (targeted, not complete), and our
        place among them. Judged from membership and the manifest's target, not from their
        announcements, so that every node of the site agrees before the first request."""
        rid16 = fetch.rid[:RID_PREFIX]
        group = [self.name]
        for m in self._members.values():
            if m.alive and m.site == self.site and fetch.manifest.matches(m.site, m.tags):
                e = m.entries.get(rid16)
                if e is None or not e.complete:
                    group.append(m.name)
        group.sort()
        return len(group), group.index(self.name)

    def _mask(self, fetch: _Fetch, k: int, rank: int) -> bytes:
        key = (k, rank)
        mask = fetch.masks.get(key)
        if mask is None:
            n = len(fetch.sizes)
            mask = fetch.masks[key] = make_bitmap(range(rank, n, k), n)
        return mask

    def _register_all(self, fetch: _Fetch) -> None:
        """Tell the swarm what each peer may serve us.

        Scarce sources are shared out: the chunks a peer of another site (the WAN) or the only
        complete holder of our site (a lone seed) serves us are cut to our share, chunk index
        modulo the number of same-site nodes fetching the release; the others' shares then
        come over the LAN from them. About one copy crosses a site link and leaves a seed.
        When nothing arrives for `WAN_STALL` seconds, the cut is lifted for this release.
        """
        k, rank = self._share(fetch)
        local_seeds = [p for p in fetch.peers if fetch.raw.get(p, b"") is None
                       and self._members[p].site == self.site]
        now = self.now()
        n = len(fetch.sizes)
        for peer in sorted(fetch.peers, key=lambda p: (self._members[p].site != self.site, p)):
            if peer not in fetch.raw:
                continue  # partial peer whose bitmap has not come yet
            mem = self._members[peer]
            raw = fetch.raw[peer]
            same = mem.site == self.site
            scarce = not same or (raw is None and len(local_seeds) == 1)
            view: bytes | None = raw
            if scarce and k > 1 and not fetch.widened:
                mask = self._mask(fetch, k, rank)
                full = raw if raw is not None else make_bitmap(range(n), n)
                view = bytes(a & b for a, b in zip(full, mask, strict=True))
            if peer in fetch.registered and fetch.registered[peer] == view:
                continue
            fetch.registered[peer] = view
            if view is None:
                fetch.swarm.peer_update(peer, now, site=mem.site, same_site=same, complete=True)
            else:
                fetch.swarm.peer_update(peer, now, site=mem.site, same_site=same, bitmap=view)

    def _on_tick(self, fetch: _Fetch) -> None:
        """Once a second while fetching: lift the share cut when nothing arrives."""
        fetch.tick = None
        if fetch.closed or self._closed:
            return
        if not fetch.widened and self.now() - fetch.last_progress > WAN_STALL:
            fetch.widened = True
            self._count("fetch.widened")
            log.info("%s %s: no progress for %.0fs; asking every peer for everything",
                     fetch.manifest.name, fetch.manifest.version, WAN_STALL)
            self._register_all(fetch)
            self._pump(fetch)
        fetch.tick = self.loop.call_later(1.0, self._on_tick, fetch)

    def _want_bitmap(self, fetch: _Fetch, peer: str) -> None:
        if peer in fetch.bitmap_busy:
            fetch.bitmap_dirty.add(peer)
            return
        fetch.bitmap_busy.add(peer)
        task = self._spawn(self._bitmap_loop(fetch, peer))
        fetch.tasks.add(task)
        task.add_done_callback(fetch.tasks.discard)

    async def _bitmap_loop(self, fetch: _Fetch, peer: str) -> None:
        try:
            while not fetch.closed:
                fetch.bitmap_dirty.discard(peer)
                mem = self._members.get(peer)
                if mem is None or not mem.alive:
                    return
                started = self.now()
                try:
                    bitmap = await self.fetcher.bitmap(mem.addr, fetch.rid, len(fetch.sizes))
                except (PeerProtocolError, aiohttp.ClientError, TimeoutError, OSError) as e:
                    self._count("bitmap.errors")
                    log.debug("bitmap of %s from %s: %s", fetch.rid[:16], peer, e)
                    bitmap = None
                if bitmap is not None and not fetch.closed and peer in fetch.peers:
                    fetch.raw[peer] = bitmap
                    self._register_all(fetch)
                    self._pump(fetch)
                if peer not in fetch.bitmap_dirty:
                    return
                await asyncio.sleep(max(0.0, BITMAP_INTERVAL - (self.now() - started)))
        finally:
            fetch.bitmap_busy.discard(peer)

    def _pump(self, fetch: _Fetch) -> None:
        """Carry out what the swarm asked for, then re-arm its timer."""
        if fetch.closed or self._closed:
            return
        swarm = fetch.swarm
        for req in swarm.requests_to_send():
            task = self._spawn(self._run_request(fetch, req))
            fetch.tasks.add(task)
            task.add_done_callback(fetch.tasks.discard)
        for rid in swarm.requests_to_cancel():
            net = fetch.net_phase.pop(rid, None)
            if net is not None:
                net.cancel()  # only while still on the network: stored chunks always count
        complete = False
        for ev in swarm.events():
            if ev.kind == "complete":
                complete = True
            elif ev.kind == "peer_banned":
                self._count("fetch.bans")
                log.warning("%s %s: peer %s banned: %s", fetch.manifest.name,
                            fetch.manifest.version, ev.peer, ev.detail)
            elif ev.kind == "origin_fallback":
                log.info("%s %s: falling back to the origin (%s)", fetch.manifest.name,
                         fetch.manifest.version, ev.detail)
            else:
                log.debug("%s %s: %s %s %s", fetch.manifest.name, fetch.manifest.version,
                          ev.kind, ev.peer, ev.detail)
        if complete:
            self._close_fetch(fetch, cancel_requests=True)
            self._spawn(self._finish(fetch))
            return
        self._arm(fetch)
        self._announce()

    def _arm(self, fetch: _Fetch) -> None:
        deadline = fetch.swarm.get_timer()
        if deadline is None:
            if fetch.timer is not None:
                fetch.timer.cancel()
                fetch.timer = None
            return
        if fetch.timer is not None:
            if deadline == fetch.timer_at:
                return
            fetch.timer.cancel()
        fetch.timer_at = deadline
        fetch.timer = self.loop.call_at(deadline, self._on_timer, fetch)

    def _on_timer(self, fetch: _Fetch) -> None:
        fetch.timer = None
        if fetch.closed:
            return
        fetch.swarm.handle_timer(self.now())
        self._pump(fetch)

    def _close_fetch(self, fetch: _Fetch, cancel_requests: bool = True) -> None:
        fetch.closed = True
        for handle in (fetch.timer, fetch.tick):
            if handle is not None:
                handle.cancel()
        fetch.timer = fetch.tick = None
        if cancel_requests:
            for task in list(fetch.net_phase.values()):
                task.cancel()
            fetch.net_phase.clear()
        if self._fetches.get(fetch.rid) is fetch:
            del self._fetches[fetch.rid]

    async def _run_request(self, fetch: _Fetch, req: FetchRequest) -> None:
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

    async def _peer_request(self, fetch: _Fetch, req: FetchRequest) -> tuple[Outcome, list[str]] | None:
        mem = self._members.get(req.peer)
        if mem is None or not mem.alive:
            return Outcome.ERROR, []
        task = asyncio.current_task()
        assert task is not None
        fetch.net_phase[req.request_id] = task
        timeout = max(1.0, req.deadline - self.now()) + 1.0
        try:
            stored = await self.fetcher.chunks(mem.addr, req.chunks,
                                               [fetch.sizes[c] for c in req.chunks], timeout)
        except PeerProtocolError as e:
            log.info("chunk request to %s failed: %s", req.peer, e)
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
        self.transfer.received_bytes += got
        self._count("fetch.bytes.same_site" if mem.site == self.site else "fetch.bytes.other_site", got)
        pairs = list(zip(req.chunks, stored, strict=True))
        received, bad, err = await asyncio.to_thread(self._store_piece, pairs)
        if err:
            fetch.error = err
        if bad:
            self._count("fetch.bad_hash", bad)
            log.warning("%s sent %d chunk(s) with a wrong hash for %s %s", req.peer, bad,
                        fetch.manifest.name, fetch.manifest.version)
            return Outcome.BAD_HASH, received
        if len(received) < len(req.chunks):
            self._count("fetch.short")
        return Outcome.OK, received

    def _store_piece(self, pairs: list[tuple[str, bytes | None]]) -> tuple[list[str], int, str | None]:
        """Verify and store (thread). (stored ids, bad hashes, store error)."""
        received: list[str] = []
        bad = 0
        err: str | None = None
        for cid, stored in pairs:
            if stored is None:
                continue
            try:
                self.store.put(cid, stored)
            except IntegrityError:
                bad += 1
                continue
            except StoreError as e:
                err = str(e)
                self._count("store.errors")
                log.error("%s", e)
                break
            received.append(cid)
        return received, bad, err

    async def _origin_request(self, fetch: _Fetch, req: FetchRequest) -> tuple[Outcome, list[str]]:
        received: list[str] = []
        bad = failed = False
        timeout = max(2.0, req.deadline - self.now())
        for cid in req.chunks:
            data: bytes | None = None
            for base in fetch.manifest.origins:
                url = base.rstrip("/") + f"/chunks/{cid[:2]}/{cid[2:]}"
                try:
                    data = await self.fetcher.origin_chunk(url, timeout)
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
                log.error("%s", e)
                failed = True
                break
            self.transfer.origin_bytes += len(data)
            received.append(cid)
        if bad:
            return Outcome.BAD_HASH, received
        return (Outcome.ERROR if failed else Outcome.OK), received

    # --- completion ----------------------------------------------------------------------------

    def _current_manifest(self, name: str) -> Manifest | None:
        version = self.releases_dir.current(name)
        if version is None:
            return None
        rid = self.releases_dir.release_id(name, version)
        return self._manifests.get(rid) if rid else None

    def _installed_rids(self, name: str) -> set[str]:
        out = set()
        for version in self.releases_dir.installed(name):
            rid = self.releases_dir.release_id(name, version)
            if rid:
                out.add(rid)
        return out

    async def _finish(self, fetch: _Fetch) -> None:
        manifest = fetch.manifest
        rid = manifest.release_id
        self._complete.add(rid)
        took = self.now() - fetch.started
        log.info("%s %s (%s) complete in %.1fs", manifest.name, manifest.version, rid[:16], took)
        self._emit(manifest, "complete")
        self._announce(force=True)
        await self._maybe_activate(manifest)
        self._announce(force=True)

    async def _maybe_activate(self, manifest: Manifest) -> None:
        rid = manifest.release_id
        name = manifest.name
        if rid in self._installed_rids(name) or rid in self._failed:
            return
        if manifest.signature is None or manifest.signature[0] not in self.trusted:
            return  # held for others (published here with a key this node does not trust)
        if not manifest.matches(self.site, self.tags):
            return
        current = self._current_manifest(name)
        if current is not None and not newer(manifest, current):
            self._count("releases.older")
            return
        self._activating.add(rid)
        try:
            result = await asyncio.to_thread(self.releases_dir.activate, manifest)
        except IntegrityError as e:
            # A chunk rotted between verification and materialising: the store dropped it.
            self._complete.discard(rid)
            log.warning("%s %s: %s; fetching it again", name, manifest.version, e)
            missing = await asyncio.to_thread(self.store.missing, manifest.unique_chunks())
            self._start_fetch(manifest, missing)
            return
        except (ActivationError, StoreError) as e:
            self._failed[rid] = str(e)
            self._count("activations.failed")
            log.error("activation of %s %s failed: %s", name, manifest.version, e)
            self._emit(manifest, "failed", str(e))
            return
        finally:
            self._activating.discard(rid)
        self._count("activations")
        log.info("%s %s is current (was %s)%s", name, manifest.version, result.previous or "none",
                 f"; retired {', '.join(result.retired)}" if result.retired else "")
        self._emit(manifest, "active")
        await self.collect_garbage()

    async def collect_garbage(self) -> int:
        """Forget retired manifests and delete chunks no stored manifest needs."""
        async with self._gc_lock:
            def work() -> int:
                for rid in list(self._manifests):
                    if not self.store.has_manifest(rid) and rid not in self._fetches:
                        self._manifests.pop(rid, None)
                        self._complete.discard(rid)
                keep: set[str] = set()
                for m in list(self._manifests.values()):
                    keep.update(m.chunks)
                return self.store.gc(keep)

            removed = await asyncio.to_thread(work)
        if removed:
            log.info("collected %d unused chunks", removed)
        self._count("gc.chunks", removed)
        return removed

    # --- publishing ----------------------------------------------------------------------------

    async def publish(
        self,
        path: str | os.PathLike[str],
        name: str,
        version: str,
        key_file: str | os.PathLike[str],
        *,
        site: str | None = None,
        tags: Mapping[str, str] | None = None,
        origins: Sequence[str] = (),
        origin_dir: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Chunk, store, sign; this node becomes the first holder and announces it.

        PublishError / ConfigError / IntegrityError / StoreError / StateError (version taken).
        """
        for m in self._manifests.values():
            if m.name == name and m.version == version:
                raise StateError(f"release {name} {version} exists already ({m.release_id[:16]}); "
                                 "publish a new version")
        key = f"{name} {version}"
        if key in self._publishing:
            raise StateError(f"release {name} {version} is being published already")
        progress = self._publishing[key] = _Publishing(name, version)

        def on_progress(done: int, total: int) -> None:
            progress.done, progress.total = done, total

        try:
            async with self._gc_lock:  # no gc between storing chunks and storing the manifest
                result = await asyncio.to_thread(
                    publish_tree, self.store, Path(path), name, version, key_file,
                    site=site, tags=tags, origins=origins, origin_dir=origin_dir,
                    progress=on_progress,
                )
        finally:
            self._publishing.pop(key, None)
        manifest = result.manifest
        rid = manifest.release_id
        self._count("published")
        log.info("published %s %s (%s): %d files, %d bytes, %d chunks (%d new)", name, version,
                 rid[:16], len(manifest.files), manifest.total_size, len(manifest.chunks),
                 result.new_chunks)
        if rid not in self._manifests:
            self._manifests[rid] = manifest
            self._emit(manifest, "published")
            self._start_fetch(manifest, [])  # complete at once: activates here when targeted
        return {
            "id": rid, "name": name, "version": version, "size": manifest.total_size,
            "files": len(manifest.files), "chunks": len(manifest.chunks),
            "new_chunks": result.new_chunks, "stored_bytes": result.stored_bytes,
            "origin_dir": result.origin_dir, "origins": list(manifest.origins),
            "target": {"site": manifest.target.site, "tags": dict(manifest.target.tags or {})},
        }

    # --- announcing --------------------------------------------------------------------------

    def _have(self, rid: str) -> int:
        fetch = self._fetches.get(rid)
        if fetch is not None:
            return fetch.swarm.progress().have_chunks
        return len(self._manifests[rid].chunks) if rid in self._complete else 0

    def announcements(self) -> dict[str, str]:
        by_name: dict[str, list[Manifest]] = {}
        for m in self._manifests.values():
            by_name.setdefault(m.name, []).append(m)
        out: dict[str, str] = {}
        for name, ms in by_name.items():
            current = self.releases_dir.current(name)
            ms.sort(key=lambda m: (m.created, _natural(m.version)))
            entries = [
                Announce(name, m.version, m.release_id[:RID_PREFIX], self._have(m.release_id),
                         len(m.chunks), m.version == current and m.release_id in self._complete).text()
                for m in ms[-MAX_ENTRIES_PER_NAME:]
            ]
            out[META_PREFIX + name] = ";".join(entries)
        return out

    def _announce(self, force: bool = False) -> None:
        if self._set_meta_keys is None or self._closed or not self._started:
            return
        wanted = self.announcements()
        if wanted == self._announced:
            return
        now = self.now()
        wait = self._announce_at + self.config.announce_interval - now
        if not force and wait > 0:
            if self._announce_handle is None:
                self._announce_handle = self.loop.call_later(wait, self._announce_later)
            return
        if self._announce_handle is not None:
            self._announce_handle.cancel()
            self._announce_handle = None
        updates: dict[str, str | None] = {k: v for k, v in wanted.items() if self._announced.get(k) != v}
        updates.update({k: None for k in self._announced if k not in wanted})
        self._announced = wanted
        self._announce_at = now
        try:
            self._set_meta_keys(updates)
        except Exception:
            log.exception("cannot update node metadata")

    def _announce_later(self) -> None:
        self._announce_handle = None
        self._announce(force=True)

    # --- serving (PeerBackend) ------------------------------------------------------------------

    def _find(self, rid: str) -> str | None:
        if rid in self._manifests:
            return rid
        hits = [r for r in self._manifests if r.startswith(rid)]
        return hits[0] if len(hits) == 1 else None

    def manifest_document(self, rid: str) -> bytes | None:
        full = self._find(rid)
        return self._manifests[full].to_bytes() if full else None

    def bitmap(self, rid: str) -> bytes | None:
        full = self._find(rid)
        if full is None:
            return None
        fetch = self._fetches.get(full)
        if fetch is not None:
            return fetch.swarm.local_bitmap()
        n = len(self._manifests[full].chunks)
        return make_bitmap(range(n), n) if full in self._complete else None

    async def read_stored(self, ids: list[str]) -> list[bytes | None]:
        stored, damaged = await asyncio.to_thread(self._read_piece, ids)
        if damaged:
            self._on_damaged(damaged)
        return stored

    def _read_piece(self, ids: list[str]) -> tuple[list[bytes | None], list[str]]:
        out: list[bytes | None] = []
        damaged: list[str] = []
        total = 0
        for cid in ids:
            if total >= MAX_PIECE_STORED:
                out.append(None)
                continue
            try:
                data = self.store.get_stored(cid)
            except KeyError:
                data = None
            except IntegrityError:
                damaged.append(cid)
                data = None
            except StoreError as e:
                log.error("%s", e)
                data = None
            if data is not None:
                total += len(data)
            out.append(data)
        return out, damaged

    def _on_damaged(self, ids: list[str]) -> None:
        """Chunks found rotten in our store (and dropped): fetch them again."""
        self._count("store.damaged", len(ids))
        log.warning("dropped %d damaged chunk(s) from the store; fetching them again", len(ids))
        now = self.now()
        for rid, m in list(self._manifests.items()):
            hit = [c for c in ids if c in m.chunks]
            if not hit:
                continue
            fetch = self._fetches.get(rid)
            if fetch is not None:
                fetch.swarm.lost(hit, now)
                self._pump(fetch)
            elif rid in self._complete:
                self._complete.discard(rid)
                self._start_fetch(m, hit)  # a repair; activation is a no-op when installed
        self._announce()

    async def upload_permit(self, nbytes: int) -> None:
        await self.upload_bucket.take(nbytes)

    def count_sent(self, nbytes: int) -> None:
        self.transfer.sent_bytes += nbytes

    # --- views ---------------------------------------------------------------------------------

    def _state(self, rid: str, current: bool) -> str:
        if rid in self._fetches:
            return "downloading"
        if rid in self._activating:
            return "activating"
        if rid in self._failed:
            return "failed"
        if current:
            return "active"
        m = self._manifests[rid]
        if rid in self._installed_rids(m.name):
            return "installed"
        return "complete" if rid in self._complete else "downloading"

    def releases(self) -> list[dict[str, Any]]:
        """Rows of GET /v1/releases, plus who holds each release (from members' metadata)."""
        rows = []
        alive = [m for m in self._members.values() if m.alive]
        ordered = sorted(self._manifests.items(), key=lambda kv: (kv[1].name, kv[1].created, kv[1].version))
        for rid, m in ordered:
            cur_version = self.releases_dir.current(m.name)
            current = (cur_version == m.version and self.releases_dir.release_id(m.name, m.version) == rid)
            have = self._have(rid)
            total = len(m.chunks)
            nodes: dict[str, str] = {self.name: f"{have}/{total}"}
            complete_on = [self.name] if rid in self._complete else []
            current_on = [self.name] if current else []
            for mem in alive:
                entry = mem.entries.get(rid[:RID_PREFIX])
                if entry is None:
                    continue
                nodes[mem.name] = f"{entry.have}/{entry.total}"
                if entry.complete:
                    complete_on.append(mem.name)
                if entry.current:
                    current_on.append(mem.name)
            fetch = self._fetches.get(rid)
            progress = fetch.swarm.progress().fraction if fetch else (1.0 if rid in self._complete else 0.0)
            row: dict[str, Any] = {
                "name": m.name, "version": m.version, "id": rid, "size": m.total_size,
                "chunks": total, "have_chunks": have, "state": self._state(rid, current),
                "current": current, "progress": round(progress, 4), "created": m.created,
                "target": {"site": m.target.site, "tags": dict(m.target.tags or {})},
                "nodes_complete": len(complete_on), "complete_on": sorted(complete_on),
                "current_on": sorted(current_on), "nodes": dict(sorted(nodes.items())),
            }
            error = self._failed.get(rid) or (fetch.error if fetch else None)
            if error:
                row["error"] = error
            rows.append(row)
        return rows

    def publishing(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "version": p.version, "done_bytes": p.done, "total_bytes": p.total}
                for p in self._publishing.values()]

    def status(self) -> dict[str, Any]:
        return {
            "transfer": {"sent_bytes": self.transfer.sent_bytes,
                         "received_bytes": self.transfer.received_bytes,
                         "origin_bytes": self.transfer.origin_bytes},
            "downloading": len(self._fetches),
            "ignored": len(self._ignored),
            "counters": dict(sorted(self.counters.items())),
        }

    def fetch_counters(self) -> dict[str, int]:
        """Swarm counters summed over the releases being fetched (for /metrics)."""
        out: dict[str, int] = {}
        for fetch in self._fetches.values():
            for k, v in fetch.swarm.counters.items():
                out[k] = out.get(k, 0) + v
        return out


def member_meta_keys(meta: Mapping[str, str]) -> list[str]:
    """The metadata keys this service owns in a node's meta (for the daemon's merge)."""
    return [k for k in meta if k.startswith(META_PREFIX)]


__all__ = [
    "Announce",
    "ReleaseService",
    "member_meta_keys",
    "newer",
    "parse_announcements",
]
