"""Pull-through with a site cache: the I/O shell around meshd/registry/site_cache.py.

`BlobCache` is the cache directory (`<data-dir>/registry/blobs/sha256/<hex>`), a BlobSource for
the registry, bounded by a size cap (least recently used first; a timer and every insert over
the cap collect). `PullThrough` fills it on a miss: from a site peer that advertises the blob,
from the node fetching it now (its lease), from the site's owner of the digest, or from
upstream, as site_cache.plan() says. Every byte from a peer or upstream is hashed while it is
written to a temp file; only a file that is the digest is renamed into the cache. A peer that
served other bytes is banned for that blob and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import aiohttp

from meshd.metrics import Exposition
from meshd.registry.catalog import BlobFile
from meshd.registry.peer_blobs import BlobAsk, PeerBlobError, fetch_blob
from meshd.registry.site_cache import (
    ADVERT_KEY,
    MAX_ADVERTISED,
    SUMMARY_KEY,
    Attempt,
    CacheIndex,
    SiteMember,
    Step,
    digest_hex,
    encode_advert,
    encode_summary,
    lease_key,
    pick_upstream,
    plan,
)
from meshd.registry.upstream import TagAnswer, Upstream, UpstreamError
from meshd.release.announce import Announcer, SetMetaKeys
from meshd.wire import Codec

log = logging.getLogger("meshd.registry.pull")

DEFAULT_CACHE_MAX = 10 * 1024**3
GC_EVERY = 300.0
ADVERT_INTERVAL = 2.0
UPSTREAM_TRIES = 3
UPSTREAM_RETRY_DELAYS = (0.5, 2.0)
MAX_BANNED = 4096
SOURCES = ("release", "cache", "peer", "upstream")
_TMP_PREFIX = ".tmp-"


class BlobCache:
    """The cache directory and its LRU index (a BlobSource)."""

    def __init__(self, root: Path, cap: int) -> None:
        self.dir = root / "blobs" / "sha256"
        self.cap = cap
        self.index = CacheIndex()
        self.in_use: Counter[str] = Counter()  # digests being served or written now: never collected
        self.collected = 0

    @property
    def total(self) -> int:
        return self.index.total

    def scan(self) -> None:
        """At start: index what a previous run cached (oldest mtime first), remove crash leftovers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith(_TMP_PREFIX) or digest_hex("sha256:" + entry.name) is None:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            st = entry.stat()
            found.append((st.st_mtime_ns, entry.name, st.st_size))
        for _, name, size in sorted(found):
            self.index.add("sha256:" + name, size)
        self.gc()

    def path(self, digest: str) -> Path:
        hexd = digest_hex(digest)
        assert hexd is not None
        return self.dir / hexd

    def open(self, digest: str) -> BlobFile | None:
        size = self.index.size(digest)
        if size is None:
            return None
        self.index.touch(digest)
        with contextlib.suppress(OSError):  # the order survives a restart
            os.utime(self.path(digest))
        return BlobFile(self.path(digest), size)

    def cached(self, digest: str) -> Path | None:
        return self.path(digest) if digest in self.index else None

    def temp(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f"{_TMP_PREFIX}{os.getpid()}-{time.monotonic_ns()}"

    def commit(self, tmp: Path, digest: str, size: int) -> None:
        os.replace(tmp, self.path(digest))
        self.index.add(digest, size)
        if self.index.total > self.cap:
            self.gc()

    def gc(self) -> list[str]:
        gone = self.index.victims(self.cap, keep=[d for d, n in self.in_use.items() if n > 0])
        for d in gone:
            self.index.remove(d)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(d))
            self.collected += 1
        if gone:
            log.info("registry cache: collected %d blob(s), %d bytes held", len(gone), self.index.total)
        return gone


class _Digester:
    """Hashes and writes blocks of one blob to a temp file."""

    def __init__(self, f: object) -> None:
        self.file = f
        self.hash = hashlib.sha256()
        self.size = 0

    async def block(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        await asyncio.to_thread(self.file.write, data)  # type: ignore[attr-defined]

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


OnBlock = Callable[[bytes], Awaitable[None]]
# Ask a site peer for a blob; every block to `on_block`; False: it does not hold it.
PeerFetch = Callable[[SiteMember, BlobAsk, OnBlock], Awaitable[bool]]


class UpstreamReader(Protocol):
    async def stream(self, kind: str, repo: str, digest: str, limit: int, on_block: OnBlock) -> int: ...
    async def manifest_by_tag(self, repo: str, tag: str, accept: str) -> TagAnswer | None: ...


class PullThrough:
    """Fills the BlobCache on a miss, once per digest at a time, from the site or upstream."""

    def __init__(
        self,
        cache: BlobCache,
        *,
        me: str,
        codec: Codec,
        upstreams: Sequence[str],
        pass_tags: bool,
        site_members: Callable[[], list[SiteMember]],
        set_meta_keys: SetMetaKeys | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        lease_timeout: float = 30.0,
        peer_fetch: PeerFetch | None = None,
        upstream: Callable[[str], UpstreamReader] | None = None,
        pace: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.cache = cache
        self.me = me
        self.codec = codec
        self.upstreams = list(upstreams)
        self.pass_tags = pass_tags
        self._site_members = site_members
        self._clock = clock
        self._sleep = sleep
        self.lease_timeout = lease_timeout
        self._session: aiohttp.ClientSession | None = None
        make: Callable[[str], UpstreamReader] = upstream or (lambda url: Upstream(url, self.session))
        self._upstream = {u: make(u) for u in self.upstreams}
        self._peer_fetch: PeerFetch = peer_fetch or self._fetch_over_peer_port
        self._pace = pace  # the upload rate shared with release chunks
        # One fetch per digest at a time, in two tables: a peer's ask joins only an upstream
        # fetch (which never waits on peers), so two nodes asking each other cannot deadlock.
        self._site_fetches: dict[str, asyncio.Task[str | None]] = {}
        self._upstream_fetches: dict[str, asyncio.Task[str | None]] = {}
        self._leases: set[str] = set()
        self._banned: dict[str, set[str]] = {}  # digest -> peers that served other bytes
        self.upstream_bytes = 0
        self.peer_bytes_in = 0
        self.peer_bytes_out = 0
        self.peer_bad_blobs = 0
        self.upstream_bad_blobs = 0
        self.fetches: Counter[str] = Counter()  # source -> blobs brought into the cache
        self.announcer = Announcer(set_meta_keys, ADVERT_INTERVAL, self.meta_wanted, clock)
        self._gc_task: asyncio.Task[None] | None = None

    # --- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.cache.scan()
        self.announcer.running = True
        self.announcer.announce(force=True)
        self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop())

    async def close(self) -> None:
        self.announcer.close()
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc_task
        for task in [*self._site_fetches.values(), *self._upstream_fetches.values()]:
            task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _gc_loop(self) -> None:
        while True:
            await self._sleep(GC_EVERY)
            if self.cache.gc():
                self.announcer.announce()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=8),
                auto_decompress=False,
                headers={"User-Agent": "meshd-registry"},
            )
        return self._session

    def meta_wanted(self) -> dict[str, str]:
        """This node's `ociblobs` and `ocifetch:` keys."""
        out = {lease: "1" for lease in sorted(self._leases)}
        recent = self.cache.index.recent(MAX_ADVERTISED)
        if recent:
            out[ADVERT_KEY] = encode_advert(recent)
        out[SUMMARY_KEY] = encode_summary(len(self.cache.index), self.cache.total)
        return out

    # --- BlobHolder (the peer route) ----------------------------------------------------------

    def cached(self, digest: str) -> Path | None:
        return self.cache.cached(digest)

    def can_fetch(self) -> bool:
        return bool(self.upstreams)

    async def fetch_for_peer(self, ask: BlobAsk) -> Path | None:
        """A site peer asks this node (the owner, or the lease holder) to fetch a blob from
        upstream: joins a fetch running here, else fetches from upstream (not from peers: the
        asker tried those)."""
        source = await self._upstream_once(ask)
        return self.cache.cached(ask.digest) if source else None

    async def upload_permit(self, nbytes: int) -> None:
        if self._pace is not None:
            await self._pace(nbytes)

    def count_peer_out(self, nbytes: int) -> None:
        self.peer_bytes_out += nbytes

    # --- the registry's miss ------------------------------------------------------------------

    async def fetch(self, digest: str, repo: str, ns: str, kind: str = "blobs") -> str | None:
        """Bring `digest` into the cache; where it came from ("peer", "upstream", "cache" when
        another request brought it meanwhile), None when nowhere had it."""
        if digest_hex(digest) is None:
            return None
        if self.cache.cached(digest) is not None:
            return "cache"
        ask = BlobAsk(digest, repo, ns, kind)
        return await _once(self._site_fetches, digest, lambda: self._from_site(ask))

    async def _upstream_once(self, ask: BlobAsk) -> str | None:
        return await _once(self._upstream_fetches, ask.digest, lambda: self._from_upstream(ask))

    async def _from_site(self, ask: BlobAsk) -> str | None:
        attempt = Attempt(failed=set(self._banned.get(ask.digest, ())))
        while True:
            step = plan(
                ask.digest,
                self.me,
                self._site_members(),
                attempt,
                self._clock(),
                have_upstream=bool(self.upstreams),
                lease_timeout=self.lease_timeout,
            )
            log.debug("blob %s: %s %s", ask.digest[:19], step.step.value, step.peer.name if step.peer else "")
            if step.step is Step.UPSTREAM:
                return await self._upstream_once(ask)
            if step.step is Step.GIVE_UP or step.peer is None:
                return None
            attempt.asks += 1
            peer = step.peer
            fetch = step.step is not Step.PEER
            if await self._from_peer(peer, BlobAsk(ask.digest, ask.repo, ask.ns, ask.kind, fetch)):
                return "peer"
            attempt.failed.add(peer.name)

    async def _fetch_over_peer_port(self, peer: SiteMember, ask: BlobAsk, on_block: OnBlock) -> bool:
        return await fetch_blob(self.session(), self.codec, peer.addr, peer.node_id, ask, on_block)

    async def _from_peer(self, peer: SiteMember, ask: BlobAsk) -> bool:
        tmp = self.cache.temp()
        self.cache.in_use[ask.digest] += 1
        try:
            with tmp.open("wb") as f:
                sink = _Digester(f)
                try:
                    held = await self._peer_fetch(peer, ask, sink.block)
                except (PeerBlobError, aiohttp.ClientError, TimeoutError, OSError) as e:
                    log.info("blob %s: peer %s: %s", ask.digest[:19], peer.name, e)
                    return False
                finally:
                    self.peer_bytes_in += sink.size
            if not held:
                return False
            if sink.digest != ask.digest:
                self.peer_bad_blobs += 1
                banned = self._banned.setdefault(ask.digest, set())
                banned.add(peer.name)
                if len(self._banned) > MAX_BANNED:
                    self._banned.pop(next(iter(self._banned)))
                log.warning(
                    "blob %s: peer %s served %d bytes that are %s: banned for this blob",
                    ask.digest[:19], peer.name, sink.size, sink.digest[:19],
                )  # fmt: skip
                return False
            self._commit(tmp, ask.digest, sink.size, "peer")
            return True
        finally:
            self.cache.in_use[ask.digest] -= 1
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def _from_upstream(self, ask: BlobAsk) -> str | None:
        base = pick_upstream(self.upstreams, ask.ns)
        if base is None:
            return None
        if self.cache.cached(ask.digest) is not None:
            return "cache"
        key = lease_key(ask.digest)
        self._leases.add(key)
        self.announcer.announce(force=True)  # the site learns at once that this node pays
        try:
            for n in range(UPSTREAM_TRIES):
                if n:
                    await self._sleep(UPSTREAM_RETRY_DELAYS[min(n, len(UPSTREAM_RETRY_DELAYS)) - 1])
                try:
                    if await self._upstream_into_cache(self._upstream[base], ask):
                        return "upstream"
                    return None  # wrong bytes: another try would bring the same
                except (UpstreamError, aiohttp.ClientError, TimeoutError, OSError) as e:
                    log.info("blob %s: upstream %s: %s", ask.digest[:19], base, e)
                    if isinstance(e, UpstreamError) and e.final:
                        return None
            return None
        finally:
            self._leases.discard(key)
            self.announcer.announce(force=True)

    async def _upstream_into_cache(self, upstream: UpstreamReader, ask: BlobAsk) -> bool:
        tmp = self.cache.temp()
        self.cache.in_use[ask.digest] += 1
        try:
            with tmp.open("wb") as f:
                sink = _Digester(f)
                try:
                    await upstream.stream(ask.kind, ask.repo, ask.digest, self.cache.cap, sink.block)
                finally:
                    self.upstream_bytes += sink.size
            if sink.digest != ask.digest:
                self.upstream_bad_blobs += 1
                log.warning(
                    "blob %s: upstream served other bytes (%s); not cached", ask.digest[:19], sink.digest
                )
                return False
            self._commit(tmp, ask.digest, sink.size, "upstream")
            return True
        finally:
            self.cache.in_use[ask.digest] -= 1
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _commit(self, tmp: Path, digest: str, size: int, source: str) -> None:
        self.cache.commit(tmp, digest, size)
        self.fetches[source] += 1
        self.announcer.announce()

    # --- tags (only with registry_pass_tags) --------------------------------------------------

    async def manifest_by_tag(self, repo: str, tag: str, ns: str, accept: str) -> TagAnswer | None:
        """The upstream's manifest for a tag (unsigned: only with pass_tags); its bytes are
        cached by their digest, the tag is not. None: upstream has no such tag or is down."""
        base = pick_upstream(self.upstreams, ns)
        if not self.pass_tags or base is None:
            return None
        try:
            answer = await self._upstream[base].manifest_by_tag(repo, tag, accept)
        except (UpstreamError, aiohttp.ClientError, TimeoutError, OSError) as e:
            log.info("tag %s:%s: upstream %s: %s", repo, tag, base, e)
            return None
        if answer is None:
            return None
        self.upstream_bytes += len(answer.body)
        digest = "sha256:" + hashlib.sha256(answer.body).hexdigest()
        if answer.digest and answer.digest != digest:
            self.upstream_bad_blobs += 1
            log.warning("tag %s:%s: upstream's Docker-Content-Digest is not its body's", repo, tag)
            return None
        if self.cache.cached(digest) is None:
            tmp = self.cache.temp()
            try:
                tmp.write_bytes(answer.body)
                self._commit(tmp, digest, len(answer.body), "upstream")
            except OSError as e:
                log.warning("tag %s:%s: cannot cache its manifest: %s", repo, tag, e)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return TagAnswer(answer.body, answer.media_type, digest)

    # --- metrics ------------------------------------------------------------------------------

    def collect_metrics(self, out: Exposition) -> None:
        out.counter(
            "meshd_registry_upstream_bytes_total",
            "bytes the pull-through read from upstream",
            self.upstream_bytes,
        )
        out.labelled(
            "meshd_registry_peer_bytes_total",
            "counter",
            "cached blob bytes between site peers, by direction",
            [({"direction": "in"}, self.peer_bytes_in), ({"direction": "out"}, self.peer_bytes_out)],
        )
        out.counter(
            "meshd_registry_peer_bad_blobs_total",
            "blobs a peer served with other bytes than their digest (banned for that blob)",
            self.peer_bad_blobs,
        )
        out.counter(
            "meshd_registry_upstream_bad_blobs_total",
            "blobs upstream served with other bytes than their digest (not cached)",
            self.upstream_bad_blobs,
        )
        out.gauge(
            "meshd_registry_cache_bytes", "bytes of blobs in the pull-through cache", self.cache.index.total
        )
        out.gauge("meshd_registry_cache_blobs", "blobs in the pull-through cache", len(self.cache.index))
        out.counter(
            "meshd_registry_cache_collected_total", "blobs the cache's size cap removed", self.cache.collected
        )

    def summary(self) -> dict[str, int]:
        """For GET /v1/images: what this node's cache holds."""
        return {"blobs": len(self.cache.index), "bytes": self.cache.index.total, "cap": self.cache.cap}


async def _once(
    table: dict[str, asyncio.Task[str | None]], digest: str, run: Callable[[], Awaitable[str | None]]
) -> str | None:
    """One run per digest in `table` at a time, as a task: callers meanwhile join it, and a
    caller that goes away (containerd hung up) does not cancel it for the others."""
    task = table.get(digest)
    if task is None:
        task = table[digest] = asyncio.ensure_future(_logged(digest, run))
        task.add_done_callback(lambda t: table.pop(digest, None) if table.get(digest) is t else None)
    return await asyncio.shield(task)


async def _logged(digest: str, run: Callable[[], Awaitable[str | None]]) -> str | None:
    try:
        return await run()
    except Exception as e:  # a bug must not leave joiners waiting: they get a miss
        log.exception("blob %s: fetch failed: %s", digest[:19], e)
        return None


__all__ = ["DEFAULT_CACHE_MAX", "SOURCES", "BlobCache", "PullThrough"]
