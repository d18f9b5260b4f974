"""Update distribution on one node: the service's lifecycle, its member input, and its views.

ReleaseService owns the chunk store, the installed releases and the manifests this node holds,
and wires the parts that do the work:

    meshd/core/adoption.py   which announced release to fetch, adopt, retry (sans-IO policy)
    release/announce.py      the `rel:` entries of member metadata, both ways
    release/intake.py        announced release -> manifest fetched, signature checked, judged
    release/fetch.py         the Swarm driver: one sans-IO Swarm per release being fetched
    release/space.py         free space: a release is fetched when it fits, else waits for room
    release/serve.py         what peers are served (manifests, bitmaps, chunk pieces)
    release/peer.py          the peer HTTP protocol itself: routes, auth tokens, pieces
    release/peer_client.py   its client (PeerFetcher)

When a member announces a release id this node does not know, the service GETs the manifest
from that member, verifies the signature against the trusted publisher keys (here, in the
shell), and lets the policy judge it (targeting, newer than the current one, version taken);
then it stores it and fetches the missing chunks: from complete peers, from partial ones after
a GET of their have-bitmap, from the manifest's origin URLs as the last resort. On completion:
activate (materialise, switch current, hook, rollback), retire old versions, collect unused
chunks, announce, emit a release event.

Resume: verified chunks are on disk; start() creates a Swarm for every stored manifest with
chunks missing, with what the store has as `have`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from meshd.core.adoption import AdoptionPolicy, Verdict, newer, newest, release_order
from meshd.core.counters import Counters
from meshd.core.node import MemberEvent, MemberView
from meshd.core.swarm import SwarmConfig, make_bitmap
from meshd.errors import DecodeError, IntegrityError, StateError
from meshd.metrics import SOURCES, Exposition, Histograms, TransferStats
from meshd.release.activate import ActivationDiskFull, ActivationError, Releases
from meshd.release.announce import (
    RID_PREFIX,
    Announcer,
    Member,
    SetMetaKeys,
    format_announcements,
    format_bitmaps,
    progress_interval,
)
from meshd.release.assembly import PART_PREFIX, Assembly, part_folder
from meshd.release.config import DistConfig
from meshd.release.fetch import FetchDriver, ReleaseFetch
from meshd.release.intake import ManifestIntake
from meshd.release.manifest import Manifest
from meshd.release.peer_client import PeerFetcher
from meshd.release.publish import publish_tree
from meshd.release.serve import PeerUploads
from meshd.release.space import FreeSpace, SpaceGate
from meshd.release.store import ChunkStore, DiskFullError, StoreError
from meshd.wire import Codec

log = logging.getLogger("meshd.release")


def _fields(manifest: Manifest) -> dict[str, str]:
    """The fields of a release's log lines (`--log-format json`)."""
    return {"release": f"{manifest.name} {manifest.version}", "release_id": manifest.release_id}


Emit = Callable[[dict[str, Any]], None]


@dataclass
class _Publishing:
    name: str
    version: str
    done: int = 0
    total: int = 0


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
        wall: Callable[[], float] = time.time,
        free_space: FreeSpace | None = None,
        histograms: Histograms | None = None,
    ) -> None:
        self.config = config or DistConfig()
        self.wall = wall  # only for the manifest's informational `created`: never for ordering
        self.name = name
        self.site = site
        self.tags = dict(tags)
        self.trusted = [bytes(k) for k in trusted]
        # Chunk data is lz4 already: seal without a second compression pass, same keyring.
        self.codec = codec.variant(compress=False)
        self.store = ChunkStore(data_dir, fsync=self.config.fsync)
        self.releases_dir = Releases(
            data_dir,
            self.store,
            keep=self.config.keep,
            hook=self.config.hook,
            hook_timeout=self.config.hook_timeout,
            fsync=self.config.fsync,
        )
        self.transfer = transfer if transfer is not None else TransferStats()
        self.histograms = histograms or Histograms()
        self.swarm_config = swarm_config or self.config.swarm_config()
        self.counters = Counters()
        self.fetcher = PeerFetcher(self.codec, self.counters)
        self.policy = AdoptionPolicy(site, self.tags)
        self._members: dict[str, Member] = {}
        self._assemblies: dict[str, Assembly] = {}  # release id -> its files being fetched in place
        self.driver = FetchDriver(
            name=name,
            site=site,
            members=self._members,
            client=self.fetcher,
            store=self.store,
            transfer=self.transfer,
            counters=self.counters,
            swarm_config=self.swarm_config,
            spawn=self._spawn,
            now=self.now,
            on_complete=self._on_fetch_complete,
            on_progress=self._announce,
            on_disk_full=lambda fetch: self.space.stalled(fetch),
            histograms=self.histograms,
            assembly_for=self._assembly_for,
        )
        self.space = SpaceGate(
            data_dir,
            driver=self.driver,
            margin=self.config.min_free,
            counters=self.counters,
            emit=self._emit,
            spawn=self._spawn,
            free_space=free_space,
        )
        self.intake = ManifestIntake(
            site=site,
            trusted=self.trusted,
            policy=self.policy,
            client=self.fetcher,
            counters=self.counters,
            members=self._members,
            held=lambda: self._manifests,
            newest_held=self._newest_here,
            current=self._current_manifest,
            adopt=self._adopt,
            emit=self._emit,
            spawn=self._spawn,
            now=self.now,
            closed=lambda: self._closed,
        )
        self.server = PeerUploads(
            self,
            codec=self.codec,
            counters=self.counters,
            store=self.store,
            transfer=self.transfer,
            upload_rate=self.config.upload_rate,
            on_damaged=self._on_damaged,
        )
        self._fetching_members: set[str] = set()  # members announcing a partial release
        self.announcer = Announcer(
            set_meta_keys,
            lambda: progress_interval(self.config.announce_interval, len(self._fetching_members) + 1),
            self.announcements,
            self.now,
        )
        self._emit_cb = emit
        self._manifests: dict[str, Manifest] = {}
        self._complete: set[str] = set()
        # Chunks held of a release known here but not being fetched (found at start, or waiting
        # for room): its progress until a fetch reports it, never 0 for chunks on disk.
        self._held: dict[str, int] = {}
        self._fetches = self.driver.fetches  # rid -> the release being fetched
        self._activating: set[str] = set()
        self._activation_locks: dict[str, asyncio.Lock] = {}  # name -> one activation at a time
        self._failed: dict[str, str] = {}
        self._publishing: dict[str, _Publishing] = {}
        self._gc_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
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
        self.server.add_routes(app)

    async def start(self, members: Iterable[MemberView] = ()) -> None:
        """Recover from a crash, resume downloads, activate what completed, announce."""
        self._loop = asyncio.get_running_loop()
        found = await asyncio.to_thread(self._recover)
        self._started = True
        self.announcer.running = not self._closed
        for manifest, missing in found:
            self._manifests[manifest.release_id] = manifest
            self._held[manifest.release_id] = len(manifest.chunks) - len(missing)
        for manifest, missing in found:
            if missing:
                log.info(
                    "resuming %s %s: %d of %d chunks to fetch",
                    manifest.name,
                    manifest.version,
                    len(missing),
                    len(manifest.chunks),
                )
            await self.space.start(manifest, missing)  # complete ones finish at once (and may activate)
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
            self._lend_held(manifest)
            found.append((manifest, self.store.missing(manifest.unique_chunks())))
        kept = self._drop_superseded(found)
        self._drop_stray_assemblies({m.release_id for m, _ in kept}, {c for m, _ in kept for c in m.chunks})
        return kept

    def _lend_held(self, manifest: Manifest) -> None:
        """At startup: the store reads the chunks of an installed release from its files, and
        those of one assembled before a restart from the places that still hold them (thread)."""
        rid, name = manifest.release_id, manifest.name
        try:
            base = self.releases_dir.base(name)
            if self.releases_dir.release_id(name, manifest.version) == rid:
                self.store.lend(Assembly(base / manifest.version, manifest).places())
                return
            folder = part_folder(base, rid)
            if not folder.is_dir():
                return
            asm = Assembly(folder, manifest, fsync=self.config.fsync)
        except (ActivationError, IntegrityError) as e:
            log.warning("%s %s: not read from its files: %s", name, manifest.version, e)
            return
        self.store.lend(asm.resume())
        self._assemblies[rid] = asm
        log.info(
            "resuming %s %s in place: %d of %d chunks written",
            name,
            manifest.version,
            len(asm.written),
            len(manifest.chunks),
        )

    def _drop_stray_assemblies(self, keep: set[str], needed: set[str]) -> None:
        """Assemblies of releases no longer held (dropped, superseded, installed) go (thread)."""
        for rid in [r for r in self._assemblies if r not in keep]:
            self._drop_assembly(rid, needed)
        for name in self.releases_dir.names():
            for p in self.releases_dir.base(name).iterdir():
                if p.name.startswith(PART_PREFIX) and p.name[len(PART_PREFIX) :] not in self._assemblies:
                    Assembly.remove(p)
                    log.info("removed %s/%s: its release is not being fetched", name, p.name)

    def _assembly_for(self, manifest: Manifest) -> Assembly | None:
        """Where a fetch writes the raw chunks of a release this node will install (see
        release/assembly.py); None for one it holds for others or has installed: packs."""
        rid = manifest.release_id
        asm = self._assemblies.get(rid)
        if asm is not None or not self._installs_here(manifest):
            return asm
        try:
            base = self.releases_dir.base(manifest.name)
            if self.releases_dir.release_id(manifest.name, manifest.version) == rid:
                return None
            asm = Assembly(part_folder(base, rid), manifest, fsync=self.config.fsync)
        except (ActivationError, IntegrityError):
            return None
        self._assemblies[rid] = asm
        return asm

    def _drop_assembly(self, rid: str, needed: set[str] | None = None) -> None:
        """Delete what was assembled of a release no longer wanted, its places first (thread).
        Chunks it alone holds that a release still held needs (`needed`, default: the chunks of
        every manifest held) are copied into the store first: a newer release that supersedes
        a half-fetched one counts the chunks they share as held."""
        asm = self._assemblies.pop(rid, None)
        if asm is None:
            return
        asm.close()  # a piece still being stored for it writes nothing now
        if needed is None:
            needed = {c for m in list(self._manifests.values()) for c in m.chunks}
        keep: list[tuple[str, bytes | memoryview]] = []
        for cid in sorted(asm.written & needed):
            if self.store.only_lent_from(cid, asm.prefix):
                with contextlib.suppress(KeyError, IntegrityError, StoreError):
                    keep.append((cid, self.store.get_stored(cid)))  # verified where it lies
        self.store.forget_lent(asm.prefix)  # first: a chunk lent is one put_many skips
        if keep:
            res = self.store.put_many(keep, verify=False)
            if res.error is not None:
                log.warning("%s: %d shared chunks not kept: %s", rid[:16], len(keep), res.error)
        asm.discard()

    def _drop_superseded(self, found: list[tuple[Manifest, list[str]]]) -> list[tuple[Manifest, list[str]]]:
        """Of the stored releases, an unfinished one that a newer stored release of its name
        supersedes is dropped (thread): a node that was down while 2.0 and 3.0 were published
        resumes 3.0 only."""
        tops: dict[str, Manifest] = {}
        for manifest, _ in found:
            if not self._installs_here(manifest):
                continue
            top = tops.get(manifest.name)
            if top is None or newer(manifest, top):
                tops[manifest.name] = manifest
        kept = []
        for manifest, missing in found:
            installed = self.releases_dir.release_id(manifest.name, manifest.version) == manifest.release_id
            top = tops.get(manifest.name)
            if (
                missing
                and not installed
                and top is not None
                and newer(top, manifest)
                and self._installs_here(manifest)
            ):
                log.info(
                    "dropping unfinished %s %s: %s supersedes it",
                    manifest.name,
                    manifest.version,
                    top.version,
                )
                self.store.delete_manifest(manifest.release_id)
                continue
            kept.append((manifest, missing))
        return kept

    def reconfigure(
        self,
        *,
        trusted: Iterable[bytes],
        tags: Mapping[str, str],
        upload_rate: float | None,
        download_rate: float | None,
    ) -> None:
        """Apply a configuration reload: trusted publisher keys, this node's tags, rate caps.

        A release signed by a key no longer trusted is refused from now on (new manifests, and
        activation of one still being fetched); what is installed stays. Tags decide which new
        releases target this node.
        """
        keys = [bytes(k) for k in trusted]
        self.trusted[:] = keys
        self.intake.trusted[:] = keys
        self.tags = dict(tags)
        self.policy.tags = dict(tags)
        self.config = msgspec.structs.replace(
            self.config, upload_rate=upload_rate, download_rate=download_rate
        )
        self.server.set_upload_rate(upload_rate)
        self.swarm_config = dataclasses.replace(self.swarm_config, rate_limit=download_rate)
        self.driver.swarm_config = self.swarm_config
        for fetch in self.driver.fetches.values():  # fetches under way take the new cap too
            fetch.swarm.config = dataclasses.replace(fetch.swarm.config, rate_limit=download_rate)

    async def stop(self) -> None:
        self._closed = True
        self.announcer.close()
        self.intake.close()
        self.driver.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.fetcher.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
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
        ev = {
            "kind": "release",
            "name": manifest.name,
            "version": manifest.version,
            "id": manifest.release_id,
            "state": state,
            "node": self.name,
        }
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
        mem = self._members[m.name] = Member.from_view(m)
        if any(not e.complete for e in mem.entries.values()):
            self._fetching_members.add(mem.name)
        else:
            self._fetching_members.discard(mem.name)
        if not self._started:
            return
        self.driver.member_changed(mem)
        self.intake.member_changed(mem)

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
            self.policy.refused(rid[:RID_PREFIX], self.now())
            return
        if self._closed or rid in self._manifests:
            return
        top = self._newest_here(manifest.name)
        if top is not None and newer(top, manifest):
            self._count("releases.older")  # a newer one arrived while this manifest was stored
            self.store.delete_manifest(rid)
            return
        self._manifests[rid] = manifest
        if await self._supersede(manifest):
            await self.collect_garbage()  # room for this one: their own chunks go
            missing = await asyncio.to_thread(self.store.missing, missing)  # they stored some meanwhile
        log.info(
            "fetching %s %s (%s): %d of %d chunks, %d bytes",
            manifest.name,
            manifest.version,
            rid[:16],
            len(missing),
            len(manifest.chunks),
            manifest.total_size,
            extra=_fields(manifest),
        )
        if await self.space.start(manifest, missing):  # else it waits for room (release/space.py)
            self._emit(manifest, "downloading")

    async def _supersede(self, manifest: Manifest) -> int:
        """A newer release of its name is held: stop fetching the older ones and forget those
        not installed, so one name has one download at a time and no older one completes later.
        Chunks they share with `manifest` stay in the store and count for it. Releases this node
        holds for others (not targeted here) are never superseded: they may be a site's seed."""
        if not self._installs_here(manifest):
            return 0
        doomed = [
            m
            for m in self._manifests.values()
            if m.name == manifest.name
            and self._installs_here(m)
            and newer(manifest, m)
            and m.release_id not in self._installed_rids(m.name)
            and m.release_id not in self._activating
        ]
        for old in doomed:
            rid = old.release_id
            self.driver.cancel(rid)
            self.space.cancel(rid)
            self._forget(rid)
            self._count("releases.superseded")
            log.info("%s %s superseded by %s: no longer fetched", old.name, old.version, manifest.version)
            self._emit(old, "superseded", f"by {manifest.version}")
        if doomed:

            def forget() -> None:
                for m in doomed:
                    self.store.delete_manifest(m.release_id)
                    self._drop_assembly(m.release_id)

            await asyncio.to_thread(forget)
        return len(doomed)

    def _installs_here(self, m: Manifest) -> bool:
        """Whether this node would make `m` current: targeted here and signed by a trusted key
        (a node also holds releases it published for others)."""
        return m.matches(self.site, self.tags) and m.signature is not None and m.signature[0] in self.trusted

    def _newest_here(self, name: str) -> Manifest | None:
        """The newest release of `name` this node holds and would install: what an offer or a
        completed release must order after."""
        return newest(m for m in self._manifests.values() if m.name == name and self._installs_here(m))

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

    def _on_fetch_complete(self, fetch: ReleaseFetch) -> None:
        self._spawn(self._finish(fetch))

    async def _finish(self, fetch: ReleaseFetch) -> None:
        manifest = fetch.manifest
        rid = manifest.release_id
        self._complete.add(rid)
        took = self.now() - fetch.started
        log.info(
            "%s %s (%s) complete in %.1fs",
            manifest.name,
            manifest.version,
            rid[:16],
            took,
            extra=_fields(manifest),
        )
        self._emit(manifest, "complete")
        self._announce(force=True)
        await self._maybe_activate(manifest)
        self._announce(force=True)

    async def _maybe_activate(self, manifest: Manifest) -> None:
        """Make a complete release current if it is the newest of its name this node holds and
        newer than the current one; one activation per name at a time, so two releases that
        complete together are judged one after the other and an older one never follows."""
        lock = self._activation_locks.setdefault(manifest.name, asyncio.Lock())
        async with lock:
            await self._activate_locked(manifest)

    async def _activate_locked(self, manifest: Manifest) -> None:
        rid = manifest.release_id
        name = manifest.name
        if rid not in self._manifests or rid in self._installed_rids(name) or rid in self._failed:
            return
        if manifest.signature is None or manifest.signature[0] not in self.trusted:
            return  # held for others (published here with a key this node does not trust)
        top = self._newest_here(name)
        if top is not None and newer(top, manifest):
            self._count("releases.superseded")  # the newer one activates when it completes
            return
        verdict = self.policy.activation(manifest, self._current_manifest(name))
        if verdict is Verdict.OLDER:
            self._count("releases.older")
        if verdict is not Verdict.ADOPT:
            return
        self._activating.add(rid)
        started = self.now()
        try:
            result = await asyncio.to_thread(self.releases_dir.activate, manifest, self._assemblies.get(rid))
        except IntegrityError as e:
            # A chunk rotted between verification and materialising: the store dropped it.
            self._complete.discard(rid)
            log.warning("%s %s: %s; fetching it again", name, manifest.version, e)
            missing = await asyncio.to_thread(self.store.missing, manifest.unique_chunks())
            self.driver.start(manifest, missing)
            return
        except (ActivationDiskFull, DiskFullError) as e:
            # Materialising needs room the disk lacks now: a wait like a fetch's, then activate.
            self._count("activations.disk_full")
            log.info("%s %s: %s", name, manifest.version, e)
            self.space.materialise_when_room(manifest, lambda: self._spawn(self._maybe_activate(manifest)))
            return
        except (ActivationError, StoreError) as e:
            self._failed[rid] = str(e)
            self._count("activations.failed")
            log.error("activation of %s %s failed: %s", name, manifest.version, e, extra=_fields(manifest))
            self._emit(manifest, "failed", str(e))
            return
        finally:
            self._activating.discard(rid)
        self.histograms.activation.observe(self.now() - started)
        self._count("activations")
        log.info(
            "%s %s is current (was %s)%s",
            name,
            manifest.version,
            result.previous or "none",
            f"; retired {', '.join(result.retired)}" if result.retired else "",
            extra=_fields(manifest),
        )
        self._emit(manifest, "active")
        if rid in self._assemblies:
            await asyncio.to_thread(self._drop_assembly, rid)  # renamed into place (or not needed)
        await self.collect_garbage()

    def _forget(self, rid: str) -> None:
        """A release no longer held (superseded, or its manifest retired): out of every view."""
        self._manifests.pop(rid, None)
        self._complete.discard(rid)
        self._held.pop(rid, None)
        self.transfer.forget(rid)

    async def collect_garbage(self) -> int:
        """Forget retired manifests and delete chunks no stored manifest needs."""
        async with self._gc_lock:

            def work() -> int:
                for rid in list(self._manifests):
                    if not self.store.has_manifest(rid) and rid not in self._fetches:
                        self._forget(rid)
                        self._drop_assembly(rid)
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
                raise StateError(
                    f"release {name} {version} exists already ({m.release_id[:16]}); publish a new version"
                )
        key = f"{name} {version}"
        if key in self._publishing:
            raise StateError(f"release {name} {version} is being published already")
        progress = self._publishing[key] = _Publishing(name, version)
        seq = self.next_seq(name)

        def on_progress(done: int, total: int) -> None:
            progress.done, progress.total = done, total

        try:
            async with self._gc_lock:  # no gc between storing chunks and storing the manifest
                result = await asyncio.to_thread(
                    publish_tree,
                    self.store,
                    Path(path),
                    name,
                    version,
                    key_file,
                    site=site,
                    tags=tags,
                    origins=origins,
                    origin_dir=origin_dir,
                    created=self.wall(),
                    seq=seq,
                    progress=on_progress,
                )
        finally:
            self._publishing.pop(key, None)
        manifest = result.manifest
        rid = manifest.release_id
        self._count("published")
        log.info(
            "published %s %s (%s): %d files, %d bytes, %d chunks (%d new)",
            name,
            version,
            rid[:16],
            len(manifest.files),
            manifest.total_size,
            len(manifest.chunks),
            result.new_chunks,
            extra=_fields(manifest),
        )
        if rid not in self._manifests:
            self._manifests[rid] = manifest
            await self._supersede(manifest)
            self._emit(manifest, "published")
            self.driver.start(manifest, [])  # complete at once: activates here when targeted
        return {
            "id": rid,
            "name": name,
            "version": version,
            "seq": manifest.seq,
            "size": manifest.total_size,
            "files": len(manifest.files),
            "chunks": len(manifest.chunks),
            "new_chunks": result.new_chunks,
            "stored_bytes": result.stored_bytes,
            "origin_dir": result.origin_dir,
            "origins": list(manifest.origins),
            "target": {"site": manifest.target.site, "tags": dict(manifest.target.tags or {})},
        }

    def next_seq(self, name: str) -> int:
        """The seq a release of `name` published here takes: one above every seq this node has
        seen for that name (held manifests, and what members announce)."""
        held = max((m.seq for m in self._manifests.values() if m.name == name), default=0)
        return max(held, self.intake.offers.max_seq(name)) + 1

    # --- announcing --------------------------------------------------------------------------

    def _have(self, rid: str) -> int:
        fetch = self._fetches.get(rid)
        if fetch is not None:
            return fetch.swarm.progress().have_chunks
        if rid in self._complete:
            return len(self._manifests[rid].chunks)
        return self._held.get(rid, 0)

    def announcements(self) -> dict[str, str]:
        out = format_announcements(
            self._manifests.values(), self._have, self.releases_dir.current, self._complete
        )
        # What we hold of each release being fetched, for peers to schedule from (no polling).
        held = {rid: f.swarm.local_bitmap() for rid, f in self._fetches.items() if self._have(rid)}
        out.update(format_bitmaps(held))
        return out

    def _announce(self, force: bool = False) -> None:
        self.announcer.announce(force)

    # --- what the peer server reads (serve.Holdings) ---------------------------------------------

    def full_release_id(self, rid: str) -> str | None:
        if rid in self._manifests:
            return rid
        hits = [r for r in self._manifests if r.startswith(rid)]
        return hits[0] if len(hits) == 1 else None

    def manifest_bytes(self, rid: str) -> bytes:
        return self._manifests[rid].to_bytes()

    def have_bitmap(self, rid: str) -> bytes | None:
        fetch = self._fetches.get(rid)
        if fetch is not None:
            return fetch.swarm.local_bitmap()
        n = len(self._manifests[rid].chunks)
        return make_bitmap(range(n), n) if rid in self._complete else None

    def _on_damaged(self, ids: list[str]) -> None:
        """Chunks found rotten in our store (and dropped) while serving: fetch them again."""
        self._count("store.damaged", len(ids))
        log.warning("dropped %d damaged chunk(s) from the store; fetching them again", len(ids))
        for rid, m in list(self._manifests.items()):
            hit = [c for c in ids if c in m.chunks]
            if not hit:
                continue
            fetch = self._fetches.get(rid)
            if fetch is not None:
                self.driver.lost(fetch, hit)
            elif rid in self._complete:
                self._complete.discard(rid)
                self.driver.start(m, hit)  # a repair; activation is a no-op when installed
        self._announce()

    # --- views ---------------------------------------------------------------------------------

    def installed_releases(self) -> list[tuple[Manifest, Path]]:
        """Complete releases signed by a trusted key and installed here, with their directories
        (what the registry serves images from: never a partial or unsigned one)."""
        out = []
        for rid, m in list(self._manifests.items()):
            if rid not in self._complete or m.signature is None or m.signature[0] not in self.trusted:
                continue
            if self.releases_dir.release_id(m.name, m.version) != rid:
                continue
            path = self.releases_dir.base(m.name) / m.version
            if path.is_dir():
                out.append((m, path))
        return out

    def _state(self, rid: str, current: bool) -> str:
        if self.space.waiting(rid):
            return "waiting"
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
        alive = [m for m in self._members.values() if m.up]
        ordered = sorted(self._manifests.items(), key=lambda kv: (kv[1].name, release_order(kv[1])))
        for rid, m in ordered:
            cur_version = self.releases_dir.current(m.name)
            current = cur_version == m.version and self.releases_dir.release_id(m.name, m.version) == rid
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
                "name": m.name,
                "version": m.version,
                "id": rid,
                "size": m.total_size,
                "chunks": total,
                "have_chunks": have,
                "state": self._state(rid, current),
                "current": current,
                "progress": round(progress, 4),
                "created": m.created,
                "seq": m.seq,
                "target": {"site": m.target.site, "tags": dict(m.target.tags or {})},
                "nodes_complete": len(complete_on),
                "complete_on": sorted(complete_on),
                "current_on": sorted(current_on),
                "nodes": dict(sorted(nodes.items())),
                "bytes": self.transfer.release_bytes(rid),
            }
            error = self._failed.get(rid) or self.space.error(rid) or (fetch.error if fetch else None)
            if error:
                row["error"] = error
            rows.append(row)
        return rows

    def publishing(self) -> list[dict[str, Any]]:
        return [
            {"name": p.name, "version": p.version, "done_bytes": p.done, "total_bytes": p.total}
            for p in self._publishing.values()
        ]

    def status(self) -> dict[str, Any]:
        return {
            "transfer": {
                "sent_bytes": self.transfer.sent_bytes,
                "received_bytes": self.transfer.received_bytes,
                "origin_bytes": self.transfer.origin_bytes,
                "bytes": {
                    "site": self.counters["fetch.bytes.same_site"],
                    "remote_site": self.counters["fetch.bytes.other_site"],
                    "origin": self.transfer.origin_bytes,
                },
            },
            "downloading": len(self._fetches),
            "ignored": len(self.policy.ignored),
            "counters": dict(sorted(self.counters.items())),
        }

    def fetch_counters(self) -> dict[str, int]:
        """Swarm counters summed over the releases being fetched (for /metrics)."""
        return self.driver.swarm_counters()

    def collect_metrics(self, out: Exposition) -> None:
        """The service's counters and its swarms' (summed), as /metrics has always named them;
        per release held: its chunks, progress and bytes by source (a release no longer held is
        forgotten with its byte counts: `_forget`)."""
        out.core_counters({f"dist.{k}": v for k, v in self.counters.items()})
        out.core_counters({f"dist.swarm.{k}": v for k, v in self.fetch_counters().items()})
        held = sorted(self._manifests.items(), key=lambda kv: (kv[1].name, release_order(kv[1])))
        chunks, stored, progress, received = [], [], [], []
        for rid, m in held:
            labels = {"release": rid[:RID_PREFIX], "name": m.name, "version": m.version}
            have, total = self._have(rid), len(m.chunks)
            chunks.append((labels, total))
            stored.append((labels, have))
            progress.append((labels, have / total if total else 1.0))
            per = self.transfer.release_bytes(rid)
            received += [({"release": rid[:RID_PREFIX], "source": src}, per[src]) for src in SOURCES]
        out.labelled("meshd_release_chunks", "gauge", "chunks of each release held", chunks)
        out.labelled("meshd_release_chunks_stored", "gauge", "chunks of each release this node has", stored)
        out.labelled(
            "meshd_release_progress_ratio", "gauge", "share of each release's chunks this node has", progress
        )
        out.labelled(
            "meshd_release_received_bytes_total",
            "counter",
            "release bytes received, by source: a peer of this site, of another site, the origin",
            received,
        )


__all__ = ["ReleaseService"]
